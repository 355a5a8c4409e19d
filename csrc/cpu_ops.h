// The fp32 CPU kernels of the sampler's forward, callable from C++ as well as through their torch ops
// (torch.ops.dash.*, registered beside each kernel): csrc/decoder_layer_cpu.cpp chains them into one call per decoder
// layer. Each function checks its arguments (csrc/checks.h: ValueError naming the op) and parallelises over torch's
// intra-op threads of the calling thread.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace dash {

// csrc/rms_norm_cpu.cpp: weight * (x / sqrt(mean(x^2) + eps)) over the last dim; the add_ variant first does x += delta.
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rms_norm_into_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor out);  // -> out
at::Tensor add_rms_norm_cpu(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps);

// csrc/rotary_cpu.cpp: RoPE ("rotate half") in place on q [T, Hq, D] and k [T, Hkv, D].
void rotary_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);

// csrc/kv_cache_cpu.cpp: token t's K/V rows into cache slot slot_mapping[t] (-1: skipped).
void store_kv_cpu(const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping, bool check_slots);

// csrc/paged_attention_cpu.cpp: attention of q [T, Hq, D] over the paged cache (decode, or causal query runs).
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& page_table, const at::Tensor& context_lens,
                               const std::optional<at::Tensor>& cu_seqlens_q, double scale);
// The same into `out` (like q), for callers that reuse their buffers (csrc/decoder_layer_cpu.cpp's workspace).
at::Tensor paged_attention_into_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& page_table, const at::Tensor& context_lens,
                                    const std::optional<at::Tensor>& cu_seqlens_q, double scale, at::Tensor out);

// csrc/linear_cpu.cpp: AVX-512 GEMMs on weights packed once per generate call (has_avx512() false: not usable).
bool has_avx512();
at::Tensor pack_linear_cpu(const at::Tensor& w);                             // [N, K] -> [ceil(N/32), K, 32]
at::Tensor pack_gate_up_cpu(const at::Tensor& gate, const at::Tensor& up);  // 2 x [I, K] -> [ceil(I/16), K, 32]
at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out,
                             bool accumulate);                                // x [M, K] -> [M, n_out]
at::Tensor gate_up_silu_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
                                   const std::optional<at::Tensor>& out);  // silu(g) * u [M, n_out]

// csrc/decoder_layer_cpu.cpp: one decoder layer over the residual stream x [T, H], in place (chains the above);
// `packed` (empty: at::linear) holds pack_linear / pack_gate_up weights in PackedWeight order.
void decoder_layer_cpu(at::Tensor& x, const std::vector<std::optional<at::Tensor>>& w, double eps,
                       const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, const at::Tensor& page_table, const at::Tensor& context_lens,
                       const std::optional<at::Tensor>& cu_seqlens_q, double scale, at::TensorList packed);

}  // namespace dash

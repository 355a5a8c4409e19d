// `decoder_layer_cpu`: one pre-norm GQA decoder layer (Llama / Qwen2 / Qwen3) of the sampler's fp32 CPU forward, in
// one call, on a step whose attention reads the paged KV cache (decode, or prefill with query runs). Bound as
// dash_kernels._C.decoder_layer (csrc/module.cpp); dash_kernels/decoder_layer.py is the Python side, with the
// reference beside it (the same chain as torch calls). Tests: tests/kernels/test_decoder_layer.py.
//
//   x[T, H] (residual stream, updated in place):
//     h = rms_norm(x) ; q, k, v = h W_q (+b), h W_k (+b), h W_v (+b) ; [q, k = rms_norm_D(q), rms_norm_D(k)]
//     rope(q, k) ; store k, v at slot_mapping ; o = paged_attention(q, cache)
//     x += o W_o (+b) ; h = rms_norm(x) ; x += (silu(h W_gate) * h W_up) W_down
//
// Why one call: the same chain issued op by op from Python costs ~15 dispatches and their Python glue per layer,
// more than the ops themselves at a tiny model's decode step (benchmarks/sampler.py, tiny model, batch 8: 2.28x HF
// generate before, git f38a4a5, 2.66x after, git 704b3e5).
// It runs without the GIL, so other Python threads (a reward worker, a data loader) run meanwhile. The GEMMs are
// torch's (at::linear, the same MKL calls as the Python path) unless the caller passes `packed` weights
// (dash_kernels.decoder_layer.pack_layer, AVX-512 CPUs): then they are csrc/linear_cpu.cpp's, with the residual adds
// and SwiGLU in their epilogues. The rest are this library's CPU kernels (csrc/cpu_ops.h), which the reference chain
// also calls on fp32 CPU: without `packed` the results are bitwise equal to it.
// Tried and dropped: splitting a step's batch over Python threads with one intra-op thread each (a shard per core).
// It was no faster at batch 256, because torch's GEMMs and these kernels already scale ~2x over 2 threads there.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu_ops.h"

namespace dash {
namespace {

// The order of the weights list; dash_kernels/decoder_layer.py LAYER_WEIGHTS names the same slots.
enum LayerWeight : int {
  kInputNorm,
  kQ,
  kQBias,
  kK,
  kKBias,
  kV,
  kVBias,
  kQNorm,
  kKNorm,
  kO,
  kOBias,
  kPostNorm,
  kGate,
  kUp,
  kDown,
  kNumWeights
};

// The order of the optional packed weights (dash_kernels/decoder_layer.py PACKED_WEIGHTS, made by pack_layer).
enum PackedWeight : int { kPackedQ, kPackedK, kPackedV, kPackedO, kPackedGateUp, kPackedDown, kNumPacked };

// Slots that every layer has (the biases and the q/k norms may be None).
constexpr LayerWeight kRequired[] = {kInputNorm, kQ, kK, kV, kO, kPostNorm, kGate, kUp, kDown};

[[noreturn]] void value_error(const std::string& msg) { throw pybind11::value_error("decoder_layer: " + msg); }

bool fp32_cpu(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

}  // namespace

void decoder_layer_cpu(at::Tensor& x, const std::vector<std::optional<at::Tensor>>& w, double eps,
                       const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, const at::Tensor& page_table, const at::Tensor& context_lens,
                       const std::optional<at::Tensor>& cu_seqlens_q, double scale,
                       const std::vector<at::Tensor>& packed) {
  if (w.size() != kNumWeights) {
    value_error("weights must list " + std::to_string(kNumWeights) + " slots (LAYER_WEIGHTS), got " +
                std::to_string(w.size()));
  }
  for (LayerWeight i : kRequired) {
    if (!w[i].has_value()) value_error("weight slot " + std::to_string(i) + " is required, got None");
  }
  for (const auto& t : w) {
    if (t.has_value() && !fp32_cpu(*t)) value_error("weights must be fp32 CPU tensors");
  }
  if (w[kQNorm].has_value() != w[kKNorm].has_value()) value_error("q_norm and k_norm come together (Qwen3)");
  if (!fp32_cpu(x) || !x.is_contiguous() || x.dim() != 2) value_error("x must be a contiguous fp32 CPU [T, H]");
  if (k_cache.dim() != 4) value_error("caches must be [num_pages, page_size, Hkv, D]");
  const int64_t T = x.size(0), H = x.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  if (w[kQ]->dim() != 2 || w[kQ]->size(0) % D != 0 || w[kK]->size(0) != Hkv * D || w[kV]->size(0) != Hkv * D) {
    value_error("q / k / v projections do not produce whole heads of the cache's head_dim " + std::to_string(D) +
                " (k / v: " + std::to_string(Hkv) + " heads)");
  }
  if (!packed.empty() && packed.size() != kNumPacked) {
    value_error("packed must list " + std::to_string(kNumPacked) + " weights (q, k, v, o, gate_up, down) or none, got " +
                std::to_string(packed.size()));
  }
  const bool use_packed = !packed.empty();
  // y = h W^T (+ b): the packed AVX-512 GEMM (csrc/linear_cpu.cpp) when the caller packed the weights, else torch's.
  auto project = [&](const at::Tensor& h, PackedWeight p, LayerWeight wi, LayerWeight bi) {
    return use_packed ? linear_packed_cpu(h, packed[p], w[wi]->size(0), w[bi], std::nullopt, false)
                      : at::linear(h, *w[wi], w[bi]);
  };
  // Attention block. The projections are fresh contiguous tensors, so their [T, heads, D] views are contiguous too.
  at::Tensor h = rms_norm_cpu(x, *w[kInputNorm], eps);                 // [T, H]
  at::Tensor q = project(h, kPackedQ, kQ, kQBias).view({T, -1, D});    // [T, Hq, D]
  at::Tensor k = project(h, kPackedK, kK, kKBias).view({T, Hkv, D});   // [T, Hkv, D]
  at::Tensor v = project(h, kPackedV, kV, kVBias).view({T, Hkv, D});   // [T, Hkv, D]
  if (w[kQNorm].has_value()) {
    q = rms_norm_cpu(q, *w[kQNorm], eps);
    k = rms_norm_cpu(k, *w[kKNorm], eps);
  }
  rotary_cpu(q, k, cos, sin);
  store_kv_cpu(k, v, k_cache, v_cache, slot_mapping, /*check_slots=*/true);
  at::Tensor o = paged_attention_cpu(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale).view({T, -1});
  if (use_packed) {  // x += o W_o^T (+ b) in the GEMM's epilogue, then h = rms_norm(x)
    linear_packed_cpu(o, packed[kPackedO], H, w[kOBias], x, /*accumulate=*/true);
    h = rms_norm_cpu(x, *w[kPostNorm], eps);
    at::Tensor act = gate_up_silu_packed_cpu(h, packed[kPackedGateUp], w[kGate]->size(0));  // [T, I]
    linear_packed_cpu(act, packed[kPackedDown], H, std::nullopt, x, /*accumulate=*/true);    // x += mlp
    return;
  }
  h = add_rms_norm_cpu(x, at::linear(o, *w[kO], w[kOBias]), *w[kPostNorm], eps);  // x += attn
  // MLP block (SwiGLU), in place on the gate's buffer.
  at::Tensor gate = at::linear(h, *w[kGate]);  // [T, I]
  at::silu_(gate).mul_(at::linear(h, *w[kUp]));
  x.add_(at::linear(gate, *w[kDown]));  // x += mlp
}

}  // namespace dash

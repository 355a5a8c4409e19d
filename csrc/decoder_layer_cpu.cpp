// `decoder_layer_cpu`: one pre-norm GQA decoder layer (Llama / Qwen2 / Qwen3) of the sampler's fp32 CPU forward, in
// one call, on a step whose attention reads the paged KV cache (decode, or prefill with query runs). Registered as
// the torch op dash::decoder_layer_ (below); dash_kernels/decoder_layer.py is the Python side, with the
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
// It runs without the GIL (a torch.ops call drops it while the kernel runs: torch's invokeOperatorFromPython), so
// other Python threads (a reward worker, a data loader) run meanwhile. The GEMMs are
// torch's (at::linear, the same MKL calls as the Python path) unless the caller passes `packed` weights
// (dash_kernels.decoder_layer.pack_layer, AVX-512 CPUs): then they are csrc/linear_cpu.cpp's, with the residual adds
// and SwiGLU in their epilogues. The rest are this library's CPU kernels (csrc/cpu_ops.h), which the reference chain
// also calls on fp32 CPU: without `packed` the results are bitwise equal to it.
// Tried and dropped: splitting a step's batch over Python threads with one intra-op thread each (a shard per core).
// It was no faster at batch 256, because torch's GEMMs and these kernels already scale ~2x over 2 threads there.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
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

// Rows per thread below which a decode step stays one pass (a split's fork / join would cost more than it saves).
constexpr int64_t kMinRowsPerThread = 8;

// Slots that every layer has (the biases and the q/k norms may be None).
constexpr LayerWeight kRequired[] = {kInputNorm, kQ, kK, kV, kO, kPostNorm, kGate, kUp, kDown};

constexpr const char* kOp = "decoder_layer_";

bool fp32_cpu(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

// Scratch for one layer_rows call, carved from a per-thread buffer that lives as long as the thread: a step's
// intermediates (~1 KB a row at the tiny model) then reuse memory that is already mapped. Allocated fresh, buffers
// past glibc's mmap threshold came back as new pages every step (~8000 page faults a tiny-model batch-256 call, 4-10
// ms of ~50). A step needing more than kMaxWorkspaceFloats allocates as before, so no thread keeps more than 64 MiB.
constexpr int64_t kMaxWorkspaceFloats = int64_t{1} << 24;

class Workspace {
 public:
  explicit Workspace(int64_t floats) {
    thread_local std::vector<float> buffer;
    if (floats > kMaxWorkspaceFloats) return;
    if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
    next_ = buffer.data();
  }
  // A [rows, cols] fp32 tensor on the next free floats (a fresh tensor when the step is too large).
  at::Tensor take(int64_t rows, int64_t cols) {
    if (next_ == nullptr) return at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor t = at::from_blob(next_, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
    next_ += rows * cols;
    return t;
  }

 private:
  float* next_ = nullptr;
};

// The layer over the rows of x (all of a step's, or one thread's block of a decode step's), x updated in place.
void layer_rows(at::Tensor& x, const std::vector<std::optional<at::Tensor>>& w, at::TensorList packed,
                double eps, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                const at::Tensor& slot_mapping, const at::Tensor& page_table, const at::Tensor& context_lens,
                const std::optional<at::Tensor>& cu_seqlens_q, double scale, int64_t D, int64_t Hkv) {
  const int64_t T = x.size(0), H = x.size(1), Nq = w[kQ]->size(0), Nkv = Hkv * D, I = w[kGate]->size(0);
  if (packed.empty()) {  // torch's GEMMs, each output a fresh tensor
    at::Tensor h = rms_norm_cpu(x, *w[kInputNorm], eps);                  // [T, H]
    at::Tensor q = at::linear(h, *w[kQ], w[kQBias]).view({T, -1, D});    // [T, Hq, D]
    at::Tensor k = at::linear(h, *w[kK], w[kKBias]).view({T, Hkv, D});   // [T, Hkv, D]
    at::Tensor v = at::linear(h, *w[kV], w[kVBias]).view({T, Hkv, D});   // [T, Hkv, D]
    if (w[kQNorm].has_value()) {
      q = rms_norm_cpu(q, *w[kQNorm], eps);
      k = rms_norm_cpu(k, *w[kKNorm], eps);
    }
    rotary_cpu(q, k, cos, sin);
    store_kv_cpu(k, v, k_cache, v_cache, slot_mapping, /*check_slots=*/true);
    at::Tensor o = paged_attention_cpu(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale);
    h = add_rms_norm_cpu(x, at::linear(o.view({T, -1}), *w[kO], w[kOBias]), *w[kPostNorm], eps);  // x += attn
    at::Tensor gate = at::linear(h, *w[kGate]);  // [T, I]: SwiGLU in place on the gate's buffer
    at::silu_(gate).mul_(at::linear(h, *w[kUp]));
    x.add_(at::linear(gate, *w[kDown]));  // x += mlp
    return;
  }
  // Packed AVX-512 GEMMs (csrc/linear_cpu.cpp), the residual adds and SwiGLU in their epilogues; every intermediate
  // in the workspace: h [T, H] (reused after attention), q, k, v, o, the q/k norm outputs, act [T, I].
  const bool qk_norm = w[kQNorm].has_value();
  Workspace ws(T * (H + 2 * Nq + 2 * Nkv + I + (qk_norm ? Nq + Nkv : 0)));
  at::Tensor h = rms_norm_into_cpu(x, *w[kInputNorm], eps, ws.take(T, H));
  at::Tensor q = ws.take(T, Nq), k = ws.take(T, Nkv), v = ws.take(T, Nkv);
  linear_packed_cpu(h, packed[kPackedQ], Nq, w[kQBias], q, false);
  linear_packed_cpu(h, packed[kPackedK], Nkv, w[kKBias], k, false);
  linear_packed_cpu(h, packed[kPackedV], Nkv, w[kVBias], v, false);
  q = q.view({T, -1, D});  // [T, Hq, D]
  k = k.view({T, Hkv, D});  // [T, Hkv, D]
  v = v.view({T, Hkv, D});
  if (qk_norm) {
    q = rms_norm_into_cpu(q, *w[kQNorm], eps, ws.take(T, Nq).view({T, -1, D}));
    k = rms_norm_into_cpu(k, *w[kKNorm], eps, ws.take(T, Nkv).view({T, Hkv, D}));
  }
  rotary_cpu(q, k, cos, sin);
  store_kv_cpu(k, v, k_cache, v_cache, slot_mapping, /*check_slots=*/true);
  at::Tensor o = paged_attention_into_cpu(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale,
                                          ws.take(T, Nq).view({T, -1, D}));
  linear_packed_cpu(o.view({T, Nq}), packed[kPackedO], H, w[kOBias], x, /*accumulate=*/true);  // x += attn
  h = rms_norm_into_cpu(x, *w[kPostNorm], eps, h);
  at::Tensor act = gate_up_silu_packed_cpu(h, packed[kPackedGateUp], I, ws.take(T, I));  // [T, I]
  linear_packed_cpu(act, packed[kPackedDown], H, std::nullopt, x, /*accumulate=*/true);  // x += mlp
}

}  // namespace

void decoder_layer_cpu(at::Tensor& x, const std::vector<std::optional<at::Tensor>>& w, double eps,
                       const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, const at::Tensor& page_table, const at::Tensor& context_lens,
                       const std::optional<at::Tensor>& cu_seqlens_q, double scale, at::TensorList packed) {
  TORCH_CHECK_VALUE(w.size() == kNumWeights, kOp, ": weights must list ", int{kNumWeights},
                    " slots (LAYER_WEIGHTS), got ", w.size());
  for (LayerWeight i : kRequired) {
    TORCH_CHECK_VALUE(w[i].has_value(), kOp, ": weight slot ", int{i}, " is required, got None");
  }
  for (const auto& t : w) {
    TORCH_CHECK_VALUE(!t.has_value() || fp32_cpu(*t), kOp, ": weights must be fp32 CPU tensors, got ",
                      t.has_value() ? check::dtype_name(t->scalar_type()) : "None");
  }
  TORCH_CHECK_VALUE(w[kQNorm].has_value() == w[kKNorm].has_value(), kOp, ": q_norm and k_norm come together (Qwen3)");
  check::fp32_cpu(kOp, "x", x, 2);  // [T, H]
  check::dims(kOp, "k_cache", k_cache, 4);  // [num_pages, page_size, Hkv, D]
  const int64_t T = x.size(0), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK_VALUE(D > 0 && w[kQ]->dim() == 2 && w[kQ]->size(0) % D == 0 && w[kK]->size(0) == Hkv * D &&
                        w[kV]->size(0) == Hkv * D,
                    kOp, ": q / k / v projections do not produce whole heads of the cache's head_dim ", D,
                    " (k / v: ", Hkv, " heads)");
  TORCH_CHECK_VALUE(packed.empty() || packed.size() == kNumPacked, kOp, ": packed must list ", int{kNumPacked},
                    " weights (q, k, v, o, gate_up, down) or none, got ", packed.size());
  const bool use_packed = !packed.empty();
  // A decode step on packed weights runs as one parallel region: each thread takes a contiguous block of rows through
  // the whole layer, the kernels inside running serially on it (at::parallel_for is serial within a region). Decode
  // rows are independent within a layer (each reads its own sequence's pages, written in earlier steps or by itself),
  // and the packed GEMM gives a row the same bits in any block, so the result equals one pass over all rows. It
  // replaces ~11 fork / join points per layer with one. Prefill keeps one pass: a step's entries may read pages
  // another entry writes in the same layer (prefix sharing within the step), which needs every store before any
  // attention. torch's GEMMs keep one pass too (their bits may depend on M).
  const int64_t threads = at::get_num_threads();
  if (use_packed && !cu_seqlens_q.has_value() && threads > 1 && T >= kMinRowsPerThread * threads) {
    at::parallel_for(0, threads, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = T * b / threads, n = T * (b + 1) / threads - r0;
        at::Tensor xb = x.narrow(0, r0, n);
        layer_rows(xb, w, packed, eps, cos.narrow(0, r0, n), sin.narrow(0, r0, n), k_cache, v_cache,
                   slot_mapping.narrow(0, r0, n), page_table.narrow(0, r0, n), context_lens.narrow(0, r0, n),
                   std::nullopt, scale, D, Hkv);
      }
    });
    return;
  }
  layer_rows(x, w, packed, eps, cos, sin, k_cache, v_cache, slot_mapping, page_table, context_lens, cu_seqlens_q,
             scale, D, Hkv);
}

namespace {

// The op's kernel: the dispatcher passes Tensor?[] as a c10::List; the layer indexes a std::vector (15 handles).
void decoder_layer_op(at::Tensor& x, const c10::List<std::optional<at::Tensor>>& weights, double eps,
                      const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                      const at::Tensor& slot_mapping, const at::Tensor& page_table, const at::Tensor& context_lens,
                      const std::optional<at::Tensor>& cu_seqlens_q, double scale, at::TensorList packed) {
  const std::vector<std::optional<at::Tensor>> w(weights.begin(), weights.end());
  decoder_layer_cpu(x, w, eps, cos, sin, k_cache, v_cache, slot_mapping, page_table, context_lens, cu_seqlens_q,
                    scale, packed);
}

}  // namespace

// Schema (dash_kernels/decoder_layer.py registers its fake kernel): x and both caches are written in place.
TORCH_LIBRARY_FRAGMENT(dash, m) {
  m.def("decoder_layer_(Tensor(a!) x, Tensor?[] weights, float eps, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slot_mapping, Tensor page_table, Tensor context_lens, Tensor? cu_seqlens_q, "
        "float scale, Tensor[] packed) -> ()");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) { m.impl("decoder_layer_", &decoder_layer_op); }

}  // namespace dash

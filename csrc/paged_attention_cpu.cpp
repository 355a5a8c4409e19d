// `paged_attention_cpu`: CPU fp32 attention of new queries read in place from the paged KV cache (GQA, any page
// size). Decode passes one query per sequence; prefill passes runs of queries per sequence (cu_seqlens_q), whose own
// K/V are already stored, causally masked: query i of a run of q_len sits at position context_len - q_len + i and sees
// the keys at positions <= its own. Registered as torch.ops.dash.paged_attention (below);
// dash_kernels/paged_attention.py sends fp32 CPU calls here. Tests: tests/kernels/test_paged_attention.py (against an
// fp64 dense reference).
//
// Why not SDPA over gathered pages: a step's attention maths is tiny (T * Hq * ctx * D * 4 flops), but the gather
// copies every page and ATen's CPU flash kernel pays per-(batch, head) setup; together they were ~40% of a tiny
// model's decode step at batch 256, and the masked prefill over a cached prefix cost more than all the step's GEMMs.
// Here every K/V row is read where it lies.
//
// Work split: one task = (query token t, KV head h), numbered t * Hkv + h. at::parallel_for (torch's thread count)
// gives each thread a contiguous range, so the KV heads of one token, adjacent within each cache row, and the tokens
// of one run, which read the same pages, share a thread. A task computes its token whole, so the result does not
// depend on the thread count, and a prefill query gets the same bits as a decode step at the same position.
// One task, with G = Hq / Hkv query heads per KV head and n visible keys:
//   1. s[g, t] = scale * q[g] . k[t], page by page; each K row is loaded once for all G heads;
//   2. p[g, t] = exp(s[g, t] - max_t s[g, :]) / sum_t exp(...), in place in s;
//   3. out[g] = sum_t p[g, t] v[t], in blocks of kRowBlock rows that stay in L1 while the G heads read them.
// s is a thread-local buffer [G, n rounded up to kLanes] that only grows: a call allocates its output tensor and two
// int arrays of T (each token's sequence and visible key count).
//
// Vectorisation without -ffast-math (the compiler may not reorder a float sum): reductions keep kLanes independent
// partial sums, the exp is a branch-free polynomial (std::exp is a scalar libm call), head dims 32 / 64 / 128 are
// compile-time constants with 4-float vector-extension types (accumulators in registers), and setup.py passes
// -fno-trapping-math so `x < c ? c : x` becomes a SIMD select. On x86-64 Linux the task loop is also compiled for
// x86-64-v3 (AVX2 + FMA) and picked when the library loads (target_clones): 1.3x over the SSE2 build, which still
// runs on any x86-64. B=256, Hq=4, Hkv=2, D=32, context 20-40, 1 thread: 0.15 ms per call with hot caches (the
// previous scalar loop: 0.52 ms), ~0.5 ms with cold ones (1.4 ms). On an AVX-512 CPU, head dims 32 / 64 / 128 take
// attend_tasks_avx512 instead (benchmarks/paged_attention.py decode, batch 256, 1 thread, medians of 9, three
// alternated runs: D=64 0.24-0.32 ms vs 0.48-0.55 for the vec4 loop; D=32 within noise of it).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_math.h"
#include "cpu_ops.h"

namespace dash {
namespace {

// A parallel_for chunk should be at least this many multiply-adds (~10 us): a small batch then stays on one thread
// instead of paying the pool's wake-up for a few microseconds of work.
constexpr int64_t kMinMacsPerChunk = 1 << 15;

using cpu::dot;
using cpu::exp_nonpositive;
using cpu::kLanes;

// max and sum of x[0:n], n a multiple of kLanes, with kLanes independent lanes (vectorisable without -ffast-math).
inline float max_lanes(const float* __restrict x, int64_t n) {
  float part[kLanes];
  for (int j = 0; j < kLanes; ++j) part[j] = x[j];
  for (int64_t i = kLanes; i < n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] = x[i + j] > part[j] ? x[i + j] : part[j];
  }
  float mx = part[0];
  for (int j = 1; j < kLanes; ++j) mx = part[j] > mx ? part[j] : mx;
  return mx;
}

inline float sum_lanes(const float* __restrict x, int64_t n) {
  float part[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += x[i + j];
  }
  return cpu::combine_lanes(part);
}

#if defined(__GNUC__)  // GCC and clang: explicit SIMD through vector extensions for head dims known at compile time
#define DASH_VEC_EXT 1
// 4 floats as one SIMD value (an SSE register, or the low half of an AVX2 one; unaligned loads and stores go through
// memcpy, a single movups). Why not 8 on AVX2: the same source is compiled for both targets (target_clones), and
// GCC lowers an 8-float vector on an SSE-only target through memory: 4x slower there, for 12% gained on AVX2.
typedef float vec4 __attribute__((vector_size(16)));
constexpr int kVec = 4;

inline vec4 load4(const float* p) {
  vec4 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void store4(float* p, vec4 x) { std::memcpy(p, &x, sizeof(x)); }
inline float hsum4(vec4 x) { return (x[0] + x[2]) + (x[1] + x[3]); }
// The V accumulator of one head is kept in registers kAccRegs vectors at a time (more would spill on SSE).
constexpr int kAccRegs = 8;
#endif

// a . b over D floats (kD > 0: D == kD, a multiple of 2 * kVec, fully unrolled; 0: any D).
template <int kD>
inline float dot_d(const float* __restrict a, const float* __restrict b, int64_t D) {
#ifdef DASH_VEC_EXT
  if constexpr (kD > 0) {
    // Two accumulators (even / odd chunks): halves the chain of dependent multiply-adds.
    vec4 acc0 = load4(a) * load4(b), acc1 = load4(a + kVec) * load4(b + kVec);
#pragma GCC unroll 32
    for (int c = 2; c < kD / kVec; c += 2) {
      acc0 += load4(a + kVec * c) * load4(b + kVec * c);
      acc1 += load4(a + kVec * (c + 1)) * load4(b + kVec * (c + 1));
    }
    return hsum4(acc0 + acc1);
  }
#endif
  return dot(a, b, D);
}

// o[0:D] += sum_i p[i] * v_i over `rows` V rows `stride` floats apart.
template <int kD>
inline void accumulate(float* __restrict o, const float* __restrict p, const float* v, int64_t rows, int64_t stride,
                       int64_t D) {
#ifdef DASH_VEC_EXT
  if constexpr (kD > 0) {
    constexpr int C = kD / kVec < kAccRegs ? kD / kVec : kAccRegs;  // vectors per chunk of D
    for (int d0 = 0; d0 < kD; d0 += kVec * C) {
      vec4 acc[C];
#pragma GCC unroll 32
      for (int c = 0; c < C; ++c) acc[c] = load4(o + d0 + kVec * c);
      const float* vr = v + d0;
      for (int64_t i = 0; i < rows; ++i, vr += stride) {
        const float w = p[i];
#pragma GCC unroll 32
        for (int c = 0; c < C; ++c) acc[c] += w * load4(vr + kVec * c);
      }
#pragma GCC unroll 32
      for (int c = 0; c < C; ++c) store4(o + d0 + kVec * c, acc[c]);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i, v += stride) {
    const float w = p[i];
    for (int64_t d = 0; d < D; ++d) o[d] += w * v[d];
  }
}

// Shapes and strides shared by every task of one call.
struct Geometry {
  int64_t Hq, Hkv, G, D, page_size, W;
  int64_t row_stride, page_stride;  // floats between cache rows (tokens) and between pages
  float scale;
};

constexpr int64_t kRowBlock = 16;  // V rows per accumulate call: a block stays in L1 while the G heads read it

inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Probabilities in place, per head g: p = exp(s - max) / sum over the n scores of row g of s [G, n_pad]. Padding
// repeats s[g, 0] (the max is unchanged), then is zeroed.
inline void softmax_rows(float* __restrict s, int64_t G, int64_t n, int64_t n_pad) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n_pad;
    std::fill(sg + n, sg + n_pad, sg[0]);
    const float mx = max_lanes(sg, n_pad);
    for (int64_t t = 0; t < n_pad; ++t) sg[t] = exp_nonpositive(sg[t] - mx);
    std::fill(sg + n, sg + n_pad, 0.f);
    const float inv = 1.f / sum_lanes(sg, n_pad);
    for (int64_t t = 0; t < n_pad; ++t) sg[t] *= inv;
  }
}

// Tasks [begin, end) (task = t * Hkv + h); see the file comment. seq_of[t] / keys_of[t]: token t's sequence and its
// number of visible keys. s: scratch for G * round_up_lanes(max keys) floats; each head's row of scores is padded to
// a multiple of kLanes so every loop over it is whole vectors.
template <int kD>
DASH_CPU_CLONES void attend_tasks(int64_t begin, int64_t end, const Geometry& geo, const float* __restrict q,
                                  const float* __restrict k_cache, const float* __restrict v_cache,
                                  const int32_t* __restrict page_table, const int32_t* __restrict seq_of,
                                  const int32_t* __restrict keys_of, float* __restrict out, float* __restrict s) {
  const int64_t G = geo.G, D = kD > 0 ? kD : geo.D, ps = geo.page_size, stride = geo.row_stride;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t t = task / geo.Hkv, h = task % geo.Hkv, n = keys_of[t], n_pad = round_up_lanes(n);
    const int32_t* pages = page_table + seq_of[t] * geo.W;
    const float* qg = q + (t * geo.Hq + h * G) * D;  // [G, D]: the query heads of KV head h are adjacent
    float* og = out + (t * geo.Hq + h * G) * D;      // [G, D]
    // Pass 1: scores s[g, t], page by page (no division per token); each K row is read for all G heads at once.
    for (int64_t t0 = 0; t0 < n; t0 += ps) {
      const float* k = k_cache + pages[t0 / ps] * geo.page_stride + h * D;
      const int64_t rows = std::min(ps, n - t0);
      for (int64_t r = 0; r < rows; ++r, k += stride) {
        for (int64_t g = 0; g < G; ++g) s[g * n_pad + t0 + r] = dot_d<kD>(qg + g * D, k, D) * geo.scale;
      }
    }
    softmax_rows(s, G, n, n_pad);
    // Pass 2: out[g] = sum_t p[g, t] v[t], in blocks of rows that stay in L1 while the G heads read them.
    std::fill(og, og + G * D, 0.f);
    for (int64_t t0 = 0, rows = 0; t0 < n; t0 += rows) {
      rows = std::min({kRowBlock, n - t0, ps - t0 % ps});  // a block never crosses a page
      const float* v = v_cache + pages[t0 / ps] * geo.page_stride + (t0 % ps) * stride + h * D;
      for (int64_t g = 0; g < G; ++g) accumulate<kD>(og + g * D, s + g * n_pad + t0, v, rows, stride, D);
    }
  }
}

#ifdef DASH_HAS_AVX512_CODE
// The task loop above with AVX-512 intrinsics, for head dims of whole 16-float vectors (kD = 32, 64, 128; picked at
// run time when the CPU has AVX-512): a K or V row is kD / 16 registers, loaded once for the G query heads, where
// the 4-float vector-extension loop (the only width its SSE2 clone can afford) reloads it per head in 4-float pieces.
// Same passes and softmax; the dot products sum in another order, so bits differ from the portable loop (not between
// decode and prefill, nor between thread counts: both take this loop).
template <int kD>
DASH_AVX512 void attend_tasks_avx512(
    int64_t begin, int64_t end, const Geometry& geo, const float* __restrict q, const float* __restrict k_cache,
    const float* __restrict v_cache, const int32_t* __restrict page_table, const int32_t* __restrict seq_of,
    const int32_t* __restrict keys_of, float* __restrict out, float* __restrict s) {
  constexpr int V = kD / 16;  // vectors per row
  const int64_t G = geo.G, ps = geo.page_size, stride = geo.row_stride;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t t = task / geo.Hkv, h = task % geo.Hkv, n = keys_of[t], n_pad = round_up_lanes(n);
    const int32_t* pages = page_table + seq_of[t] * geo.W;
    const float* qg = q + (t * geo.Hq + h * G) * kD;  // [G, kD]
    float* og = out + (t * geo.Hq + h * G) * kD;      // [G, kD]
    for (int64_t t0 = 0; t0 < n; t0 += ps) {  // pass 1: scores
      const float* k = k_cache + pages[t0 / ps] * geo.page_stride + h * kD;
      const int64_t rows = std::min(ps, n - t0);
      for (int64_t r = 0; r < rows; ++r, k += stride) {
        __m512 kr[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) kr[v] = _mm512_loadu_ps(k + 16 * v);
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qg + g * kD;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qr), kr[0]);
#pragma GCC unroll 8
          for (int v = 1; v < V; ++v) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * v), kr[v], acc);
          s[g * n_pad + t0 + r] = _mm512_reduce_add_ps(acc) * geo.scale;
        }
      }
    }
    softmax_rows(s, G, n, n_pad);
    std::fill(og, og + G * kD, 0.f);
    for (int64_t t0 = 0, rows = 0; t0 < n; t0 += rows) {  // pass 2: out[g] = sum_t p[g, t] v[t]
      rows = std::min({kRowBlock, n - t0, ps - t0 % ps});
      const float* v0 = v_cache + pages[t0 / ps] * geo.page_stride + (t0 % ps) * stride + h * kD;
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[v] = _mm512_loadu_ps(og + g * kD + 16 * v);
        const float* p = s + g * n_pad + t0;
        const float* vr = v0;
        for (int64_t i = 0; i < rows; ++i, vr += stride) {
          const __m512 w = _mm512_set1_ps(p[i]);
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16 * v), acc[v]);
        }
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(og + g * kD + 16 * v, acc[v]);
      }
    }
  }
}
#endif

}  // namespace

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& page_table, const at::Tensor& context_lens,
                               const std::optional<at::Tensor>& cu_seqlens_q, double scale) {
  return paged_attention_into_cpu(q, k_cache, v_cache, page_table, context_lens, cu_seqlens_q, scale,
                                  at::empty_like(q));
}

at::Tensor paged_attention_into_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& page_table, const at::Tensor& context_lens,
                                    const std::optional<at::Tensor>& cu_seqlens_q, double scale, at::Tensor out) {
  // A torch.profiler event (free when no profiler runs): it is called from C++ too, outside the dispatcher.
  RECORD_FUNCTION("dash::paged_attention", std::vector<c10::IValue>());
  constexpr const char* kOp = "paged_attention";
  check::fp32_cpu(kOp, "q", q, 3);              // [T, Hq, D]
  check::fp32_cpu(kOp, "k_cache", k_cache, 4);  // [P, page, Hkv, D]
  check::fp32_cpu(kOp, "v_cache", v_cache, 4);
  check::shape(kOp, "v_cache", v_cache, k_cache.sizes());
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t P = k_cache.size(0), ps = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "paged_attention: head shapes do not match: q ",
                    q.sizes(), ", caches ", k_cache.sizes());
  check::cpu_tensor(kOp, "page_table", page_table, at::kInt, 2);      // [B, W]
  check::cpu_tensor(kOp, "context_lens", context_lens, at::kInt, 1);  // [B]
  check::shape(kOp, "context_lens", context_lens, {page_table.size(0)});
  const int64_t B = page_table.size(0), W = page_table.size(1), G = Hq / Hkv;
  const int32_t* pt = page_table.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* cu = nullptr;  // [B + 1] query offsets; nullptr: one query per sequence (decode)
  if (cu_seqlens_q.has_value()) {
    check::cpu_tensor(kOp, "cu_seqlens_q", *cu_seqlens_q, at::kInt, 1);
    TORCH_CHECK_VALUE(cu_seqlens_q->numel() == B + 1, "paged_attention: cu_seqlens_q must hold B + 1 = ", B + 1,
                      " offsets, got ", cu_seqlens_q->numel());
    cu = cu_seqlens_q->data_ptr<int32_t>();
    TORCH_CHECK_VALUE(cu[0] == 0 && cu[B] == T, "paged_attention: cu_seqlens_q must run from 0 to T = ", T);
  } else {
    TORCH_CHECK_VALUE(T == B, "paged_attention: decode (no cu_seqlens_q) needs one query per sequence, got T = ", T,
                      " for B = ", B);
  }
  // Every check reads host memory before any work: a bad length or page id cannot cause an out-of-bounds read.
  std::vector<int32_t> seq_of(T), keys_of(T);
  int64_t max_keys = 0, total_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 1 && lens[b] <= W * ps, "paged_attention: context length out of range: ",
                      "context_lens[", b, "] = ", lens[b], " is outside [1, ", W * ps, "]");
    for (int64_t j = 0; j < (lens[b] + ps - 1) / ps; ++j) {
      TORCH_CHECK_VALUE(pt[b * W + j] >= 0 && pt[b * W + j] < P, "paged_attention: page id out of range: ",
                        "page_table[", b, ", ", j, "] = ", pt[b * W + j], " is outside [0, ", P, ")");
    }
    const int64_t first = cu ? cu[b] : b, q_len = cu ? cu[b + 1] - cu[b] : 1;
    TORCH_CHECK_VALUE(q_len >= 0 && q_len <= lens[b], "paged_attention: sequence ", b, " has ", q_len,
                      " queries but ", lens[b], " tokens in the cache (cu_seqlens_q must not decrease)");
    for (int64_t i = 0; i < q_len; ++i) {  // query i sees the keys at positions <= lens - q_len + i
      seq_of[first + i] = static_cast<int32_t>(b);
      keys_of[first + i] = static_cast<int32_t>(lens[b] - q_len + i + 1);
      total_keys += keys_of[first + i];
    }
    max_keys = std::max<int64_t>(max_keys, lens[b]);
  }
  check::fp32_cpu(kOp, "out", out);
  check::shape(kOp, "out", out, q.sizes());
  if (T == 0) return out;
  const Geometry geo{Hq, Hkv, G, D, ps, W, Hkv * D, ps * Hkv * D, static_cast<float>(scale)};
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int32_t* so = seq_of.data();
  const int32_t* ko = keys_of.data();
  const int64_t macs_per_task = std::max<int64_t>(1, 2 * G * D * total_keys / T);  // QK and PV, mean key count
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerChunk / macs_per_task);
  const bool avx512 = has_avx512();
  at::parallel_for(0, T * Hkv, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // grows to the largest G * context seen by this thread, never shrinks
    const size_t need = static_cast<size_t>(G * round_up_lanes(max_keys));
    if (scratch.size() < need) scratch.resize(need);
#ifdef DASH_HAS_AVX512_CODE
    if (avx512) {
      switch (D) {
        case 32: return attend_tasks_avx512<32>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
        case 64: return attend_tasks_avx512<64>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
        case 128: return attend_tasks_avx512<128>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
        default: break;
      }
    }
#endif
    switch (D) {  // the common head dims get a compile-time D: unrolled dot products, accumulators in registers
      case 32: return attend_tasks<32>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
      case 64: return attend_tasks<64>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
      case 128: return attend_tasks<128>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
      default: return attend_tasks<0>(begin, end, geo, qp, kp, vp, pt, so, ko, op, scratch.data());
    }
  });
  return out;
}

// Schema (dash_kernels/paged_attention.py registers its fake kernel): a new output like q. CPU only: on CUDA
// dash_kernels/paged_attention.py runs its Triton kernel.
TORCH_LIBRARY_FRAGMENT(dash, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor context_lens, "
        "Tensor? cu_seqlens_q, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace dash

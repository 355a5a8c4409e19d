// `linear_packed`: the sampler's fp32 CPU projections, out[M, N] = x[M, K] W[N, K]^T (+ bias), as an AVX-512 GEMM
// on weights packed once per generate call. dash_kernels/linear.py is the Python side, with the reference beside it
// (F.linear); tests: tests/kernels/test_linear.py.
//
// Why not at::linear: torch's CPU wheel calls MKL's sgemm, and MKL takes its AVX2 code on AMD CPUs. On this project's
// Zen 5 VM it ran the decode shapes (M=256, K=128..384, N=48..768) at ~108 GFLOP/s a core, where the 12 x 32
// micro-kernel below runs ~250 (benchmarks/results/linear.md). On a CPU without AVX-512 `has_avx512()` is false and
// the engine keeps at::linear.
//
// Packed layout: [P, K, 32] floats, panel p holding 32 output columns in k-major order, so one k step of a panel is
// two 16-float vector loads. `pack_linear` puts weight rows 32p..32p+31 in panel p (zeros past N); `pack_gate_up`
// puts gate rows 16p..16p+15 in columns 0..15 and up rows 16p..16p+15 in 16..31, so one tile holds both halves of
// SwiGLU and its epilogue writes silu(gate) * up without storing gate or up.
//
// Every output element is one fma chain over k = 0..K-1 in a single vector lane, the same whatever M, the tile or
// the thread: a row's result does not depend on the batch it is in (the sampler's batch-invariance test relies on
// it). Epilogues: store (acc + bias), accumulate (out += acc + bias: the residual add) and silu_mul.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_math.h"
#include "cpu_ops.h"

namespace dash {
namespace {

constexpr int64_t kPanel = 32;            // output columns per packed panel (two 16-float vectors)
constexpr int64_t kHalf = 16;             // floats per AVX-512 vector
constexpr int64_t kTileRows = 12;         // 12 x 2 accumulators + 2 weight vectors + 1 broadcast <= 32 registers
constexpr int64_t kRowsPerTask = 4 * kTileRows;  // rows of one parallel task (a panel stays in L1 across them)

enum class Epilogue { kStore, kAccumulate, kSiluMul };

#ifdef DASH_HAS_AVX512_CODE
constexpr bool kX86 = true;

// e^x with Cephes' polynomial (csrc/cpu_math.h), 2^k applied by scalef, which also gives inf / 0 past the range.
DASH_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(cpu::kExpMax + 1.f)), _mm512_set1_ps(-104.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(cpu::kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(cpu::kLn2Hi), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(cpu::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(cpu::kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(cpu::kExpPoly[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}

// One tile: R rows of x (row stride lda) times one packed panel, epilogue into out (row stride ldc). R = kTileRows
// for every full tile; a block's last rows take the R that fits (compile-time R: accumulators stay in registers).
// `cols` masks the valid output columns of each half (a partial last panel).
template <Epilogue E, int R>
DASH_AVX512 void tile(int64_t K, const float* __restrict a, int64_t lda, const float* __restrict b,
                      const float* __restrict bias, float* __restrict out, int64_t ldc, __mmask16 cols0,
                      __mmask16 cols1) {
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanel), b1 = _mm512_loadu_ps(b + k * kPanel + kHalf);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  if constexpr (E == Epilogue::kSiluMul) {  // silu(g) * u = g / (1 + e^-g) * u, 16 outputs per row
    for (int i = 0; i < R; ++i) {
      const __m512 g = acc[i][0];
      const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      _mm512_mask_storeu_ps(out + i * ldc, cols0, _mm512_mul_ps(s, acc[i][1]));
    }
  } else {
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(cols0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(cols1, bias + kHalf) : _mm512_setzero_ps();
    for (int i = 0; i < R; ++i) {
      __m512 y0 = bias ? _mm512_add_ps(acc[i][0], bias0) : acc[i][0];
      __m512 y1 = bias ? _mm512_add_ps(acc[i][1], bias1) : acc[i][1];
      float* o = out + i * ldc;
      if constexpr (E == Epilogue::kAccumulate) {  // out + (acc + bias), the order of x.add_(linear(...))
        y0 = _mm512_add_ps(_mm512_maskz_loadu_ps(cols0, o), y0);
        y1 = _mm512_add_ps(_mm512_maskz_loadu_ps(cols1, o + kHalf), y1);
      }
      _mm512_mask_storeu_ps(o, cols0, y0);
      _mm512_mask_storeu_ps(o + kHalf, cols1, y1);
    }
  }
}

DASH_AVX512 __mmask16 first_n(int64_t n) {
  return n >= kHalf ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(n, 0)) - 1);
}

// The tile for the last `rows` (< kTileRows) rows of a block: the same fma chains with fewer accumulators.
template <Epilogue E, int R = kTileRows - 1>
DASH_AVX512 void tail_tile(int64_t rows, int64_t K, const float* a, const float* b, const float* bias, float* out,
                           int64_t ldc, __mmask16 m0, __mmask16 m1) {
  if constexpr (R >= 1) {
    if (rows == R) return tile<E, R>(K, a, K, b, bias, out, ldc, m0, m1);
    return tail_tile<E, R - 1>(rows, K, a, b, bias, out, ldc, m0, m1);
  }
}

// Rows [r0, r1) of x times panel p.
template <Epilogue E>
DASH_AVX512 void rows_times_panel(int64_t r0, int64_t r1, int64_t p, int64_t K, int64_t n_out, const float* x,
                                  const float* packed, const float* bias, float* out) {
  const int64_t width = E == Epilogue::kSiluMul ? kHalf : kPanel;  // output columns a panel produces
  const int64_t c0 = p * width, valid = std::min(width, n_out - c0);
  const __mmask16 m0 = first_n(valid), m1 = first_n(valid - kHalf);
  const float* b = packed + p * K * kPanel;
  const float* pb = bias ? bias + c0 : nullptr;
  int64_t r = r0;
  for (; r + kTileRows <= r1; r += kTileRows) {
    tile<E, kTileRows>(K, x + r * K, K, b, pb, out + r * n_out + c0, n_out, m0, m1);
  }
  if (r < r1) tail_tile<E>(r1 - r, K, x + r * K, b, pb, out + r * n_out + c0, n_out, m0, m1);
}

bool cpu_supports_avx512() { return __builtin_cpu_supports("avx512f"); }
#else
constexpr bool kX86 = false;
bool cpu_supports_avx512() { return false; }
#endif

// Fills packed[P, K, 32]: column j of panel p <- the K floats at `row_of(p, j)` (nullptr: zeros).
template <typename RowOf>
void pack_panels(at::Tensor& packed, int64_t K, RowOf row_of) {
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t j = 0; j < kPanel; ++j) {
        const float* src = row_of(p, j);
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * kPanel + j] = src ? src[k] : 0.f;
      }
    }
  });
}

template <Epilogue E>
void run(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
         const std::optional<at::Tensor>& bias, at::Tensor& out) {
  RECORD_FUNCTION("dash::linear_packed", std::vector<c10::IValue>());  // benchmarks/sampler_profile.py's GEMM stage
  TORCH_CHECK_VALUE(has_avx512(), op, ": needs a CPU with AVX-512 (has_avx512() is false)");
  check::fp32_cpu(op, "x", x, 2);            // [M, K]
  check::fp32_cpu(op, "packed", packed, 3);  // [P, K, 32]
  check::fp32_cpu(op, "out", out, 2);        // [M, n_out]
  const int64_t M = x.size(0), K = x.size(1), width = E == Epilogue::kSiluMul ? kHalf : kPanel;
  TORCH_CHECK_VALUE(packed.size(1) == K && packed.size(2) == kPanel && packed.size(0) == (n_out + width - 1) / width,
                    op, ": packed ", packed.sizes(), " does not hold ", n_out, " outputs of x's K=", K);
  check::shape(op, "out", out, {M, n_out});
  if (bias.has_value()) {
    check::fp32_cpu(op, "bias", *bias, 1);
    check::shape(op, "bias", *bias, {n_out});
  }
#ifdef DASH_HAS_AVX512_CODE
  const int64_t P = packed.size(0), blocks = (M + kRowsPerTask - 1) / kRowsPerTask;
  const float *xp = x.data_ptr<float>(), *bp = packed.data_ptr<float>();
  const float* biasp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* op_ = out.data_ptr<float>();
  // Tasks panel-major: a thread's contiguous share covers whole panels, each reused across its row blocks.
  at::parallel_for(0, P * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / blocks, r0 = (t % blocks) * kRowsPerTask;
      rows_times_panel<E>(r0, std::min(M, r0 + kRowsPerTask), p, K, n_out, xp, bp, biasp, op_);
    }
  });
#endif
}

}  // namespace

bool has_avx512() {
  static const bool ok = kX86 && cpu_supports_avx512();
  return ok;
}

at::Tensor pack_linear_cpu(const at::Tensor& w) {
  check::fp32_cpu("pack_linear", "w", w, 2);  // [N, K]
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor packed = at::empty({(N + kPanel - 1) / kPanel, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  pack_panels(packed, K, [&](int64_t p, int64_t j) -> const float* {
    const int64_t n = p * kPanel + j;
    return n < N ? src + n * K : nullptr;
  });
  return packed;
}

at::Tensor pack_gate_up_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check::fp32_cpu("pack_gate_up", "gate", gate, 2);  // [I, K]
  check::fp32_cpu("pack_gate_up", "up", up, 2);      // [I, K]
  TORCH_CHECK_VALUE(gate.sizes() == up.sizes(), "pack_gate_up: gate and up must have one shape, got ", gate.sizes(),
                    " and ", up.sizes());
  const int64_t I = gate.size(0), K = gate.size(1);
  at::Tensor packed = at::empty({(I + kHalf - 1) / kHalf, K, kPanel}, gate.options());
  const float *g = gate.data_ptr<float>(), *u = up.data_ptr<float>();
  pack_panels(packed, K, [&](int64_t p, int64_t j) -> const float* {
    const int64_t n = p * kHalf + j % kHalf;
    return n < I ? (j < kHalf ? g : u) + n * K : nullptr;
  });
  return packed;
}

at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out,
                             bool accumulate) {
  TORCH_CHECK_VALUE(!accumulate || out.has_value(), "linear_packed: accumulate=True needs out");
  at::Tensor y = out.has_value() ? *out : at::empty({x.size(0), n_out}, x.options());
  if (accumulate) {
    run<Epilogue::kAccumulate>("linear_packed", x, packed, n_out, bias, y);
  } else {
    run<Epilogue::kStore>("linear_packed", x, packed, n_out, bias, y);
  }
  return y;
}

at::Tensor gate_up_silu_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
                                   const std::optional<at::Tensor>& out) {
  at::Tensor y = out.has_value() ? *out : at::empty({x.size(0), n_out}, x.options());
  run<Epilogue::kSiluMul>("gate_up_silu_packed", x, packed, n_out, std::nullopt, y);
  return y;
}

namespace {

// The torch ops' kernels: a functional form that returns a new output, and an in-place form (`out` written, or
// added to with accumulate) that returns nothing, so that no schema returns an alias of an argument.
at::Tensor linear_packed_op(const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
                            const std::optional<at::Tensor>& bias) {
  return linear_packed_cpu(x, packed, n_out, bias, std::nullopt, false);
}

void linear_packed_into_op(const at::Tensor& x, const at::Tensor& packed, int64_t n_out,
                           const std::optional<at::Tensor>& bias, at::Tensor& out, bool accumulate) {
  linear_packed_cpu(x, packed, n_out, bias, out, accumulate);
}

at::Tensor gate_up_silu_packed_op(const at::Tensor& x, const at::Tensor& packed, int64_t n_out) {
  return gate_up_silu_packed_cpu(x, packed, n_out, std::nullopt);
}

}  // namespace

// Schemas (dash_kernels/linear.py registers their fake kernels): packing makes a new [P, K, 32] tensor; the GEMMs
// read x [M, K] and a packed weight for n_out outputs. CPU only: on CUDA the sampler keeps cuBLAS.
TORCH_LIBRARY_FRAGMENT(dash, m) {
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def("pack_gate_up(Tensor gate, Tensor up) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor packed, int n_out, Tensor? bias=None) -> Tensor");
  m.def("linear_packed_into_(Tensor x, Tensor packed, int n_out, Tensor? bias, Tensor(a!) out, "
        "bool accumulate=False) -> ()");
  m.def("gate_up_silu_packed(Tensor x, Tensor packed, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) {
  m.impl("pack_linear", &pack_linear_cpu);
  m.impl("pack_gate_up", &pack_gate_up_cpu);
  m.impl("linear_packed", &linear_packed_op);
  m.impl("linear_packed_into_", &linear_packed_into_op);
  m.impl("gate_up_silu_packed", &gate_up_silu_packed_op);
}

}  // namespace dash

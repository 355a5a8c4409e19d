// Rotary position embedding for the sampler's CPU fp32 forward, in place, as a torch op (dash_kernels/rotary.py is
// the Python side, with the reference beside it; tests: tests/kernels/test_decode_ops.py):
//
//   rotary_(q[T, Hq, D]!, k[T, Hkv, D]!, cos[T, D], sin[T, D]) -> ()
//   x <- x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2])   (HF's "rotate half" layout)
//
// Why: the torch version is 7 ops per tensor (2 slices, neg, cat, 2 mul, add) and a new [T, H, D] tensor for each;
// here one pass rewrites q and k where they lie, each row of cos / sin read once for all heads of a token.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "cpu_math.h"
#include "cpu_ops.h"

namespace dash {
namespace {

// Tokens [begin, end) of one tensor x [T, H, D]; c, s: [T, D].
DASH_CPU_CLONES void rotate_tokens(int64_t begin, int64_t end, int64_t H, int64_t D, float* __restrict x,
                                   const float* __restrict c, const float* __restrict s) {
  const int64_t half = D / 2;
  for (int64_t t = begin; t < end; ++t) {
    const float* ct = c + t * D;
    const float* st = s + t * D;
    for (int64_t h = 0; h < H; ++h) {
      float* x1 = x + (t * H + h) * D;
      float* x2 = x1 + half;
      for (int64_t d = 0; d < half; ++d) {
        const float a = x1[d], b = x2[d];
        x1[d] = a * ct[d] - b * st[d];
        x2[d] = b * ct[half + d] + a * st[half + d];
      }
    }
  }
}

}  // namespace

void rotary_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check::fp32_cpu("rotary_", "q", q, 3);  // [T, Hq, D]
  check::fp32_cpu("rotary_", "k", k, 3);  // [T, Hkv, D]
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == T && k.size(2) == D && D % 2 == 0, "rotary_: q ", q.sizes(), " and k ", k.sizes(),
                    " must share T and an even head_dim");
  check::fp32_cpu("rotary_", "cos", cos, 2);
  check::fp32_cpu("rotary_", "sin", sin, 2);
  TORCH_CHECK_VALUE(cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
                    "rotary_: cos and sin must be [T=", T, ", D=", D, "], got ", cos.sizes(), " and ", sin.sizes());
  const int64_t Hq = q.size(1), Hkv = k.size(1);
  at::parallel_for(0, T, cpu::row_grain((Hq + Hkv) * D), [&](int64_t b, int64_t e) {
    rotate_tokens(b, e, Hq, D, q.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>());
    rotate_tokens(b, e, Hkv, D, k.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>());
  });
}

TORCH_LIBRARY_FRAGMENT(dash, m) { m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()"); }

TORCH_LIBRARY_IMPL(dash, CPU, m) { m.impl("rotary_", &rotary_cpu); }

}  // namespace dash

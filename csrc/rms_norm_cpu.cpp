// RMSNorm for the sampler's CPU fp32 forward, as torch ops (dash_kernels/rms_norm.py is the Python side, with the
// reference beside it; tests: tests/kernels/test_decode_ops.py):
//
//   rms_norm(x[N, H], weight[H], eps) -> out[N, H]                out = weight * (x / sqrt(mean(x^2) + eps))
//   add_rms_norm_(x[N, H]!, delta[N, H], weight[H], eps) -> out   x += delta (the residual add, in place), then
//                                                                 out = rms_norm(x)
//
// Why: the unfused torch version is 6 ops (float, pow, mean, add, rsqrt, 2 mul) plus the residual add, each a pass
// over [N, H] and a dispatch; at a tiny model's decode step they cost more than the projections they feed. One pass
// per row here, with the row in L1. Same operation order as dash.model.RMSNorm (x * inv, then weight *), so results
// differ from it only in the summation order of mean(x^2) (a few ulp).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"
#include "cpu_math.h"
#include "cpu_ops.h"

namespace dash {
namespace {

template <bool kAdd>
DASH_CPU_CLONES void rms_rows(int64_t begin, int64_t end, int64_t H, float eps, float* __restrict x,
                              const float* __restrict delta, const float* __restrict w, float* __restrict out) {
  for (int64_t r = begin; r < end; ++r) {
    float* xr = x + r * H;
    float* orow = out + r * H;
    if constexpr (kAdd) {
      const float* dr = delta + r * H;
      for (int64_t d = 0; d < H; ++d) xr[d] += dr[d];
    }
    const float inv = 1.f / std::sqrt(cpu::dot(xr, xr, H) / static_cast<float>(H) + eps);
    for (int64_t d = 0; d < H; ++d) orow[d] = w[d] * (xr[d] * inv);
  }
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check::fp32_cpu(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must be [..., H], got a 0-dim tensor");
  check::fp32_cpu(op, "weight", weight, 1);
  check::shape(op, "weight", weight, {x.size(-1)});
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_into_cpu(x, weight, eps, at::empty_like(x));
}

at::Tensor rms_norm_into_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor out) {
  check_args("rms_norm", x, weight);
  check::fp32_cpu("rms_norm", "out", out);
  check::shape("rms_norm", "out", out, x.sizes());
  const int64_t H = x.size(-1), N = H ? x.numel() / H : 0;
  float* xp = const_cast<float*>(x.data_ptr<float>());  // read only: kAdd=false never writes x
  at::parallel_for(0, N, cpu::row_grain(H), [&](int64_t b, int64_t e) {
    rms_rows<false>(b, e, H, static_cast<float>(eps), xp, nullptr, weight.data_ptr<float>(), out.data_ptr<float>());
  });
  return out;
}

at::Tensor add_rms_norm_cpu(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_args("add_rms_norm_", x, weight);
  check::fp32_cpu("add_rms_norm_", "delta", delta);
  check::shape("add_rms_norm_", "delta", delta, x.sizes());
  at::Tensor out = at::empty_like(x);
  const int64_t H = x.size(-1), N = H ? x.numel() / H : 0;
  at::parallel_for(0, N, cpu::row_grain(H), [&](int64_t b, int64_t e) {
    rms_rows<true>(b, e, H, static_cast<float>(eps), x.data_ptr<float>(), delta.data_ptr<float>(),
                   weight.data_ptr<float>(), out.data_ptr<float>());
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(dash, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm_", &add_rms_norm_cpu);
}

}  // namespace dash

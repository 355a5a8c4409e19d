// Token sampling for the sampler's CPU fp32 decode step, as one torch op (dash_kernels/sample.py is the Python side,
// with the torch reference beside it; tests: tests/kernels/test_sample.py):
//
//   sample_rows(logits[B, V], temperature[B], u[B] f64, stop_ids[B, S] i64, stop_active[B] bool)
//       -> (tokens[B] i64, logp[B] f32)
//
// Row b: stop tokens masked to -inf where stop_active[b] (min_new_tokens not reached; stop_ids -1 padded), then
// logp = log_softmax(logits / t) with t = temperature[b] (t <= 0: greedy, processed at t = 1 and the first argmax is
// taken); otherwise the token is drawn by inverse CDF at u[b] in (0, 1): the first token whose cumulative probability
// exceeds u * total. Returns the token and its processed log-prob (the loss's old_logp). Top-k / top-p are not here:
// the engine sends batches that use them through the torch path (dash/engine/sampling.py).
//
// Why: the torch version is ~15 ops over [B, V] (clone + pad + scatter for the mask, divide, log_softmax, exp, cumsum,
// nextafter, searchsorted, gather, ...), ~0.4 ms per decode step at B = 256, V = 48: a tenth of a tiny model's step.
// Here each row is two passes over V floats held in a thread-local buffer.
//
// Determinism: a row's result depends only on that row (not on B, the thread count or the other rows), so a seeded
// request samples the same tokens alone or in a batch. The cumulative sum is taken in fixed blocks of kBlock tokens
// (block sums with kLanes partial sums in a fixed order, then a sequential walk inside the crossing block), so it is
// not bit-identical to torch's sequential cumsum: a token can differ from the reference only when u * total falls
// within a few ulp of a cumulative boundary.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_math.h"

namespace dash {
namespace {

constexpr int64_t kBlock = 256;  // tokens per block of the cumulative sum: V / kBlock block sums are walked in order
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// e^x for x <= 0, exactly 0 for a masked token (x = -inf): it must never be drawn, not even with mass 1e-38.
inline float exp_or_zero(float x) {
  const float e = cpu::exp_nonpositive(x);
  return x < cpu::kExpMin ? 0.f : e;
}

// Sum of x[0:n] in double with kLanes partial sums combined in a fixed order (vectorisable, thread-count free).
inline double sum_double(const float* __restrict x, int64_t n) {
  double part[cpu::kLanes] = {};
  int64_t i = 0;
  for (; i + cpu::kLanes <= n; i += cpu::kLanes) {
    for (int j = 0; j < cpu::kLanes; ++j) part[j] += x[i + j];
  }
  double s = cpu::combine_lanes(part);
  for (; i < n; ++i) s += x[i];
  return s;
}

struct RowArgs {
  const float* logits;
  const float* temperature;
  const double* u;
  const int64_t* stop_ids;  // [B, S], -1 padded; nullptr when S == 0
  const bool* stop_active;
  int64_t V, S;
  int64_t* tokens;
  float* logp_out;
};

// Rows [begin, end). x: scratch of V floats (the processed log-probs, then the probabilities).
DASH_CPU_CLONES void sample_rows_range(int64_t begin, int64_t end, const RowArgs& a, float* __restrict x) {
  const int64_t V = a.V;
  for (int64_t b = begin; b < end; ++b) {
    const float* row = a.logits + b * V;
    const float t = a.temperature[b];
    const bool greedy = !(t > 0.f);
    const float inv_t = greedy ? 1.f : t;
    // Same arithmetic as the reference's `logits / t` (a division, not a multiply by 1 / t).
    for (int64_t v = 0; v < V; ++v) x[v] = row[v] / inv_t;
    if (a.S > 0 && a.stop_active[b]) {
      for (int64_t s = 0; s < a.S; ++s) {
        const int64_t id = a.stop_ids[b * a.S + s];
        if (id >= 0 && id < V) x[id] = kNegInf;
      }
    }
    float mx = x[0];
    int64_t arg = 0;
    for (int64_t v = 1; v < V; ++v) {  // first maximum, as torch.argmax
      if (x[v] > mx) mx = x[v], arg = v;
    }
    // log_softmax in torch's order: (x - max) - log(sum(exp(x - max))).
    float part[cpu::kLanes] = {};
    int64_t v = 0;
    for (; v + cpu::kLanes <= V; v += cpu::kLanes) {
      for (int j = 0; j < cpu::kLanes; ++j) part[j] += exp_or_zero(x[v + j] - mx);
    }
    float sum = cpu::combine_lanes(part);
    for (; v < V; ++v) sum += exp_or_zero(x[v] - mx);
    const float log_sum = std::log(sum);
    if (greedy) {
      a.tokens[b] = arg;
      a.logp_out[b] = (x[arg] - mx) - log_sum;
      continue;
    }
    // Probabilities of the processed distribution, in place: p[v] = exp(logp[v]).
    for (int64_t i = 0; i < V; ++i) x[i] = exp_or_zero((x[i] - mx) - log_sum);
    // Inverse CDF: block sums, find the block where the cumulative passes target, walk inside it.
    const int64_t nblocks = (V + kBlock - 1) / kBlock;
    double total = 0.0;
    thread_local std::vector<double> block_sum;
    if (static_cast<int64_t>(block_sum.size()) < nblocks) block_sum.resize(nblocks);
    for (int64_t k = 0; k < nblocks; ++k) {
      block_sum[k] = sum_double(x + k * kBlock, std::min(kBlock, V - k * kBlock));
      total += block_sum[k];
    }
    const double target = a.u[b] * total;  // u < 1, so target < total
    double cum = 0.0;
    int64_t k = 0;
    while (k + 1 < nblocks && cum + block_sum[k] <= target) cum += block_sum[k++];
    const int64_t lo = k * kBlock, hi = std::min(V, lo + kBlock);
    int64_t token = -1;
    for (int64_t i = lo; i < hi; ++i) {
      if (x[i] > 0.f) token = i;  // the last token with mass so far: the answer if rounding leaves cum <= target
      cum += x[i];
      if (x[i] > 0.f && cum > target) break;
    }
    if (token < 0) token = arg;  // an all-zero block cannot be chosen above; kept as a guard
    a.tokens[b] = token;
    a.logp_out[b] = (row[token] / inv_t - mx) - log_sum;  // the stop mask cannot hit a token with mass
  }
}

std::tuple<at::Tensor, at::Tensor> sample_rows_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                   const at::Tensor& u, const at::Tensor& stop_ids,
                                                   const at::Tensor& stop_active) {
  TORCH_CHECK_VALUE(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                        logits.dim() == 2 && logits.size(1) > 0,
                    "sample_rows: logits must be contiguous fp32 CPU [B, V] with V >= 1, got ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  auto check_vec = [B](const at::Tensor& t, at::ScalarType dtype, const char* name) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 1 &&
                          t.size(0) == B,
                      "sample_rows: ", name, " must be contiguous CPU ", dtype, " [B=", B, "], got ",
                      t.scalar_type(), " ", t.sizes());
  };
  check_vec(temperature, at::kFloat, "temperature");
  check_vec(u, at::kDouble, "u");
  check_vec(stop_active, at::kBool, "stop_active");
  TORCH_CHECK_VALUE(stop_ids.device().is_cpu() && stop_ids.scalar_type() == at::kLong && stop_ids.is_contiguous() &&
                        stop_ids.dim() == 2 && stop_ids.size(0) == B,
                    "sample_rows: stop_ids must be contiguous CPU int64 [B=", B, ", S], got ", stop_ids.sizes());
  const double* up = u.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(up[b] > 0.0 && up[b] < 1.0, "sample_rows: u must be in (0, 1), got ", up[b], " at row ", b);
  }
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({B}, logits.options());
  const RowArgs args{logits.data_ptr<float>(), temperature.data_ptr<float>(), up,
                     stop_ids.size(1) ? stop_ids.data_ptr<int64_t>() : nullptr, stop_active.data_ptr<bool>(),
                     V, stop_ids.size(1), tokens.data_ptr<int64_t>(), logp.data_ptr<float>()};
  at::parallel_for(0, B, cpu::row_grain(V), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // grows to the largest V seen by this thread
    if (static_cast<int64_t>(scratch.size()) < V) scratch.resize(V);
    sample_rows_range(begin, end, args, scratch.data());
  });
  return {tokens, logp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dash, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor u, Tensor stop_ids, Tensor stop_active) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) { m.impl("sample_rows", &sample_rows_cpu); }

}  // namespace dash

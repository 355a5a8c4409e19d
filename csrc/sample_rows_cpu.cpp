// Token sampling for the sampler's CPU fp32 decode step, as one torch op (dash_kernels/sample_rows.py is the Python
// side, with the torch reference beside it; tests: tests/kernels/test_sample.py):
//
//   sample_rows(logits[B, V], temperature[B], u[B] f64, stop_ids[B, S] i64, stop_active[B] bool,
//               top_k[B] i64 = None, top_p[B] f32 = None) -> (tokens[B] i64, logp[B] f32)
//
// Row b: stop tokens masked to -inf where stop_active[b] (min_new_tokens not reached; stop_ids -1 padded), then
// x = logits / t with t = temperature[b] (t <= 0: greedy, processed at t = 1 and the first argmax is taken). Top-k and
// top-p are one threshold tau = max(tau_k, tau_p): the row keeps x >= tau (dash_kernels/sample_rows.py's docstring and
// `filter_threshold_ref` define both: tau_k is the k-th largest x, ties kept; tau_p the smallest kept x whose mass
// before it, under the softmax of the top-k-kept x, is < top_p). logp = log_softmax of x over the kept tokens; a
// sampled row draws by inverse CDF at u[b] in (0, 1): the first token whose cumulative probability exceeds u * total.
// Returns the token and its processed log-prob (the loss's old_logp).
//
// Why: the torch version is ~15 ops over [B, V] (clone + pad + scatter for the mask, divide, log_softmax, exp, cumsum,
// nextafter, searchsorted, gather, ...) and, with top-k, a sort of [B, V]. Here each row is a few passes over V floats
// held in a thread-local buffer; top-k is an nth_element over a copy of the row (O(V)), and only the k kept values
// are sorted, and only when top-p needs their order (top-p without top-k sorts the row).
//
// Determinism: a row's result depends only on that row (not on B, the thread count or the other rows), so a seeded
// request samples the same tokens alone or in a batch. The cumulative sum is taken in fixed blocks of kBlock tokens
// (block sums with kLanes partial sums in a fixed order, then a sequential walk inside the crossing block), so it is
// not bit-identical to torch's sequential cumsum: a token can differ from the reference only when u * total falls
// within a few ulp of a cumulative boundary. The top-p cumulative mass is accumulated in double and rounded to float
// at each step, as torch's CPU cumsum does; the softmax denominator is summed in another order than torch's, so the
// kept set can differ from the reference only when a mass lies within a few ulp of top_p.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
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
  const int64_t* top_k;  // nullptr: no filter (then top_p is nullptr too)
  const float* top_p;
  int64_t V, S;
  int64_t* tokens;
  float* logp_out;
};

// tau of the module comment for x[0:V] (temperature applied, stops masked); -inf keeps every token.
// ranked: scratch of V floats.
float filter_threshold(const float* __restrict x, int64_t V, int64_t top_k, float top_p, float* __restrict ranked) {
  const bool use_p = top_p < 1.f;
  if (top_k <= 0 && !use_p) return kNegInf;
  const int64_t k = top_k > 0 ? std::min(top_k, V) : 0;
  const int64_t width = k > 0 ? k : V;  // the sorted prefix top-p reads: the k kept values, or the whole row
  std::copy(x, x + V, ranked);
  float tau_k = kNegInf;
  if (k > 0) {
    std::nth_element(ranked, ranked + (k - 1), ranked + V, std::greater<float>());
    tau_k = ranked[k - 1];  // the k-th largest value; ranked[0:k] holds the k largest, unordered
  }
  if (!use_p) return tau_k;
  std::sort(ranked, ranked + width, std::greater<float>());
  const float m = ranked[0];
  // Softmax denominator over every x >= tau_k (ties past position k included), as the reference's masked sum.
  float part[cpu::kLanes] = {};
  int64_t v = 0;
  for (; v + cpu::kLanes <= V; v += cpu::kLanes) {
    for (int j = 0; j < cpu::kLanes; ++j) part[j] += x[v + j] >= tau_k ? exp_or_zero(x[v + j] - m) : 0.f;
  }
  float z = cpu::combine_lanes(part);
  for (; v < V; ++v) z += x[v] >= tau_k ? exp_or_zero(x[v] - m) : 0.f;
  // Largest first: the mass before position i is cumsum - p (a tied group starts where it is the mass of strictly
  // larger values); tau_p is the last value with mass before it < top_p, and the threshold keeps its whole group.
  double cum = 0.0;
  float tau_p = ranked[0];
  for (int64_t i = 0; i < width && ranked[i] >= tau_k; ++i) {
    const float p = exp_or_zero(ranked[i] - m) / z;
    cum += p;
    if (static_cast<float>(cum) - p >= top_p) break;
    tau_p = ranked[i];
  }
  return std::max(tau_k, tau_p);
}

// Rows [begin, end). x: scratch of V floats (the processed log-probs, then the probabilities); ranked: V more.
DASH_CPU_CLONES void sample_rows_range(int64_t begin, int64_t end, const RowArgs& a, float* __restrict x,
                                       float* __restrict ranked) {
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
    if (a.top_k != nullptr) {
      const float tau = filter_threshold(x, V, a.top_k[b], a.top_p[b], ranked);
      if (tau > kNegInf) {
        for (int64_t v = 0; v < V; ++v) x[v] = x[v] >= tau ? x[v] : kNegInf;
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
    a.logp_out[b] = (row[token] / inv_t - mx) - log_sum;  // neither mask can hit a token with mass
  }
}

std::tuple<at::Tensor, at::Tensor> sample_rows_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                                   const at::Tensor& u, const at::Tensor& stop_ids,
                                                   const at::Tensor& stop_active,
                                                   const std::optional<at::Tensor>& top_k,
                                                   const std::optional<at::Tensor>& top_p) {
  check::fp32_cpu("sample_rows", "logits", logits, 2);  // [B, V]
  TORCH_CHECK_VALUE(logits.size(1) > 0, "sample_rows: logits must be [B, V] with V >= 1, got ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  auto check_vec = [B](const at::Tensor& t, at::ScalarType dtype, const char* name) {  // [B]
    check::cpu_tensor("sample_rows", name, t, dtype, 1);
    check::shape("sample_rows", name, t, {B});
  };
  check_vec(temperature, at::kFloat, "temperature");
  check_vec(u, at::kDouble, "u");
  check_vec(stop_active, at::kBool, "stop_active");
  check::cpu_tensor("sample_rows", "stop_ids", stop_ids, at::kLong, 2);  // [B, S]
  TORCH_CHECK_VALUE(stop_ids.size(0) == B, "sample_rows: stop_ids must be [B=", B, ", S], got ", stop_ids.sizes());
  TORCH_CHECK_VALUE(top_k.has_value() == top_p.has_value(),
                    "sample_rows: give top_k and top_p together (top_k 0 / top_p 1 turn one off), or neither");
  const int64_t* kp = nullptr;
  const float* pp = nullptr;
  if (top_k.has_value()) {
    check_vec(*top_k, at::kLong, "top_k");
    check_vec(*top_p, at::kFloat, "top_p");
    kp = top_k->data_ptr<int64_t>();
    pp = top_p->data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(kp[b] >= 0, "sample_rows: top_k must be >= 0, got ", kp[b], " at row ", b);
      TORCH_CHECK_VALUE(pp[b] > 0.f && pp[b] <= 1.f, "sample_rows: top_p must be in (0, 1], got ", pp[b],
                        " at row ", b);
    }
  }
  const double* up = u.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(up[b] > 0.0 && up[b] < 1.0, "sample_rows: u must be in (0, 1), got ", up[b], " at row ", b);
  }
  at::Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({B}, logits.options());
  const RowArgs args{logits.data_ptr<float>(), temperature.data_ptr<float>(), up,
                     stop_ids.size(1) ? stop_ids.data_ptr<int64_t>() : nullptr, stop_active.data_ptr<bool>(), kp, pp,
                     V, stop_ids.size(1), tokens.data_ptr<int64_t>(), logp.data_ptr<float>()};
  at::parallel_for(0, B, cpu::row_grain(V), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // grows to the largest 2 V seen by this thread
    if (static_cast<int64_t>(scratch.size()) < 2 * V) scratch.resize(2 * V);
    sample_rows_range(begin, end, args, scratch.data(), scratch.data() + V);
  });
  return {tokens, logp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dash, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor u, Tensor stop_ids, Tensor stop_active, "
        "Tensor? top_k=None, Tensor? top_p=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dash, CPU, m) { m.impl("sample_rows", &sample_rows_cpu); }

}  // namespace dash

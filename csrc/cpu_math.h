// Small CPU helpers shared by the fp32 kernels in csrc/*_cpu.cpp: the per-CPU code clones, a branch-free exp and
// lane-split reductions. Everything is written so GCC/clang vectorise it WITHOUT -ffast-math (a float sum may not be
// reordered, so reductions keep kLanes independent partial sums, combined in a fixed order: results do not depend
// on the thread count).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// On x86-64 Linux the hot loops are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the
// SSE2 baseline, and the loader picks one (target_clones): the wheel still runs on any x86-64. The loops keep their
// own partial sums (kLanes), so the three give the same bits.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DASH_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DASH_CPU_CLONES
#endif

// Functions written with AVX-512 intrinsics (csrc/linear_cpu.cpp, csrc/paged_attention_cpu.cpp): compiled for it
// whatever the build flags, and called only when has_avx512() (csrc/cpu_ops.h) says the CPU runs it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DASH_HAS_AVX512_CODE 1
#define DASH_AVX512 __attribute__((target("avx512f,fma")))
#endif

namespace dash {
namespace cpu {

constexpr int kLanes = 8;  // independent partial sums per reduction (SIMD lanes for the auto-vectoriser)

// Cephes' expf: x = k ln2 + r with |r| <= ln2 / 2, e^r from a degree-6 polynomial (relative error ~2e-7, about
// 1.5 ulp), 2^k written straight into the exponent bits. Valid for x in [kExpMin, kExpMax]; callers clamp.
constexpr float kExpMin = -87.33654f;  // ln(2^-126): below it 2^k would not be a normal float (e^x ~ 0 there)
constexpr float kExpMax = 88.0f;       // keeps k <= 127 (2^128 is not a float); e^88 = 1.65e38
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 split in two so k * kLn2Hi is exact (Cody-Waite reduction)
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: (y + M) - M rounds y to the nearest integer in fp32
// e^r - 1 - r ~ r^2 (c0 + c1 r + ... + c5 r^5), Horner from kExpPoly[0] (= c5) down to kExpPoly[5] (= c0).
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// e^x for x already in [kExpMin, kExpMax].
inline float exp_in_range(float x) {
  const float k = (x * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * (r * r) + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

// e^x for x <= 0 (scores minus their row max). A NaN stays NaN (std::max returns its first argument when unordered).
inline float exp_nonpositive(float x) { return exp_in_range(std::max(x, kExpMin)); }

// The kLanes partial sums of a reduction combined in one fixed tree (the same order whatever the thread count).
template <typename T>
inline T combine_lanes(const T (&part)[kLanes]) {
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// a . b over n floats (any n; a == b is fine, both are only read), kLanes partial sums then a fixed-order tree.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[d + j] * b[d + j];
  }
  float sum = combine_lanes(acc);
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// Rows per at::parallel_for chunk so a chunk holds at least ~kMinFloatsPerChunk floats (a few microseconds): a small
// decode batch then stays on one thread instead of paying the pool's wake-up.
constexpr int64_t kMinFloatsPerChunk = 1 << 14;
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, kMinFloatsPerChunk / std::max<int64_t>(1, row_len));
}

}  // namespace cpu
}  // namespace dash

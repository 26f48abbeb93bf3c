// Helpers shared by the native CPU kernels (logprobs_cpu.cpp, divergence_cpu.cpp): instruction-set
// clones, dtype conversion by bit manipulation, branch-free exp and log that vectorize, and the row
// scheduler. Everything here has internal linkage and is force-inlined, so each kernel file compiles it
// into its own clones with their instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "row_args.h"  // DType

// x86-64-v3 adds AVX2 + FMA + F16C, x86-64-v4 adds AVX-512; both measurably beat the SSE2 baseline
// on the exp-bound loops. ifunc dispatch needs GCC on ELF; elsewhere the baseline build is used.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define FP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FP_CLONES_NAME "x86-64-v4/x86-64-v3/baseline"
#else
#define FP_CLONES
#define FP_CLONES_NAME "baseline"
#endif

// Every helper must inline into the clones above to get their instruction set.
#if defined(__GNUC__)
#define FP_INLINE inline __attribute__((always_inline))
#else
#define FP_INLINE inline
#endif

namespace fastpref {
namespace cpu {
namespace {

constexpr int kChunk = 2048;  // 8 KiB of fp32 scratch per row chunk: stays in L1 next to the stream
constexpr float kInf = std::numeric_limits<float>::infinity();

FP_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FP_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2, with the Cephes expf polynomial
// (about 1 ulp). Branch-free so it vectorizes. Results below 2^-126 are flushed to 0, which also
// sends -inf to exactly 0; NaN propagates.
FP_INLINE float fast_exp(float x) {
  const float hi = 88.3762626647949f;  // n stays <= 127
  const float lo = -87.3365447505531f;  // ln(2^-126): n stays >= -126
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  float xc = x > hi ? hi : x;
  float t = xc * 1.44269504088896341f + round_magic;
  float n = t - round_magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // The low 9 bits of t's pattern are n (mod 2^9): shifting by 23 keeps exactly the biased exponent.
  float scale = from_bits((to_bits(t) + 127u) << 23);
  float y = p * scale;
  return x < lo ? 0.0f : y;
}

// log(x) = e ln2 + log1p(f), x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)) found from the bits
// alone (as musl's logf does), then the Cephes logf polynomial (about 1 ulp). Branch-free so it
// vectorizes; subnormals are scaled up first, and 0, +inf, negatives and NaN give -inf, +inf, NaN, NaN.
// log(1) is exactly 0.
FP_INLINE float fast_log(float x) {
  const bool subnormal = x < 1.17549435e-38f;  // 2^-126
  const float xs = subnormal ? x * 8388608.0f : x;  // 2^23
  // Adding bits(1) - bits(sqrt(1/2)) carries into the exponent exactly when the significand is >= sqrt(2);
  // putting sqrt(1/2)'s bits back then leaves 1 + f in [sqrt(1/2), sqrt(2)).
  const uint32_t ix = to_bits(xs) + (0x3f800000u - 0x3f3504f3u);
  const float e = float(int32_t(ix >> 23) - 127) - (subnormal ? 23.0f : 0.0f);
  const float f = from_bits((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = p * f * f2 + e * -2.12194440e-4f - 0.5f * f2;
  y = f + y + e * 0.693359375f;
  const float special = x == 0.0f ? -kInf : (x == kInf ? kInf : std::numeric_limits<float>::quiet_NaN());
  return x > 0.0f && x < kInf ? y : special;
}

// IEEE half <-> float by bit manipulation (F. Giesen's branch-free conversions, round to nearest even).
FP_INLINE float half_to_float(uint16_t h) {
  uint32_t o = (uint32_t(h) & 0x7fffu) << 13;
  uint32_t e = o & 0x0f800000u;
  o += (127u - 15u) << 23;
  uint32_t inf_nan = o + ((128u - 16u) << 23);
  uint32_t subnormal = to_bits(from_bits(o + (1u << 23)) - from_bits(113u << 23));
  uint32_t r = e == 0x0f800000u ? inf_nan : (e == 0 ? subnormal : o);
  return from_bits(r | ((uint32_t(h) & 0x8000u) << 16));
}

FP_INLINE uint16_t float_to_half(float x) {
  uint32_t f = to_bits(x);
  uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t overflow = f > (255u << 23) ? 0x7e00u : 0x7c00u;
  uint32_t subnormal = to_bits(from_bits(f) + from_bits(denorm_magic)) - denorm_magic;
  uint32_t normal = (f + (uint32_t(15 - 127) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
  uint32_t o = f >= f16_max ? overflow : (f < (113u << 23) ? subnormal : normal);
  return uint16_t(o | (sign >> 16));
}

FP_INLINE float bf16_to_float(uint16_t h) { return from_bits(uint32_t(h) << 16); }

FP_INLINE uint16_t float_to_bf16(float x) {
  uint32_t f = to_bits(x);
  uint32_t rounded = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (f >> 16) | 0x40u;
  return uint16_t((f & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

template <int DT> struct Elem;
template <> struct Elem<kFloat32> {
  using T = float;
  static FP_INLINE float load(float v) { return v; }
  static FP_INLINE float store(float v) { return v; }
};
template <> struct Elem<kBFloat16> {
  using T = uint16_t;
  static FP_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static FP_INLINE uint16_t store(float v) { return float_to_bf16(v); }
};
template <> struct Elem<kFloat16> {
  using T = uint16_t;
  static FP_INLINE float load(uint16_t v) { return half_to_float(v); }
  static FP_INLINE uint16_t store(float v) { return float_to_half(v); }
};

// The `omp simd` reductions let GCC reassociate these sums and maxes into vector lanes without
// -ffast-math, which we cannot use because NaN and -inf logits must keep their meaning.
// A NaN logit may be skipped by the max, but then it reaches the sum and still poisons the row.
FP_INLINE float block_max(const float* __restrict z, int len) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < len; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// Rows go out in contiguous blocks, dynamically scheduled: about kBlocksPerThread blocks per thread
// keeps the threads balanced when ignored (free) rows come in runs, while long contiguous runs keep
// the hardware prefetchers streaming (1-row blocks measured ~10% slower than a static split).
// kMinBlockElems amortizes the scheduling for tiny V.
constexpr int64_t kBlocksPerThread = 16;
constexpr int64_t kMinBlockElems = 1 << 15;

// fn(args, r0, r1) handles rows [r0, r1); Args needs the row count n and the row length V.
template <class Args, class Fn>
void parallel_rows(const Args& a, int num_threads, Fn fn) {
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  const int threads = 1;
#endif
  const int64_t rows_per_block = std::max({int64_t(1), kMinBlockElems / std::max<int64_t>(a.V, 1),
                                           (a.n + threads * kBlocksPerThread - 1) / (threads * kBlocksPerThread)});
  const int64_t blocks = (a.n + rows_per_block - 1) / rows_per_block;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && blocks > 1)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * rows_per_block;
    fn(a, r0, std::min(a.n, r0 + rows_per_block));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastpref

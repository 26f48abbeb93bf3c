// CPU twin of the row-kernel contract in fastpref/kernels/reference.py.
//
// Every row is streamed once through an L1-sized fp32 scratch chunk: the chunk is converted
// (dtype, softcap, temperature) once, then reduced or differentiated from L1, so logits cross the
// memory bus exactly once per pass and the transcendental work is done once per element.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "logprobs_cpu.h"

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

// Cephes tanhf: an odd polynomial for |x| < 0.625, where 1 - 2 / (e^{2x} + 1) would cancel.
FP_INLINE float fast_tanh(float x) {
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float small = p * z * x + x;
  float big = 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
  float ax = x < 0.0f ? -x : x;
  return ax < 0.625f ? small : big;
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

struct Scaling {
  float inv_temperature;
  float inv_softcap;   // x -> tanh(x / c)
  float cap_scale;     // c / T: tanh -> z
  float z_to_tanh;     // T / c: z -> tanh, for the softcap derivative
};

Scaling make_scaling(float temperature, float softcap) {
  Scaling s;
  s.inv_temperature = 1.0f / temperature;
  s.inv_softcap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
  s.cap_scale = softcap / temperature;
  s.z_to_tanh = softcap > 0.0f ? temperature / softcap : 0.0f;
  return s;
}

template <int DT, bool CAP>
FP_INLINE float to_z(typename Elem<DT>::T v, const Scaling& sc) {
  float x = Elem<DT>::load(v);
  return CAP ? sc.cap_scale * fast_tanh(x * sc.inv_softcap) : x * sc.inv_temperature;
}

template <int DT, bool CAP>
FP_INLINE void load_z(const typename Elem<DT>::T* __restrict x, float* __restrict z, int len,
                      const Scaling& sc) {
  for (int i = 0; i < len; ++i) z[i] = to_z<DT, CAP>(x[i], sc);
}

// The `omp simd` reductions let GCC reassociate these sums and maxes into vector lanes without
// -ffast-math, which we cannot use because NaN and -inf logits must keep their meaning.
// A NaN logit may be skipped by the max, but then it reaches the sum and still poisons the row.
FP_INLINE float block_max(const float* __restrict z, int len) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int i = 0; i < len; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// Adds sum exp(z - m) to s and, with ENT, sum exp(z - m) * (z - m) to t. The entropy term is kept
// relative to m so H = log(s) - t / s never cancels two large numbers; a -inf logit contributes
// p log p = 0 rather than 0 * -inf.
template <bool ENT>
FP_INLINE void block_sum(const float* __restrict z, int len, float m, float& s, float& t) {
  float bs = 0.0f, bt = 0.0f;
#pragma omp simd reduction(+ : bs, bt)
  for (int i = 0; i < len; ++i) {
    const float d = z[i] - m;
    const float e = fast_exp(d);
    bs += e;
    if (ENT) bt += e == 0.0f ? 0.0f : e * d;
  }
  s += bs;
  if (ENT) t += bt;
}

FP_INLINE bool any_nan(const float* __restrict z, int len) {
  bool nan = false;
  for (int i = 0; i < len; ++i) nan |= z[i] != z[i];
  return nan;
}

FP_INLINE bool valid_label(int64_t y, int64_t V, int64_t ignore_index) {
  return y != ignore_index && y >= 0 && y < V;
}

template <int DT, bool CAP, bool ENT>
FP_INLINE void fwd_rows(const FwdArgs& a, int64_t r0, int64_t r1) {
  using T = typename Elem<DT>::T;
  const Scaling sc = make_scaling(a.temperature, a.softcap);
  alignas(64) float z[kChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t y = a.labels[row];
    if (!valid_label(y, a.V, a.ignore_index)) {
      a.logp[row] = 0.0f;
      a.lse[row] = 0.0f;
      if (ENT) a.entropy[row] = 0.0f;
      continue;
    }
    const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
    // Online softmax over chunks: m is the running max, s = sum exp(z - m), t = sum exp(z - m) (z - m).
    // Nothing in this loop may branch on the chunk index (e.g. "is the label in this chunk"): GCC's
    // -O3 loop splitting would then copy the body and drop the `omp simd` marks, leaving the sums
    // scalar (slower, and ~1e-6 less accurate).
    float m = -kInf, s = 0.0f, t = 0.0f;
    for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
      const int len = int(std::min<int64_t>(kChunk, a.V - c0));
      load_z<DT, CAP>(x + c0, z, len, sc);
      const float cm = block_max(z, len);
      if (!(cm <= m)) {  // a larger max, or NaN
        if (s != 0.0f) {
          const float shift = m - cm;
          const float alpha = fast_exp(shift);
          if (ENT) t = alpha * (t + shift * s);
          s *= alpha;
        }
        m = cm;
      }
      if (m == -kInf) {  // every logit so far is -inf (adds nothing) or NaN (the max skips it)
        if (any_nan(z, len)) s = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      block_sum<ENT>(z, len, m, s, t);
    }
    const float log_s = std::log(s);
    const float lse = m + log_s;
    a.lse[row] = lse;
    // z_y goes through memory so it is rounded exactly as the vector loop rounded it: fused into the
    // subtraction (FMA contraction) it could make logp slightly positive.
    const volatile float zy = to_z<DT, CAP>(x[y], sc);
    a.logp[row] = zy - lse;
    if (ENT) a.entropy[row] = log_s - t / s;
  }
}

// dL/dz_v without the label's 1[v == y] * g_logp term. p == 0 guards -inf logits, where
// gh * (z - mu) would turn a zero gradient into NaN.
FP_INLINE float grad_z(float z, float lse, float gl, float gh, float mu) {
  const float p = fast_exp(z - lse);
  return p == 0.0f ? 0.0f : -p * (gl + gh * (z - mu));
}

// dz/dx from z itself: 1/T, times 1 - tanh(x/c)^2 = 1 - (z T / c)^2 when softcapped.
template <bool CAP>
FP_INLINE float dz_dx(float z, const Scaling& sc) {
  if (!CAP) return sc.inv_temperature;
  const float th = z * sc.z_to_tanh;
  return sc.inv_temperature * (1.0f - th * th);
}

template <int DI, int DO, bool CAP>
FP_INLINE void bwd_rows(const BwdArgs& a, int64_t r0, int64_t r1) {
  using TI = typename Elem<DI>::T;
  using TO = typename Elem<DO>::T;
  const Scaling sc = make_scaling(a.temperature, a.softcap);
  const bool has_entropy = a.entropy != nullptr && a.grad_entropy != nullptr;
  alignas(64) float z[kChunk];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t y = a.labels[row];
    TO* out = static_cast<TO*>(a.out) + row * a.out_row_stride;
    if (!valid_label(y, a.V, a.ignore_index)) {
      std::memset(static_cast<void*>(out), 0, sizeof(TO) * size_t(a.V));  // all-zero bits are +0 in every dtype
      continue;
    }
    const TI* x = static_cast<const TI*>(a.x) + row * a.x_row_stride;
    const float lse = a.lse[row];
    const float gl = a.grad_logp ? a.grad_logp[row] : 0.0f;
    const float gh = has_entropy ? a.grad_entropy[row] : 0.0f;
    const float mu = has_entropy ? lse - a.entropy[row] : 0.0f;
    // out may alias x: x[y] is read before the row is written, and each chunk is fully read into z
    // before any of it is written.
    const float zy = to_z<DI, CAP>(x[y], sc);
    for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
      const int len = int(std::min<int64_t>(kChunk, a.V - c0));
      load_z<DI, CAP>(x + c0, z, len, sc);
      TO* o = out + c0;
      for (int i = 0; i < len; ++i)
        o[i] = Elem<DO>::store(grad_z(z[i], lse, gl, gh, mu) * dz_dx<CAP>(z[i], sc));
    }
    out[y] = Elem<DO>::store((grad_z(zy, lse, gl, gh, mu) + gl) * dz_dx<CAP>(zy, sc));
  }
}

// The instruction-set clones sit here, below the OpenMP outlining, so each thread runs the clone
// picked for the CPU; the switches cost nothing next to a block of rows.
FP_CLONES void fwd_block(const FwdArgs& a, int64_t r0, int64_t r1) {
  const bool cap = a.softcap > 0.0f;
  const bool ent = a.entropy != nullptr;
#define FP_FWD(DT)                                       \
  if (cap) {                                             \
    if (ent) fwd_rows<DT, true, true>(a, r0, r1);        \
    else fwd_rows<DT, true, false>(a, r0, r1);           \
  } else {                                               \
    if (ent) fwd_rows<DT, false, true>(a, r0, r1);       \
    else fwd_rows<DT, false, false>(a, r0, r1);          \
  }
  switch (a.x_dtype) {
    case kFloat32: FP_FWD(kFloat32) break;
    case kBFloat16: FP_FWD(kBFloat16) break;
    case kFloat16: FP_FWD(kFloat16) break;
  }
#undef FP_FWD
}

template <int DI>
FP_INLINE void bwd_block_in(const BwdArgs& a, int64_t r0, int64_t r1) {
  const bool cap = a.softcap > 0.0f;
#define FP_BWD(DO)                                 \
  if (cap) bwd_rows<DI, DO, true>(a, r0, r1);      \
  else bwd_rows<DI, DO, false>(a, r0, r1);
  switch (a.out_dtype) {
    case kFloat32: FP_BWD(kFloat32) break;
    case kBFloat16: FP_BWD(kBFloat16) break;
    case kFloat16: FP_BWD(kFloat16) break;
  }
#undef FP_BWD
}

FP_CLONES void bwd_block(const BwdArgs& a, int64_t r0, int64_t r1) {
  switch (a.x_dtype) {
    case kFloat32: bwd_block_in<kFloat32>(a, r0, r1); break;
    case kBFloat16: bwd_block_in<kBFloat16>(a, r0, r1); break;
    case kFloat16: bwd_block_in<kFloat16>(a, r0, r1); break;
  }
}

// Rows go out in contiguous blocks, dynamically scheduled: about kBlocksPerThread blocks per thread
// keeps the threads balanced when ignored (free) rows come in runs, while long contiguous runs keep
// the hardware prefetchers streaming (1-row blocks measured ~10% slower than a static split).
// kMinBlockElems amortizes the scheduling for tiny V.
constexpr int64_t kBlocksPerThread = 16;
constexpr int64_t kMinBlockElems = 1 << 15;

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

void logprobs_fwd(const FwdArgs& args, int num_threads) {
  parallel_rows(args, num_threads, fwd_block);
}

void logprobs_bwd(const BwdArgs& args, int num_threads) {
  if (args.V == 0) return;  // nothing to write, and out may be null
  parallel_rows(args, num_threads, bwd_block);
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string build_info() {
  std::string info;
#if defined(__clang__)
  info += "compiler: clang " __clang_version__;
#elif defined(__GNUC__)
  info += "compiler: gcc " __VERSION__;
#else
  info += "compiler: unknown";
#endif
#ifdef _OPENMP
  info += "; openmp: on (" + std::to_string(_OPENMP) + ")";
#else
  info += "; openmp: off";
#endif
  info += "; isa: " FP_CLONES_NAME;
  return info;
}

}  // namespace cpu
}  // namespace fastpref

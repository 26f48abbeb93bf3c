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

#include "common_cpu.h"
#include "logprobs_cpu.h"

namespace fastpref {
namespace cpu {
namespace {

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

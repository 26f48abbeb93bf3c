// The f-divergence terms at one element, shared by the CPU (divergence_cpu.cpp) and CUDA (divergence_cuda.cu)
// kernels so that both compute them alike: p, q and fastpref.divergences' qf = q f(p / q), pa = p f'(p / q),
// qb = q (f - u f'), in natural-log units, from the scaled logits z = x / T, zr = xr / T and the rows'
// log-sum-exps. `Math` supplies exp and log: the CPU's branch-free vectorizable ones, or CUDA's expf / logf.
//
// The terms use d = log(p / q) = (z - zr) - (lse - lse_r) rather than the difference of two log-probabilities:
// the logit difference keeps its precision whatever the logits' magnitude, and identical rows give d = 0
// exactly, hence value 0 and zero gradients rather than rounding noise. Logits of -inf (a vocabulary mask)
// give p = 0 or q = 0; the terms take the limit there (0 where the other side is 0 too) instead of
// 0 * inf = NaN.
#pragma once

#include "row_args.h"  // DivId

#if defined(__CUDACC__)
#define FP_TERMS_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FP_TERMS_INLINE inline __attribute__((always_inline))  // must inline into the CPU's ISA clones
#else
#define FP_TERMS_INLINE inline
#endif

namespace fastpref {

// Per-call constants from the parameter, rounded from double once: js (beta, 1 - beta), alpha
// (alpha, 1 / (alpha - 1), 1 / alpha) so that the element loops multiply instead of dividing.
struct DivCoef {
  float param, k0, k1;
};

inline DivCoef make_div_coef(int div, double param) {
  if (div == kJS) return {float(param), float(1.0 - param), 0.0f};
  if (div == kAlpha) return {float(param), float(1.0 / (param - 1.0)), float(1.0 / param)};
  return {0.0f, 0.0f, 0.0f};
}

struct DivTerms {
  float p, q, qf, pa, qb;
};

// dl = lse - lse_r.
template <int DIV, class Math>
FP_TERMS_INLINE DivTerms div_terms(float z, float zr, float lse, float lse_r, float dl, const DivCoef& c) {
  const float lp = z - lse;
  const float lq = zr - lse_r;
  const float d = (z - zr) - dl;
  DivTerms t;
  if constexpr (DIV == kHellinger) {
    // sqrt(p), sqrt(q) first: (sqrt p - sqrt q)^2 has none of p + q - 2 sqrt(pq)'s cancellation.
    const float sp = Math::exp(0.5f * lp);
    const float sq = Math::exp(0.5f * lq);
    const float diff = sp - sq;
    t.p = sp * sp;
    t.q = sq * sq;
    t.qf = diff * diff;
    t.pa = sp * diff;
    t.qb = -sq * diff;
  } else if constexpr (DIV == kJS) {
    // With m = beta p + (1 - beta) q: log(m / p) = log_arg + max(-d, 0) and log(m / q) = log_arg +
    // max(d, 0), where log_arg = log(1 - k (1 - e^-|d|)), k = 1 - beta for d >= 0 and beta otherwise.
    // The argument lies in [min(beta, 1 - beta), 1] whatever d (clamped there in case 1 - beta rounded
    // to 1), d = 0 gives log_arg = 0 exactly, and an infinite d only reaches the side whose probability
    // is 0. The smaller of p and q is the larger times e^-|d|: one exp fewer.
    const bool pos = d >= 0.0f;
    const float ratio = Math::exp(pos ? -d : d);
    const float big = Math::exp(pos ? lp : lq);
    const float small = big == 0.0f ? 0.0f : big * ratio;  // p = q = 0 makes d, hence ratio, NaN
    t.p = pos ? big : small;
    t.q = pos ? small : big;
    const float k = pos ? c.k0 : c.param;
    const float lo = pos ? c.param : c.k0;
    float arg = 1.0f - k * (1.0f - ratio);
    arg = arg < lo ? lo : arg;
    const float log_arg = Math::log(arg);
    const float hp = log_arg + (pos ? 0.0f : -d);
    const float hq = log_arg + (pos ? d : 0.0f);
    t.pa = t.p == 0.0f ? 0.0f : -c.param * t.p * hp;
    t.qb = t.q == 0.0f ? 0.0f : -c.k0 * t.q * hq;
    t.qf = t.pa + t.qb;
  } else {
    t.p = Math::exp(lp);
    t.q = Math::exp(lq);
    if constexpr (DIV == kReverseKL) {
      t.qf = t.p == 0.0f ? 0.0f : t.p * d;
      t.pa = t.qf + t.p;
      t.qb = -t.p;
    } else if constexpr (DIV == kForwardKL) {
      t.qf = t.q == 0.0f ? 0.0f : -t.q * d;
      t.pa = -t.q;
      t.qb = t.qf + t.q;
    } else if constexpr (DIV == kAlpha) {
      // w = p^a q^(1 - a) = q e^(a d): bounded by max(p, q), and exactly q (hence p) when d = 0. Its
      // exponent is NaN only for p = q = 0 or a -inf logit facing a finite one, where w = 0.
      const float u = lq + c.param * d;
      const float w = u == u ? Math::exp(u) : 0.0f;
      // qf = pa + qb adds terms of size |p - q| rather than of size p: less cancellation when p ~ q.
      t.pa = (w - t.p) * c.k0;
      t.qb = (t.q - w) * c.k1;
      t.qf = t.pa + t.qb;
    } else {
      static_assert(DIV == kTV, "unknown divergence");
      const float diff = t.p - t.q;
      const float half_sign = diff > 0.0f ? 0.5f : (diff < 0.0f ? -0.5f : 0.0f);  // subgradient 0 at p == q
      t.qf = (diff < 0.0f ? -diff : diff) * 0.5f;
      t.pa = t.p * half_sign;
      t.qb = -t.q * half_sign;
    }
  }
  return t;
}

}  // namespace fastpref

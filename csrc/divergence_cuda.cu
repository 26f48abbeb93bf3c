// CUDA twin of div_forward / div_backward in fastpref/kernels/reference.py, with the numerics of the CPU twin
// (divergence_cpu.cpp: the same terms, the same guards for p = 0 or q = 0, natural units: z = x / T,
// log p = z - lse, d = log(p / q) = (z - zr) - (lse - lse_r)). The backward and the stored lse are in natural
// units; the forward's online softmax sums powers of 2 (online_add says how, and why the KLs differ).
//
// One thread group per row pair, as in logprobs_cuda.cu (a warp when V <= kWarpMaxV, else a block). Only the
// divergence id is a template parameter: the four rows' dtypes are switched on per pack (uniform branches),
// so the instantiations stay few (quick builds) while every row keeps 16-byte loads when it is aligned.
//
// Forward. Reverse and forward KL take one pass: an online softmax over both rows that also carries the
// rescaled sum of e^(z - m) (z - zr) (or the reference's mirror); their value and s_a, s_b follow in closed
// form. The others need p and q themselves: a first pass finds both log-sum-exps, a second (over rows
// still in L2) sums qf, pa and qb.
//
// Backward. One pass recomputes p, q and the terms and writes both gradients; each thread reads its
// elements of every row before writing any, so out_x and out_xr may be x and xr themselves.
//
// The terms themselves (and their handling of -inf logits) are divergence_terms.h's, shared with the CPU twin.
#include "common_cuda.cuh"
#include "divergence_terms.h"

namespace fastpref {
namespace cuda {
namespace {

// The KLs (their p and q enter no cancelling sum) take exp as one multiply and the bare MUFU.EX2: expf's range
// reduction and denormal fix-up cost issue slots their backward needs (2 to 3 ulp against expf's 2, plus
// |x| 2^-24 from rounding x log2(e); a result below 2^-126 becomes 0). The other divergences keep expf: the
// alpha divergence's sums cancel, and the fast form's error, with that of the FFMA exponents online_add
// no longer uses for them, exceeded 1e-5 of its value on an H200 (T = 1, V = 1000).
struct CudaMath {
  static __device__ __forceinline__ float exp(float x) { return expf(x); }
  static __device__ __forceinline__ float log(float x) { return logf(x); }
};
struct FastMath : CudaMath {
  static __device__ __forceinline__ float exp(float x) { return exp2_ftz(x * kLog2e); }
};

template <int DIV>
constexpr bool kFused = DIV == kReverseKL || DIV == kForwardKL;

// p, q and the terms at one element (divergence_terms.h, shared with the CPU kernels).
template <int DIV>
__device__ __forceinline__ DivTerms terms(float z, float zr, float lse, float lse_r, float dl, const DivCoef& c) {
  return div_terms<DIV, std::conditional_t<kFused<DIV>, FastMath, CudaMath>>(z, zr, lse, lse_r, dl, c);
}

// Online softmax over both rows of raw logits x, xr, in base 2 with c = log2(e) / T: st = (m, s, mr, sr, t),
// s = sum 2^(x c - m') over the row, sr the reference's, and for the KLs t = sum 2^(x c - m') (x - xr)
// (reverse) or sum 2^(xr c - mr') (xr - x) (forward), in raw logit units (the kernel scales it once), which
// needs no shift when m moves since x - xr does not depend on it. A term of weight 0 adds nothing, not 0 * inf
// (a -inf logit on either side).
//
// The KLs (kFused) keep m = m' = max x c and take each exponent as one FFMA, x c - m: their single pass
// was measured at 82.5 % of the copy bandwidth on an H200 against 76.7 % with expf. The two-pass divergences
// keep the raw max m = max x (m' = m c) and take (x - m) c, rounded relative to x - m rather than to x c:
// the FFMA form moves every exponent by c's rounding (|x c| 2^-24), which their cancelling sums (alpha)
// turned into more than 1e-5 of the value on an H200 (T = 1, V = 1000).
// Raises the running max m to bm when larger, rescaling the sum s (and t with CARRY) to it by 2^((m - bm) f),
// f = 1 for base-2 maxima, c for raw ones; nothing to rescale while the sum is empty (m may still be kNegBig).
template <bool CARRY>
__device__ __forceinline__ void raise_max(float bm, float f, float& m, float& s, float& t) {
  if (bm > m) {
    if (s != 0.0f) {
      const float alpha = exp2_ftz((m - bm) * f);
      s *= alpha;
      if (CARRY) t *= alpha;
    }
    m = bm;
  }
}

template <int DIV, int K>
__device__ __forceinline__ void online_add(const float (&x)[K], const float (&xr)[K], float c, float (&st)[5]) {
  float bx = x[0], bxr = xr[0];
#pragma unroll
  for (int k = 1; k < K; ++k) {
    bx = fmaxf(bx, x[k]);
    bxr = fmaxf(bxr, xr[k]);
  }
  // c > 0 and rounding is monotonic: the scaled max is the max of the scaled logits.
  const float f = kFused<DIV> ? 1.0f : c;
  raise_max<DIV == kReverseKL>(kFused<DIV> ? bx * c : bx, f, st[0], st[1], st[4]);
  raise_max<DIV == kForwardKL>(kFused<DIV> ? bxr * c : bxr, f, st[2], st[3], st[4]);
  const float m = st[0], mr = st[2];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float e = exp2_ftz(kFused<DIV> ? fmaf(x[k], c, -m) : (x[k] - m) * c);
    const float er = exp2_ftz(kFused<DIV> ? fmaf(xr[k], c, -mr) : (xr[k] - mr) * c);
    st[1] += e;
    st[3] += er;
    if (DIV == kReverseKL) st[4] = e == 0.0f ? st[4] : fmaf(e, x[k] - xr[k], st[4]);
    if (DIV == kForwardKL) st[4] = er == 0.0f ? st[4] : fmaf(er, xr[k] - x[k], st[4]);
  }
}

// Folds the online-softmax partial (m2, s2) into (m, s) (s = sum 2^((u - m) f), f as in raise_max); returns
// the factors that rescaled each side, so that sums carried alongside follow. An empty side (s == 0) is
// skipped rather than rescaled: its max may be kNegBig, and kNegBig - m can overflow to -inf.
__device__ __forceinline__ void merge_max(float& m, float& s, float m2, float s2, float f, float& a, float& a2) {
  if (s2 == 0.0f) {
    a = 1.0f;
    a2 = 0.0f;
  } else if (s == 0.0f) {
    a = 0.0f;
    a2 = 1.0f;
    m = m2;
  } else {
    const float mm = fmaxf(m, m2);
    a = exp2_ftz((m - mm) * f);
    a2 = exp2_ftz((m2 - mm) * f);
    m = mm;
  }
  s = s * a + s2 * a2;
}

template <int DIV>
struct MergeStats {
  float f;  // as in raise_max

  __device__ __forceinline__ void operator()(float (&v)[5], const float (&o)[5]) const {
    float a1, a2, b1, b2;
    merge_max(v[0], v[1], o[0], o[1], f, a1, a2);
    merge_max(v[2], v[3], o[2], o[3], f, b1, b2);
    if (DIV == kReverseKL) v[4] = v[4] * a1 + o[4] * a2;
    if (DIV == kForwardKL) v[4] = v[4] * b1 + o[4] * b2;
  }
};

// One row pair's scaled logits z = x * scale, zr = xr * scale (raw x, xr with SCALED false), walked by one
// thread group: f(i, z, zr) gets kPack elements from element i on (16-byte loads, when npack > 0) or, for the
// tail or unaligned rows, one.
struct RowPair {
  const char* x;
  const char* xr;
  int x_dtype, xr_dtype;
  float scale;
  int64_t npack;

  template <int NT, bool SCALED = true, class F>
  __device__ __forceinline__ void for_each(int lane, int64_t V, F f) const {
    const int64_t end = npack * kPack, step = int64_t(NT) * kPack;
    int64_t i0 = lane * int64_t(kPack);
    // kLoadPacks packs of both rows are loaded before f sees any: f may store over them (out may be x), so
    // the compiler could not hoist the next loads above its stores itself.
    for (; i0 + (kLoadPacks - 1) * step < end; i0 += kLoadPacks * step) {
      float z[kLoadPacks][kPack], zr[kLoadPacks][kPack];
#pragma unroll
      for (int p = 0; p < kLoadPacks; ++p) {
        load_pack(x_dtype, x, i0 + p * step, z[p]);
        load_pack(xr_dtype, xr, i0 + p * step, zr[p]);
      }
#pragma unroll
      for (int p = 0; p < kLoadPacks; ++p) {
        if (SCALED) scale_pack(z[p], zr[p]);
        f(i0 + p * step, z[p], zr[p]);
      }
    }
    for (; i0 < end; i0 += step) {
      float z[kPack], zr[kPack];
      load_pack(x_dtype, x, i0, z);
      load_pack(xr_dtype, xr, i0, zr);
      if (SCALED) scale_pack(z, zr);
      f(i0, z, zr);
    }
    for (int64_t i = end + lane; i < V; i += NT) {
      float z[1] = {load_one(x_dtype, x, i)};
      float zr[1] = {load_one(xr_dtype, xr, i)};
      if (SCALED) {
        z[0] *= scale;
        zr[0] *= scale;
      }
      f(i, z, zr);
    }
  }

  __device__ __forceinline__ void scale_pack(float (&z)[kPack], float (&zr)[kPack]) const {
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      z[k] *= scale;
      zr[k] *= scale;
    }
  }
};

// Stores K gradients from element i on: a pack (16-byte stores) or one element.
template <int K>
__device__ __forceinline__ void store_elems(int dt, char* row, int64_t i, const float (&v)[K]) {
  if constexpr (K == kPack) {
    store_pack(dt, row, i, v);
  } else {
    static_assert(K == 1, "a pack or one element");
    store_one(dt, row, i, v[0]);
  }
}

// The length of f's array arguments above (kPack or 1).
template <class A>
constexpr int len_of = int(std::extent_v<std::remove_cv_t<std::remove_reference_t<A>>>);

__device__ __forceinline__ bool masked(const int64_t* labels, int64_t ignore_index, int64_t row) {
  return labels != nullptr && labels[row] == ignore_index;
}

template <int DIV, int NT>
__global__ void __launch_bounds__(block_threads<NT>())
    div_fwd_kernel(const DivFwdArgs a, const float scale, const DivCoef coef) {
  using G = Group<NT>;
  __shared__ float smem[5 * G::kWarps];
  const int64_t row = G::row();
  if (row >= a.n) return;
  const int lane = G::lane();
  if (masked(a.labels, a.ignore_index, row)) {
    if (lane == 0) a.value[row] = a.lse[row] = a.lse_r[row] = a.s_a[row] = a.s_b[row] = 0.0f;
    return;
  }
  RowPair pair{row_ptr(a.x.data, a.x.dtype, a.x.row_stride, row), row_ptr(a.xr.data, a.xr.dtype, a.xr.row_stride, row),
               a.x.dtype, a.xr.dtype, scale, 0};
  pair.npack = aligned16(pair.x) && aligned16(pair.xr) ? a.V / kPack : 0;
  float st[5] = {kNegBig, 0.0f, kNegBig, 0.0f, 0.0f};
  const float c = scale * kLog2e;
  pair.for_each<NT, false>(lane, a.V, [&](int64_t, const auto& x, const auto& xr) { online_add<DIV>(x, xr, c, st); });
  G::reduce(st, MergeStats<DIV>{kFused<DIV> ? 1.0f : c}, smem);
  const float m = st[0], s = st[1], mr = st[2], sr = st[3];  // base 2 (kFused) or raw
  // Raw maxima give the natural ones exactly as the backward's z = x * scale rounds them.
  const float lse = kFused<DIV> ? (m + log2f(s)) * kLn2 : m * scale + logf(s);
  const float lse_r = kFused<DIV> ? (mr + log2f(sr)) * kLn2 : mr * scale + logf(sr);
  const float dl = lse - lse_r;
  float value, s_a, s_b;
  if constexpr (kFused<DIV>) {
    // sum p (lp - lq) = E_p[z - zr] - (lse - lse_r), that difference taken from its unrounded parts (the
    // fp32 lse's rounding would otherwise be all of a small KL's error); s_a = sum p (lp - lq + 1) keeps the
    // stored ones, which the backward's log-ratios use, so that their rounding cancels out of
    // p (d + 1 - s_a). Forward KL mirrors it.
    const float exact_dl = ((m - mr) + log2f(s / sr)) * kLn2;
    if constexpr (DIV == kReverseKL) {
      const float mean = st[4] * scale / s;
      value = mean - exact_dl;
      s_a = (mean - dl) + 1.0f;
      s_b = -1.0f;
    } else {
      const float mean = st[4] * scale / sr;
      value = mean + exact_dl;
      s_a = -1.0f;
      s_b = (mean + dl) + 1.0f;
    }
  } else {
    float sums[3] = {0.0f, 0.0f, 0.0f};  // qf, pa, qb
    pair.for_each<NT>(lane, a.V, [&](int64_t, const auto& z, const auto& zr) {
#pragma unroll
      for (int k = 0; k < len_of<decltype(z)>; ++k) {
        const DivTerms t = terms<DIV>(z[k], zr[k], lse, lse_r, dl, coef);
        sums[0] += t.qf;
        sums[1] += t.pa;
        sums[2] += t.qb;
      }
    });
    G::sum(sums, smem);
    value = sums[0];
    s_a = sums[1];
    s_b = sums[2];
  }
  if (lane == 0) {
    a.value[row] = value;
    a.lse[row] = lse;
    a.lse_r[row] = lse_r;
    a.s_a[row] = s_a;
    a.s_b[row] = s_b;
  }
}

template <int DIV, int NT>
__global__ void __launch_bounds__(block_threads<NT>())
    div_bwd_kernel(const DivBwdArgs a, const float scale, const DivCoef c) {
  using G = Group<NT>;
  const int64_t row = G::row();
  if (row >= a.n) return;
  const int lane = G::lane();
  char* ox = a.out_x.data ? row_ptr(a.out_x.data, a.out_x.dtype, a.out_x.row_stride, row) : nullptr;
  char* oxr = a.out_xr.data ? row_ptr(a.out_xr.data, a.out_xr.dtype, a.out_xr.row_stride, row) : nullptr;
  if (masked(a.labels, a.ignore_index, row)) {
    zero_row(ox, a.out_x.dtype, a.V, lane, NT);
    zero_row(oxr, a.out_xr.dtype, a.V, lane, NT);
    return;
  }
  RowPair pair{row_ptr(a.x.data, a.x.dtype, a.x.row_stride, row), row_ptr(a.xr.data, a.xr.dtype, a.xr.row_stride, row),
               a.x.dtype, a.xr.dtype, scale, 0};
  const bool vec = aligned16(pair.x) && aligned16(pair.xr) && (ox == nullptr || aligned16(ox)) &&
                   (oxr == nullptr || aligned16(oxr));
  pair.npack = vec ? a.V / kPack : 0;
  const float lse = a.lse[row], lse_r = a.lse_r[row], dl = lse - lse_r;
  const float s_a = a.s_a[row], s_b = a.s_b[row];
  const float g = a.grad[row] / a.temperature;
  pair.for_each<NT>(lane, a.V, [&](int64_t i, auto& z, auto& zr) {
#pragma unroll
    for (int k = 0; k < len_of<decltype(z)>; ++k) {
      const DivTerms t = terms<DIV>(z[k], zr[k], lse, lse_r, dl, c);
      z[k] = g * (t.pa - t.p * s_a);
      zr[k] = g * (t.qb - t.q * s_b);
    }
    if (ox) store_elems(a.out_x.dtype, ox, i, z);
    if (oxr) store_elems(a.out_xr.dtype, oxr, i, zr);
  });
}

template <int DIV>
cudaError_t fwd_div(const DivFwdArgs& a, void* stream) {
  const float scale = 1.0f / a.temperature;  // z = x * scale, as the CPU twin rounds it
  return launch_rows(a, stream, div_fwd_kernel<DIV, 32>, div_fwd_kernel<DIV, kBlockThreads>, scale,
                     make_div_coef(DIV, a.param));
}

template <int DIV>
cudaError_t bwd_div(const DivBwdArgs& a, void* stream) {
  const float scale = 1.0f / a.temperature;
  return launch_rows(a, stream, div_bwd_kernel<DIV, 32>, div_bwd_kernel<DIV, kBlockThreads>, scale, make_div_coef(DIV, a.param));
}

template <class F>
cudaError_t with_div(int div, F f) {
  return dispatch<kReverseKL, kForwardKL, kJS, kAlpha, kTV, kHellinger>(div, f);
}

}  // namespace

int div_fwd(const DivFwdArgs& a, void* stream) {
  if (a.n == 0) return cudaSuccess;
  return with_div(a.div, [&](auto div) { return fwd_div<decltype(div)::value>(a, stream); });
}

int div_bwd(const DivBwdArgs& a, void* stream) {
  if (a.n == 0 || a.V == 0 || (a.out_x.data == nullptr && a.out_xr.data == nullptr)) return cudaSuccess;
  return with_div(a.div, [&](auto div) { return bwd_div<decltype(div)::value>(a, stream); });
}

}  // namespace cuda
}  // namespace fastpref

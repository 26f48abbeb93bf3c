// CPU twin of div_forward / div_backward in fastpref/kernels/reference.py (and of
// fastpref/kernels/triton/divergence.py, whose numerics it follows).
//
// Each row pair is streamed through two L1-sized fp32 scratch chunks: the chunk of x and of xr is
// converted (dtype, temperature) once, then reduced or differentiated from L1. The dtypes are switched on
// per chunk, outside the element loops, so only the divergence id is a template parameter (picked once
// per block of rows): every element loop is specialized for one divergence and vectorizes.
//
// Forward. Reverse and forward KL take one pass: their value is an expectation of z - zr under p (or of
// zr - z under q) minus lse - lse_r, so one online-softmax sweep over both rows that also carries the
// rescaled weighted sum gives it, and s_a, s_b follow in closed form. The others need p and q themselves:
// a first sweep finds both log-sum-exps, a second (over a row pair that is still in L2 for common
// vocabularies) sums qf, pa and qb.
//
// Backward. One sweep per row recomputes p, q and the terms and writes both gradients.
//
// The terms themselves (and their handling of -inf logits) are divergence_terms.h's, shared with the CUDA
// kernels.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common_cpu.h"
#include "divergence_cpu.h"
#include "divergence_terms.h"

namespace fastpref {
namespace cpu {
namespace {

// Finite start for the running maxes: a row or chunk of -inf logits then gives exp(-inf - m) = 0 rather
// than exp(-inf + inf) = NaN, with no branch in the element loop.
constexpr float kNegBig = -std::numeric_limits<float>::max();

struct RowStats {
  float lse, lse_r, dl;  // dl = lse - lse_r
};

struct CpuMath {
  static FP_INLINE float exp(float x) { return fast_exp(x); }
  static FP_INLINE float log(float x) { return fast_log(x); }
};

// p, q and the terms at one element (divergence_terms.h, shared with the CUDA kernels).
template <int DIV>
FP_INLINE DivTerms terms(float z, float zr, const RowStats& st, const DivCoef& c) {
  return div_terms<DIV, CpuMath>(z, zr, st.lse, st.lse_r, st.dl, c);
}

template <int DT>
FP_INLINE void load_chunk_as(const void* data, int64_t offset, int len, float scale, float* __restrict z) {
  const auto* x = static_cast<const typename Elem<DT>::T*>(data) + offset;
  for (int i = 0; i < len; ++i) z[i] = Elem<DT>::load(x[i]) * scale;
}

// z = x * scale for elements [c0, c0 + len) of `row`.
FP_INLINE void load_chunk(const InRows& in, int64_t row, int64_t c0, int len, float scale, float* __restrict z) {
  const int64_t offset = row * in.row_stride + c0;
  switch (in.dtype) {
    case kFloat32: load_chunk_as<kFloat32>(in.data, offset, len, scale, z); break;
    case kBFloat16: load_chunk_as<kBFloat16>(in.data, offset, len, scale, z); break;
    case kFloat16: load_chunk_as<kFloat16>(in.data, offset, len, scale, z); break;
  }
}

template <int DT>
FP_INLINE void store_chunk_as(void* data, int64_t offset, int len, const float* __restrict g) {
  auto* o = static_cast<typename Elem<DT>::T*>(data) + offset;
  for (int i = 0; i < len; ++i) o[i] = Elem<DT>::store(g[i]);
}

FP_INLINE void store_chunk(const OutRows& out, int64_t row, int64_t c0, int len, const float* __restrict g) {
  if (out.data == nullptr) return;
  const int64_t offset = row * out.row_stride + c0;
  switch (out.dtype) {
    case kFloat32: store_chunk_as<kFloat32>(out.data, offset, len, g); break;
    case kBFloat16: store_chunk_as<kBFloat16>(out.data, offset, len, g); break;
    case kFloat16: store_chunk_as<kFloat16>(out.data, offset, len, g); break;
  }
}

void zero_row(const OutRows& out, int64_t row, int64_t V) {
  if (out.data == nullptr) return;
  const size_t elem = out.dtype == kFloat32 ? sizeof(float) : sizeof(uint16_t);
  // All-zero bits are +0 in every dtype.
  std::memset(static_cast<char*>(out.data) + size_t(row * out.row_stride) * elem, 0, size_t(V) * elem);
}

FP_INLINE bool masked(const int64_t* labels, int64_t ignore_index, int64_t row) {
  return labels != nullptr && labels[row] == ignore_index;
}

template <int DIV>
FP_INLINE void fwd_rows(const DivFwdArgs& a, int64_t r0, int64_t r1) {
  const DivCoef c = make_div_coef(DIV, a.param);
  const float scale = 1.0f / a.temperature;
  alignas(64) float z[kChunk];
  alignas(64) float zr[kChunk];
  for (int64_t row = r0; row < r1; ++row) {
    if (masked(a.labels, a.ignore_index, row)) {
      a.value[row] = a.lse[row] = a.lse_r[row] = a.s_a[row] = a.s_b[row] = 0.0f;
      continue;
    }
    // Online softmax over both rows: running maxes m, mr, s = sum e^(z - m), sr = sum e^(zr - mr), and
    // for the KLs t = sum e^(z - m) (z - zr) (reverse) or sum e^(zr - mr) (zr - z) (forward), which
    // need no shift when m moves since z - zr does not depend on it. -inf logits get weight 0, not
    // 0 * inf.
    float m = kNegBig, mr = kNegBig, s = 0.0f, sr = 0.0f, t = 0.0f;
    for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
      const int len = int(std::min<int64_t>(kChunk, a.V - c0));
      load_chunk(a.x, row, c0, len, scale, z);
      load_chunk(a.xr, row, c0, len, scale, zr);
      const float cm = std::max(m, block_max(z, len));
      const float cmr = std::max(mr, block_max(zr, len));
      const float alpha = fast_exp(m - cm);
      const float alpha_r = fast_exp(mr - cmr);
      s *= alpha;
      sr *= alpha_r;
      t *= DIV == kForwardKL ? alpha_r : alpha;
      m = cm;
      mr = cmr;
      float bs = 0.0f, bsr = 0.0f, bt = 0.0f;
#pragma omp simd reduction(+ : bs, bsr, bt)
      for (int i = 0; i < len; ++i) {
        const float e = fast_exp(z[i] - m);
        const float er = fast_exp(zr[i] - mr);
        bs += e;
        bsr += er;
        if constexpr (DIV == kReverseKL) bt += e == 0.0f ? 0.0f : e * (z[i] - zr[i]);
        if constexpr (DIV == kForwardKL) bt += er == 0.0f ? 0.0f : er * (zr[i] - z[i]);
      }
      s += bs;
      sr += bsr;
      t += bt;
    }
    RowStats st;
    st.lse = m + std::log(s);
    st.lse_r = mr + std::log(sr);
    st.dl = st.lse - st.lse_r;
    float value, s_a, s_b;
    // sum p (lp - lq) = E_p[z - zr] - (lse - lse_r) with pa = p (lp - lq + 1), qb = -p; forward KL mirrors
    // it. The value takes lse - lse_r from its unrounded parts: the rounding of the fp32 lse's (eps |lse|)
    // would otherwise be all of a small KL's error. s_a (s_b) keeps the stored lse's, which the backward's
    // log-ratios use, so that their rounding cancels out of the backward's p (d + 1 - s_a).
    const auto exact_dl = [&] { return (m - mr) + std::log(s / sr); };
    if constexpr (DIV == kReverseKL) {
      const float mean = t / s;
      value = mean - exact_dl();
      s_a = (mean - st.dl) + 1.0f;
      s_b = -1.0f;
    } else if constexpr (DIV == kForwardKL) {
      const float mean = t / sr;
      value = mean + exact_dl();
      s_a = -1.0f;
      s_b = (mean + st.dl) + 1.0f;
    } else {
      value = s_a = s_b = 0.0f;
      for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
        const int len = int(std::min<int64_t>(kChunk, a.V - c0));
        load_chunk(a.x, row, c0, len, scale, z);
        load_chunk(a.xr, row, c0, len, scale, zr);
        float bqf = 0.0f, bpa = 0.0f, bqb = 0.0f;
#pragma omp simd reduction(+ : bqf, bpa, bqb)
        for (int i = 0; i < len; ++i) {
          const DivTerms tm = terms<DIV>(z[i], zr[i], st, c);
          bqf += tm.qf;
          bpa += tm.pa;
          bqb += tm.qb;
        }
        value += bqf;
        s_a += bpa;
        s_b += bqb;
      }
    }
    a.value[row] = value;
    a.lse[row] = st.lse;
    a.lse_r[row] = st.lse_r;
    a.s_a[row] = s_a;
    a.s_b[row] = s_b;
  }
}

template <int DIV>
FP_INLINE void bwd_rows(const DivBwdArgs& a, int64_t r0, int64_t r1) {
  const DivCoef c = make_div_coef(DIV, a.param);
  const float scale = 1.0f / a.temperature;
  alignas(64) float z[kChunk];
  alignas(64) float zr[kChunk];
  for (int64_t row = r0; row < r1; ++row) {
    if (masked(a.labels, a.ignore_index, row)) {
      zero_row(a.out_x, row, a.V);
      zero_row(a.out_xr, row, a.V);
      continue;
    }
    const RowStats st{a.lse[row], a.lse_r[row], a.lse[row] - a.lse_r[row]};
    const float s_a = a.s_a[row], s_b = a.s_b[row];
    const float g = a.grad[row] / a.temperature;
    for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
      const int len = int(std::min<int64_t>(kChunk, a.V - c0));
      load_chunk(a.x, row, c0, len, scale, z);
      load_chunk(a.xr, row, c0, len, scale, zr);
      // The gradients replace the logits in the scratch chunks, and both chunks are read in full
      // before either is stored: out_x and out_xr may be x and xr themselves.
#pragma omp simd
      for (int i = 0; i < len; ++i) {
        const DivTerms tm = terms<DIV>(z[i], zr[i], st, c);
        z[i] = g * (tm.pa - tm.p * s_a);
        zr[i] = g * (tm.qb - tm.q * s_b);
      }
      store_chunk(a.out_x, row, c0, len, z);
      store_chunk(a.out_xr, row, c0, len, zr);
    }
  }
}

// The instruction-set clones sit below the OpenMP outlining, as in logprobs_cpu.cpp, so each thread runs
// the clone picked for the CPU.
FP_CLONES void fwd_block(const DivFwdArgs& a, int64_t r0, int64_t r1) {
  switch (a.div) {
    case kReverseKL: fwd_rows<kReverseKL>(a, r0, r1); break;
    case kForwardKL: fwd_rows<kForwardKL>(a, r0, r1); break;
    case kJS: fwd_rows<kJS>(a, r0, r1); break;
    case kAlpha: fwd_rows<kAlpha>(a, r0, r1); break;
    case kTV: fwd_rows<kTV>(a, r0, r1); break;
    case kHellinger: fwd_rows<kHellinger>(a, r0, r1); break;
  }
}

FP_CLONES void bwd_block(const DivBwdArgs& a, int64_t r0, int64_t r1) {
  switch (a.div) {
    case kReverseKL: bwd_rows<kReverseKL>(a, r0, r1); break;
    case kForwardKL: bwd_rows<kForwardKL>(a, r0, r1); break;
    case kJS: bwd_rows<kJS>(a, r0, r1); break;
    case kAlpha: bwd_rows<kAlpha>(a, r0, r1); break;
    case kTV: bwd_rows<kTV>(a, r0, r1); break;
    case kHellinger: bwd_rows<kHellinger>(a, r0, r1); break;
  }
}

}  // namespace

void div_fwd(const DivFwdArgs& args, int num_threads) {
  parallel_rows(args, num_threads, fwd_block);
}

void div_bwd(const DivBwdArgs& args, int num_threads) {
  if (args.V == 0 || (args.out_x.data == nullptr && args.out_xr.data == nullptr)) return;
  parallel_rows(args, num_threads, bwd_block);
}

}  // namespace cpu
}  // namespace fastpref

// CUDA twin of the row-kernel contract in fastpref/kernels/reference.py (row_forward / row_backward), with
// the numerics of the CPU twin (logprobs_cpu.cpp) and the Triton one (kernels/triton/logprobs.py).
//
// One thread group per row: a warp when V <= kWarpMaxV (kWarpRows rows per block), else a block of
// kBlockThreads. Each thread walks its packs of kPack elements (16-byte loads when the row is 16-byte
// aligned, scalar loads otherwise, a scalar tail after the packs) keeping an online softmax in base 2
// (w = z log2(e), so every exponential is one exp2): its running max m, s = sum 2^(w - m) and, for the
// entropy, t = sum 2^(w - m) (w - m), kept relative to m so that H never cancels two large numbers. The
// partials are merged across the group at the end. The forward reads each logit once; the backward
// reads it once more and writes its gradient (in place when out is x: each thread reads its elements
// before writing them, and no other thread touches them).
#include "common_cuda.cuh"

namespace fastpref {
namespace cuda {
namespace {

struct Scale {
  float scale;        // w = x * scale, or tanh(x * inv_softcap) * scale with a softcap
  float inv_softcap;
  float inv_temperature;
};

Scale make_scale(float temperature, float softcap) {
  const double log2e = 1.4426950408889634;
  Scale s;
  s.scale = float(softcap > 0.0f ? log2e * double(softcap) / double(temperature) : log2e / double(temperature));
  s.inv_softcap = softcap > 0.0f ? float(1.0 / double(softcap)) : 0.0f;
  s.inv_temperature = float(1.0 / double(temperature));
  return s;
}

// tanh(u) and 1 - tanh(u)^2 from one exp2 and a short series near 0, as kernels/triton/logprobs.py does:
// 1 - e would lose relative accuracy to cancellation as u -> 0, and 4e / (1 + e)^2 has none of
// 1 - tanh^2's cancellation for large |u|.
__device__ __forceinline__ float tanh_sech2(float u, float& sech2) {
  const float a = fabsf(u);
  const float e = exp2f(a * (-2.0f * kLog2e));  // exp(-2|u|), in (0, 1]
  const float big = (1.0f - e) / (1.0f + e);
  const float a2 = a * a;
  const float small =
      a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f + a2 * (62.0f / 2835.0f)))));
  const float t = a < 0.25f ? small : big;
  sech2 = 4.0f * e / ((1.0f + e) * (1.0f + e));
  return u < 0.0f ? -t : t;
}

template <bool CAP>
__device__ __forceinline__ float to_w(float x, const Scale& sc, float& sech2) {
  if (!CAP) return x * sc.scale;
  return tanh_sech2(x * sc.inv_softcap, sech2) * sc.scale;
}

// Adds P packs of K logits to the thread's online softmax (m, s, t) in base 2: w = x * scale (scale > 0; with
// a softcap the caller passes w itself and scale 1). The max is taken over x and scaled once (rounding is
// monotonic, so it is the max of the rounded w), and each term's w - m is one FFMA: per element the loop is
// a max, an FFMA, an exp2, an add and, for the entropy, a clamp and an FFMA, which keeps the forward from
// being issue-bound (it was, at 14 instructions per element).
template <bool ENT, int P, int K>
__device__ __forceinline__ void online_add(const float (&x)[P][K], float scale, float& m, float& s, float& t) {
  float bx = x[0][0];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int k = 0; k < K; ++k) bx = fmaxf(bx, x[p][k]);
  const float bm = bx * scale;
  if (bm > m) {
    if (s != 0.0f) {  // nothing to rescale yet while m is kNegBig
      const float shift = m - bm;
      const float alpha = exp2_ftz(shift);
      if (ENT) t = alpha * (t + shift * s);
      s *= alpha;
    }
    m = bm;
  }
  const float neg_m = -m;
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float d = fmaf(x[p][k], scale, neg_m);
      const float e = exp2_ftz(d);
      s += e;
      if (ENT) t = fmaf(e, fmaxf(d, kMinExp2), t);  // a -inf logit adds p log p = 0, not 0 * -inf
    }
}

// Merges another thread's (m, s, t) into v; an empty side (s == 0) is skipped, never rescaled.
__device__ __forceinline__ void merge_softmax(float (&v)[3], const float (&o)[3]) {
  if (o[1] == 0.0f) return;
  if (v[1] == 0.0f) {
    v[0] = o[0];
    v[1] = o[1];
    v[2] = o[2];
    return;
  }
  const float mm = fmaxf(v[0], o[0]);
  const float d1 = v[0] - mm, d2 = o[0] - mm;
  const float a1 = exp2f(d1), a2 = exp2f(d2);
  v[2] = a1 * (v[2] + d1 * v[1]) + a2 * (o[2] + d2 * o[1]);
  v[1] = v[1] * a1 + o[1] * a2;
  v[0] = mm;
}

struct MergeSoftmax {
  __device__ __forceinline__ void operator()(float (&v)[3], const float (&o)[3]) const { merge_softmax(v, o); }
};

__device__ __forceinline__ bool valid_label(int64_t y, int64_t V, int64_t ignore_index) {
  return y != ignore_index && y >= 0 && y < V;
}

template <int DT, bool CAP, bool ENT, int NT>
__global__ void __launch_bounds__(block_threads<NT>()) logprobs_fwd_kernel(const FwdArgs a, const Scale sc) {
  using G = Group<NT>;
  __shared__ float smem[3 * G::kWarps];
  const int64_t row = G::row();
  if (row >= a.n) return;  // whole warps (warp mode) or the whole block
  const int lane = G::lane();
  const int64_t y = a.labels[row];
  if (!valid_label(y, a.V, a.ignore_index)) {
    if (lane == 0) {
      a.logp[row] = 0.0f;
      a.lse[row] = 0.0f;
      if (ENT) a.entropy[row] = 0.0f;
    }
    return;
  }
  const char* x = row_ptr(a.x, DT, a.x_row_stride, row);
  float st[3] = {kNegBig, 0.0f, 0.0f};  // m, s, t
  float unused;
  const float scale = CAP ? 1.0f : sc.scale;
  const int64_t npack = aligned16(x) ? a.V / kPack : 0;
  // kLoadPacks packs per thread and iteration, all loaded before any is used: more bytes in flight per warp.
  int64_t g = lane;
  for (; g + (kLoadPacks - 1) * NT < npack; g += kLoadPacks * NT) {
    float v[kLoadPacks][kPack];
#pragma unroll
    for (int p = 0; p < kLoadPacks; ++p) load_pack<DT>(x, (g + p * NT) * kPack, v[p]);
    if (CAP) {
#pragma unroll
      for (int p = 0; p < kLoadPacks; ++p)
#pragma unroll
        for (int k = 0; k < kPack; ++k) v[p][k] = to_w<true>(v[p][k], sc, unused);
    }
    online_add<ENT>(v, scale, st[0], st[1], st[2]);
  }
  for (; g < npack; g += NT) {
    float v[1][kPack];
    load_pack<DT>(x, g * kPack, v[0]);
#pragma unroll
    for (int k = 0; k < kPack; ++k) v[0][k] = CAP ? to_w<true>(v[0][k], sc, unused) : v[0][k];
    online_add<ENT>(v, scale, st[0], st[1], st[2]);
  }
  for (int64_t i = npack * kPack + lane; i < a.V; i += NT) {
    const float v[1][1] = {{CAP ? to_w<true>(load_one<DT>(x, i), sc, unused) : load_one<DT>(x, i)}};
    online_add<ENT>(v, scale, st[0], st[1], st[2]);
  }
  G::reduce(st, MergeSoftmax{}, smem);
  if (lane == 0) {
    const float log_s = log2f(st[1]);  // s >= 1: the max's own term
    const float lse2 = st[0] + log_s;
    // The label's logit converted exactly as in the loop: z_y <= max, so logp <= 0.
    const float wy = to_w<CAP>(load_one<DT>(x, y), sc, unused);
    a.logp[row] = (wy - lse2) * kLn2;
    a.lse[row] = lse2 * kLn2;
    if (ENT) a.entropy[row] = (log_s - st[2] / st[1]) * kLn2;
  }
}

struct RowGrad {
  float lse2, gl_t, ghl_t, mu2, scale;  // gl_t, ghl_t: g_logp and g_H ln2, each / T

  // dL/dx at one element of logit u, u = x (scale = log2(e) / T) or w itself (softcap: scale 1, times its
  // sech^2 after): dz = g_logp (1[v == y] - p) - g_H p (z - mu), then / T. `label` says v == y. p == 0
  // guards -inf logits, where g_H (z - mu) would turn a zero gradient into NaN.
  __device__ __forceinline__ float operator()(float u, bool label) const {
    const float p = exp2_ftz(fmaf(u, scale, -lse2));
    float dx = p == 0.0f ? 0.0f : -p * fmaf(ghl_t, fmaf(u, scale, -mu2), gl_t);
    return label ? dx + gl_t : dx;
  }
};

template <int DI, int DO, bool CAP, int NT>
__global__ void __launch_bounds__(block_threads<NT>()) logprobs_bwd_kernel(const BwdArgs a, const Scale sc) {
  using G = Group<NT>;
  const int64_t row = G::row();
  if (row >= a.n) return;
  const int lane = G::lane();
  const int64_t y = a.labels[row];
  char* out = row_ptr(a.out, DO, a.out_row_stride, row);
  if (!valid_label(y, a.V, a.ignore_index)) {
    zero_row(out, DO, a.V, lane, NT);
    return;
  }
  const char* x = row_ptr(a.x, DI, a.x_row_stride, row);
  const bool has_entropy = a.entropy != nullptr && a.grad_entropy != nullptr;
  RowGrad grad;
  grad.lse2 = a.lse[row] * kLog2e;
  grad.gl_t = (a.grad_logp != nullptr ? a.grad_logp[row] : 0.0f) * sc.inv_temperature;
  // dH/dz = -p (z - mu) with z - mu = (w - mu2) ln2: ln2 goes into the weight once.
  grad.ghl_t = has_entropy ? a.grad_entropy[row] * kLn2 * sc.inv_temperature : 0.0f;
  grad.mu2 = has_entropy ? grad.lse2 - a.entropy[row] * kLog2e : 0.0f;
  grad.scale = CAP ? 1.0f : sc.scale;
  // The gradient of kPack elements from element i0 on, in place in v.
  auto pack_grad = [&](int64_t i0, float (&v)[kPack]) {
    const int64_t dy = y - i0;
    const int ky = dy >= 0 && dy < kPack ? int(dy) : -1;  // the label's place in the pack, compared in 32 bits
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      float sech2 = 1.0f;
      const float u = CAP ? to_w<true>(v[k], sc, sech2) : v[k];
      const float dx = grad(u, k == ky);
      v[k] = CAP ? dx * sech2 : dx;
    }
  };
  const int64_t npack = aligned16(x) && aligned16(out) ? a.V / kPack : 0;
  // Every pack of an iteration is loaded before any is stored: out may be x, so the compiler may not hoist
  // the next load above a store on its own.
  int64_t g = lane;
  for (; g + (kLoadPacks - 1) * NT < npack; g += kLoadPacks * NT) {
    float v[kLoadPacks][kPack];
#pragma unroll
    for (int p = 0; p < kLoadPacks; ++p) load_pack<DI>(x, (g + p * NT) * kPack, v[p]);
#pragma unroll
    for (int p = 0; p < kLoadPacks; ++p) {
      pack_grad((g + p * NT) * kPack, v[p]);
      store_pack<DO>(out, (g + p * NT) * kPack, v[p]);
    }
  }
  for (; g < npack; g += NT) {
    float v[kPack];
    load_pack<DI>(x, g * kPack, v);
    pack_grad(g * kPack, v);
    store_pack<DO>(out, g * kPack, v);
  }
  for (int64_t i = npack * kPack + lane; i < a.V; i += NT) {
    float sech2 = 1.0f;
    const float u = CAP ? to_w<true>(load_one<DI>(x, i), sc, sech2) : load_one<DI>(x, i);
    const float dx = grad(u, i == y);
    store_one<DO>(out, i, CAP ? dx * sech2 : dx);
  }
}

template <int DT, bool CAP, bool ENT>
cudaError_t fwd_dispatch(const FwdArgs& a, void* stream, const Scale& sc) {
  return launch_rows(a, stream, logprobs_fwd_kernel<DT, CAP, ENT, 32>, logprobs_fwd_kernel<DT, CAP, ENT, kBlockThreads>,
                     sc);
}

template <int DT>
cudaError_t fwd_dtype(const FwdArgs& a, void* stream, const Scale& sc) {
  const bool cap = a.softcap > 0.0f, ent = a.entropy != nullptr;
  if (cap) return ent ? fwd_dispatch<DT, true, true>(a, stream, sc) : fwd_dispatch<DT, true, false>(a, stream, sc);
  return ent ? fwd_dispatch<DT, false, true>(a, stream, sc) : fwd_dispatch<DT, false, false>(a, stream, sc);
}

template <int DI, int DO>
cudaError_t bwd_dispatch(const BwdArgs& a, void* stream, const Scale& sc) {
  if (a.softcap > 0.0f)
    return launch_rows(a, stream, logprobs_bwd_kernel<DI, DO, true, 32>, logprobs_bwd_kernel<DI, DO, true, kBlockThreads>,
                       sc);
  return launch_rows(a, stream, logprobs_bwd_kernel<DI, DO, false, 32>, logprobs_bwd_kernel<DI, DO, false, kBlockThreads>,
                     sc);
}

}  // namespace

int logprobs_fwd(const FwdArgs& a, void* stream) {
  if (a.n == 0) return cudaSuccess;
  const Scale sc = make_scale(a.temperature, a.softcap);
  return with_dtype(a.x_dtype, [&](auto dt) { return fwd_dtype<decltype(dt)::value>(a, stream, sc); });
}

int logprobs_bwd(const BwdArgs& a, void* stream) {
  if (a.n == 0 || a.V == 0) return cudaSuccess;  // nothing to write, and out may be null
  const Scale sc = make_scale(a.temperature, a.softcap);
  return with_dtype(a.x_dtype, [&](auto di) {
    return with_dtype(a.out_dtype, [&](auto dout) {
      return bwd_dispatch<decltype(di)::value, decltype(dout)::value>(a, stream, sc);
    });
  });
}

std::string error_string(int code) {
  return std::string(cudaGetErrorName(cudaError_t(code))) + ": " + cudaGetErrorString(cudaError_t(code));
}

}  // namespace cuda
}  // namespace fastpref

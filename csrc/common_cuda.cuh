// Device helpers shared by the CUDA row kernels (logprobs_cuda.cu, divergence_cuda.cu): dtype conversion,
// 16-byte vector access, the row loop (vector body + scalar tail, or all scalar for unaligned rows) and
// thread-group reductions. Everything has internal linkage: each .cu compiles its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels_cuda.h"

namespace fastpref {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Finite stand-in for -inf as a running max: exp2(w - m) stays exp2(-inf) = 0 for -inf logits, and no
// rescale ever computes -inf - -inf = NaN or inf * 0.
constexpr float kNegBig = -3.0e38f;
// Below any exponent whose exp2 is nonzero in exp2_ftz: d clamped to it keeps e * d = 0 * kMinExp2 = 0 for
// d = -inf (a -inf logit) instead of 0 * -inf = NaN, one FMNMX instead of a compare and a select.
constexpr float kMinExp2 = -256.0f;

// 2^x as the bare MUFU.EX2. exp2f/expf add a fix-up for results below 2^-126 (a compare, a select and two
// multiplies per element: the row kernels' forward was issue-bound on them); a term that small changes no
// softmax sum, which holds a 1, and flushing it to 0 is what every element beyond fp32's range gets anyway.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Block-per-row kernels use kBlockThreads threads; rows of at most kWarpMaxV elements take one warp each,
// kWarpRows rows per block (a 1024-wide row is 4 packs per lane: a block would leave most threads idle).
constexpr int kBlockThreads = 256;
constexpr int kWarpRows = 4;
constexpr int64_t kWarpMaxV = 1024;
// Elements per vector access: 16 bytes of a 16-bit dtype, two 16-byte accesses of fp32.
constexpr int kPack = 8;
// Packs a thread loads before it uses any, in the row loops: at one, a warp had a single 512-byte load in
// flight, too few bytes for the memory system's latency at full occupancy.
constexpr int kLoadPacks = 2;

template <int DT> struct Elem;
template <> struct Elem<kFloat32> {
  using T = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Elem<kBFloat16> {
  using T = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
  static __device__ __forceinline__ uint16_t store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
template <> struct Elem<kFloat16> {
  using T = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

__device__ __forceinline__ int dtype_size(int dt) { return dt == kFloat32 ? 4 : 2; }

// Row `row` of [n, V] elements of dtype `dt`, rows `stride` elements apart; 64-bit offsets throughout.
__device__ __forceinline__ const char* row_ptr(const void* base, int dt, int64_t stride, int64_t row) {
  return static_cast<const char*>(base) + row * stride * dtype_size(dt);
}
__device__ __forceinline__ char* row_ptr(void* base, int dt, int64_t stride, int64_t row) {
  return static_cast<char*>(base) + row * stride * dtype_size(dt);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// kPack elements starting at element i (a multiple of kPack) of a 16-byte aligned row.
template <int DT>
__device__ __forceinline__ void load_pack(const char* row, int64_t i, float (&f)[kPack]) {
  if constexpr (DT == kFloat32) {
    const float4* p = reinterpret_cast<const float4*>(row) + 2 * (i / kPack);
    const float4 a = p[0], b = p[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
    const uint4 u = reinterpret_cast<const uint4*>(row)[i / kPack];
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = Elem<DT>::load(uint16_t(w[k] & 0xffffu));
      f[2 * k + 1] = Elem<DT>::load(uint16_t(w[k] >> 16));
    }
  }
}

template <int DT>
__device__ __forceinline__ void store_pack(char* row, int64_t i, const float (&f)[kPack]) {
  if constexpr (DT == kFloat32) {
    float4* p = reinterpret_cast<float4*>(row) + 2 * (i / kPack);
    p[0] = make_float4(f[0], f[1], f[2], f[3]);
    p[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      w[k] = uint32_t(Elem<DT>::store(f[2 * k])) | (uint32_t(Elem<DT>::store(f[2 * k + 1])) << 16);
    reinterpret_cast<uint4*>(row)[i / kPack] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <int DT>
__device__ __forceinline__ float load_one(const char* row, int64_t i) {
  return Elem<DT>::load(reinterpret_cast<const typename Elem<DT>::T*>(row)[i]);
}

template <int DT>
__device__ __forceinline__ void store_one(char* row, int64_t i, float v) {
  reinterpret_cast<typename Elem<DT>::T*>(row)[i] = Elem<DT>::store(v);
}

// Runtime-dtype twins (the branch is uniform across the thread group): the divergence kernels take each
// of their four rows in its own dtype without multiplying their instantiations.
__device__ __forceinline__ void load_pack(int dt, const char* row, int64_t i, float (&f)[kPack]) {
  if (dt == kFloat32) load_pack<kFloat32>(row, i, f);
  else if (dt == kBFloat16) load_pack<kBFloat16>(row, i, f);
  else load_pack<kFloat16>(row, i, f);
}
__device__ __forceinline__ void store_pack(int dt, char* row, int64_t i, const float (&f)[kPack]) {
  if (dt == kFloat32) store_pack<kFloat32>(row, i, f);
  else if (dt == kBFloat16) store_pack<kBFloat16>(row, i, f);
  else store_pack<kFloat16>(row, i, f);
}
__device__ __forceinline__ float load_one(int dt, const char* row, int64_t i) {
  if (dt == kFloat32) return load_one<kFloat32>(row, i);
  if (dt == kBFloat16) return load_one<kBFloat16>(row, i);
  return load_one<kFloat16>(row, i);
}
__device__ __forceinline__ void store_one(int dt, char* row, int64_t i, float v) {
  if (dt == kFloat32) store_one<kFloat32>(row, i, v);
  else if (dt == kBFloat16) store_one<kBFloat16>(row, i, v);
  else store_one<kFloat16>(row, i, v);
}

// Zero-fills a row (all-zero bits are +0 in every dtype); `lane` of `nt` threads.
__device__ __forceinline__ void zero_row(char* row, int dt, int64_t V, int lane, int nt) {
  if (row == nullptr) return;
  const int64_t bytes = V * dtype_size(dt);
  if (aligned16(row)) {
    const int64_t nvec = bytes / 16;
    for (int64_t i = lane; i < nvec; i += nt) reinterpret_cast<uint4*>(row)[i] = make_uint4(0, 0, 0, 0);
    for (int64_t i = nvec * 16 / 2 + lane; i < bytes / 2; i += nt) reinterpret_cast<uint16_t*>(row)[i] = 0;
  } else {
    for (int64_t i = lane; i < bytes / 2; i += nt) reinterpret_cast<uint16_t*>(row)[i] = 0;
  }
}

// Thread groups: NT == 32 is one warp per row (shuffles only), NT > 32 the whole block (shuffles, then
// the warps' partials through shared memory, combined in the same order by every thread). Either way every
// thread ends with the same bits (a butterfly's lanes combine in mirrored orders, which FMA contraction
// can round differently: the warp takes lane 0's result). `combine(a, b)` folds b into a.
template <int NT>
struct Group {
  static_assert(NT == 32 || (NT % 32 == 0 && NT <= 1024), "a warp or a block of whole warps");
  static constexpr int kWarps = NT / 32;

  static __device__ __forceinline__ int lane() { return NT == 32 ? int(threadIdx.x & 31u) : int(threadIdx.x); }

  static __device__ __forceinline__ int64_t row() {
    return NT == 32 ? int64_t(blockIdx.x) * kWarpRows + threadIdx.x / 32 : int64_t(blockIdx.x);
  }

  // `smem` holds K * kWarps floats (unused for a warp).
  template <int K, class F>
  static __device__ __forceinline__ void reduce(float (&v)[K], F combine, float* smem) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      float o[K];
#pragma unroll
      for (int k = 0; k < K; ++k) o[k] = __shfl_xor_sync(0xffffffffu, v[k], off);
      combine(v, o);
    }
    if constexpr (kWarps == 1) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = __shfl_sync(0xffffffffu, v[k], 0);
    } else {
      const int warp = int(threadIdx.x / 32), lane32 = int(threadIdx.x & 31u);
      __syncthreads();  // an earlier reduction's reads of smem are done
      if (lane32 == 0) {
#pragma unroll
        for (int k = 0; k < K; ++k) smem[k * kWarps + warp] = v[k];
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = smem[k * kWarps];
      for (int w = 1; w < kWarps; ++w) {
        float o[K];
#pragma unroll
        for (int k = 0; k < K; ++k) o[k] = smem[k * kWarps + w];
        combine(v, o);
      }
    }
  }

  template <int K>
  static __device__ __forceinline__ void sum(float (&v)[K], float* smem) {
    reduce(v, [](float(&a)[K], const float(&b)[K]) {
#pragma unroll
      for (int k = 0; k < K; ++k) a[k] += b[k];
    }, smem);
  }
};

// f(std::integral_constant<int, V>{}) for the V of Vs equal to `value` (a runtime code to a template
// argument); cudaErrorInvalidValue when none is.
template <int... Vs, class F>
cudaError_t dispatch(int value, F f) {
  cudaError_t result = cudaErrorInvalidValue;
  (void)((value == Vs ? (result = f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  return result;
}

template <class F>
cudaError_t with_dtype(int dt, F f) {
  return dispatch<kFloat32, kBFloat16, kFloat16>(dt, f);
}

// Threads per block of a kernel whose thread groups have NT threads.
template <int NT>
constexpr int block_threads() {
  return NT == 32 ? 32 * kWarpRows : NT;
}

constexpr int64_t kMaxGrid = 0x7fffffff;

// Launches one row per warp (V <= kWarpMaxV) or per block; `extra` follow the args struct.
template <class Args, class KW, class KB, class... Extra>
cudaError_t launch_rows(const Args& a, void* stream, KW warp_kernel, KB block_kernel, Extra... extra) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.V <= kWarpMaxV) {
    const int64_t blocks = (a.n + kWarpRows - 1) / kWarpRows;
    if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
    warp_kernel<<<unsigned(blocks), 32 * kWarpRows, 0, st>>>(a, extra...);
  } else {
    if (a.n > kMaxGrid) return cudaErrorInvalidConfiguration;
    block_kernel<<<unsigned(a.n), kBlockThreads, 0, st>>>(a, extra...);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda
}  // namespace fastpref

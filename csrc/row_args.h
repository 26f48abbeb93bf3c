// Argument structs of the native row kernels, shared by the CPU (logprobs_cpu.h, divergence_cpu.h) and CUDA
// (kernels_cuda.h) backends, whose semantics are the row-kernel contracts of fastpref/kernels/reference.py.
// Plain pointers only (host or device addresses, as the backend needs), so neither the kernels nor the
// Python modules depend on torch's C++ ABI.
#pragma once

#include <cstdint>

namespace fastpref {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows whose label is ignore_index or outside [0, V) are ignored: their logits are never read.
struct FwdArgs {
  const void* x;            // [n, V] logits of x_dtype, row r at x + r * x_row_stride elements
  int64_t x_row_stride;
  int64_t n, V;
  int x_dtype;
  const int64_t* labels;    // [n]
  float temperature, softcap;  // softcap <= 0: none
  int64_t ignore_index;
  float* logp;              // [n] fp32 outputs
  float* lse;
  float* entropy;           // null: entropy not computed
};

struct BwdArgs {
  const void* x;
  int64_t x_row_stride;
  int64_t n, V;
  int x_dtype;
  const int64_t* labels;
  const float* lse;           // [n] from the forward
  const float* entropy;       // null (with or without grad_entropy): no entropy term
  const float* grad_logp;     // null: no log-prob term
  const float* grad_entropy;  // null: no entropy term
  void* out;                  // [n, V] of out_dtype; may be exactly x (same rows, same dtype)
  int64_t out_row_stride;
  int out_dtype;
  float temperature, softcap;
  int64_t ignore_index;
};

enum DivId : int { kReverseKL = 0, kForwardKL = 1, kJS = 2, kAlpha = 3, kTV = 4, kHellinger = 5 };

// [n, V] logits of dtype `dtype`, row r at data + r * row_stride elements, each row contiguous.
struct InRows {
  const void* data;
  int64_t row_stride;
  int dtype;
};

struct OutRows {
  void* data;  // null: not written
  int64_t row_stride;
  int dtype;
};

// p = softmax(x / temperature), q = softmax(xr / temperature). Rows whose label is ignore_index give
// zeros and their logits are never read; labels == null masks nothing.
struct DivFwdArgs {
  InRows x, xr;
  int64_t n, V;
  const int64_t* labels;
  int64_t ignore_index;
  int div;       // DivId
  double param;  // js: beta, alpha: alpha, both in (0, 1); unused by the others
  float temperature;
  float* value;  // [n] fp32 outputs: D_f(p || q), log-sum-exps, sum_v pa_v, sum_v qb_v
  float* lse;
  float* lse_r;
  float* s_a;
  float* s_b;
};

struct DivBwdArgs {
  InRows x, xr;
  int64_t n, V;
  const int64_t* labels;
  int64_t ignore_index;
  int div;
  double param;
  float temperature;
  const float* lse;  // [n] from the forward
  const float* lse_r;
  const float* s_a;
  const float* s_b;
  const float* grad;  // [n] dL/dvalue
  // out_x = grad (pa - p s_a) / T, out_xr = grad (qb - q s_b) / T. Either may be exactly x or xr (same
  // rows, same dtype): every element is read before it is written.
  OutRows out_x, out_xr;
};

}  // namespace fastpref

// Native CPU f-divergence row kernels; semantics are div_forward / div_backward at the bottom of
// fastpref/kernels/reference.py, divergences and their kernel ids those of fastpref/divergences.py.
// Plain pointers only, like logprobs_cpu.h.
#pragma once

#include <cstdint>

#include "logprobs_cpu.h"  // DType

namespace fastpref {
namespace cpu {

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
  // rows, same dtype): every chunk is read before it is written.
  OutRows out_x, out_xr;
};

// num_threads <= 0: the OpenMP default.
void div_fwd(const DivFwdArgs& args, int num_threads);
void div_bwd(const DivBwdArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastpref

// Native CPU row kernels; semantics are the row-kernel contract of fastpref/kernels/reference.py.
// Plain pointers only, so neither this nor the Python module depends on torch's C++ ABI.
#pragma once

#include <cstdint>
#include <string>

namespace fastpref {
namespace cpu {

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

// num_threads <= 0: the OpenMP default.
void logprobs_fwd(const FwdArgs& args, int num_threads);
void logprobs_bwd(const BwdArgs& args, int num_threads);

int max_threads();
std::string build_info();

}  // namespace cpu
}  // namespace fastpref

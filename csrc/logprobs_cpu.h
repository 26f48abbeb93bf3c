// Native CPU row kernels; semantics are the row-kernel contract of fastpref/kernels/reference.py, arguments
// the structs of row_args.h (shared with the CUDA kernels).
#pragma once

#include <cstdint>
#include <string>

#include "row_args.h"

namespace fastpref {
namespace cpu {

// num_threads <= 0: the OpenMP default.
void logprobs_fwd(const FwdArgs& args, int num_threads);
void logprobs_bwd(const BwdArgs& args, int num_threads);

int max_threads();
std::string build_info();

}  // namespace cpu
}  // namespace fastpref

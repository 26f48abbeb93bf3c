// CUDA row kernels; semantics are the row-kernel contracts of fastpref/kernels/reference.py (row_* and div_*),
// arguments the structs of row_args.h, as for the CPU twins (logprobs_cpu.h, divergence_cpu.h). No CUDA header
// here; every pointer is a device address and every launch goes to `stream` (a cudaStream_t; null is the
// legacy default stream). Out-of-place outputs must not overlap the inputs; an output may be exactly an input
// of the same dtype and row stride (each thread reads its elements before writing them).
#pragma once

#include <cstdint>
#include <string>

#include "row_args.h"

namespace fastpref {
namespace cuda {

// Each returns a cudaError_t (0: launched); error_string() names one.
int logprobs_fwd(const FwdArgs& args, void* stream);
int logprobs_bwd(const BwdArgs& args, void* stream);
int div_fwd(const DivFwdArgs& args, void* stream);
int div_bwd(const DivBwdArgs& args, void* stream);

// "cudaErrorName: description" of a cudaError_t.
std::string error_string(int code);

}  // namespace cuda
}  // namespace fastpref

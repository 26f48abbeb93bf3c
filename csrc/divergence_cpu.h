// Native CPU f-divergence row kernels; semantics are div_forward / div_backward at the bottom of
// fastpref/kernels/reference.py, divergences and their kernel ids those of fastpref/divergences.py,
// arguments the structs of row_args.h (shared with the CUDA kernels).
#pragma once

#include "row_args.h"

namespace fastpref {
namespace cpu {

// num_threads <= 0: the OpenMP default.
void div_fwd(const DivFwdArgs& args, int num_threads);
void div_bwd(const DivBwdArgs& args, int num_threads);

}  // namespace cpu
}  // namespace fastpref

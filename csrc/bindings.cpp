// fastpref._C: the native CPU kernels behind fastpref/kernels/cpu.py. The functions, their arguments and
// checks are bindings_common.h's (shared with fastpref._C_cuda); the last argument is the thread count.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings_common.h"
#include "divergence_cpu.h"
#include "logprobs_cpu.h"

namespace py = pybind11;
namespace fc = fastpref::cpu;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpref native CPU row kernels (raw-pointer interface; see fastpref/kernels/cpu.py)";

  // Each kernel runs with the GIL released, on num_threads OpenMP threads.
  const auto kernels = fastpref::bind::kernels(
      [](const fastpref::FwdArgs& a, std::int64_t threads) {
        py::gil_scoped_release release;
        fc::logprobs_fwd(a, int(threads));
      },
      [](const fastpref::BwdArgs& a, std::int64_t threads) {
        py::gil_scoped_release release;
        fc::logprobs_bwd(a, int(threads));
      },
      [](const fastpref::DivFwdArgs& a, std::int64_t threads) {
        py::gil_scoped_release release;
        fc::div_fwd(a, int(threads));
      },
      [](const fastpref::DivBwdArgs& a, std::int64_t threads) {
        py::gil_scoped_release release;
        fc::div_bwd(a, int(threads));
      });
  fastpref::bind::def_row_kernels(m, kernels, "num_threads",
                                  "num_threads <= 0 uses the OpenMP default. Releases the GIL.");

  m.def("num_threads", &fc::max_threads, "Threads a call with num_threads <= 0 uses (omp_get_max_threads, 1 without OpenMP).");
  m.def("build_info", &fc::build_info, "Compiler, OpenMP and instruction-set clones this module was built with.");
}

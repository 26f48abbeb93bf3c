// fastpref._C_cuda: the CUDA kernels behind fastpref/kernels/cuda.py. The functions, their arguments and
// checks are bindings_common.h's (shared with fastpref._C); the last argument is the CUDA stream to launch
// on, as an int (torch.cuda.current_stream().cuda_stream; 0 is the legacy default stream), and every
// pointer is a device address. Launches are asynchronous: a launch error raises RuntimeError here, a fault
// while a kernel runs surfaces at the next synchronizing call, as for any CUDA work.
//
// The CUDA runtime is linked statically and talks to the driver only on the first call, so this module
// imports on machines with no GPU or driver; device_count() then says why there is no device.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings_common.h"
#include "kernels_cuda.h"

namespace py = pybind11;
namespace fcu = fastpref::cuda;

#ifndef FASTPREF_CUDA_ARCHS
#define FASTPREF_CUDA_ARCHS "unknown"
#endif

namespace {

void check_launch(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string("fastpref._C_cuda.") + what + ": " + fcu::error_string(code));
}

void* as_stream(std::int64_t stream) { return reinterpret_cast<void*>(static_cast<std::uintptr_t>(stream)); }

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

std::string build_info() {
  int driver = 0;
  const bool has_driver = cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0;
  return "CUDA runtime " + version_string(CUDART_VERSION) + " (static); architectures " FASTPREF_CUDA_ARCHS
         "; driver " + (has_driver ? version_string(driver) : std::string("none"));
}

// (count, why): why is "" when there is at least one device.
py::tuple device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    const std::string why = fcu::error_string(int(err));
    cudaGetLastError();  // not sticky: clear it so that it does not surface as a later launch's error
    return py::make_tuple(0, why);
  }
  return py::make_tuple(count, count > 0 ? "" : "no CUDA device");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastpref CUDA row kernels (raw-pointer interface; see fastpref/kernels/cuda.py)";

  const auto kernels = fastpref::bind::kernels(
      [](const fastpref::FwdArgs& a, std::int64_t s) { check_launch(fcu::logprobs_fwd(a, as_stream(s)), "logprobs_fwd"); },
      [](const fastpref::BwdArgs& a, std::int64_t s) { check_launch(fcu::logprobs_bwd(a, as_stream(s)), "logprobs_bwd"); },
      [](const fastpref::DivFwdArgs& a, std::int64_t s) { check_launch(fcu::div_fwd(a, as_stream(s)), "div_fwd"); },
      [](const fastpref::DivBwdArgs& a, std::int64_t s) { check_launch(fcu::div_bwd(a, as_stream(s)), "div_bwd"); });
  fastpref::bind::def_row_kernels(
      m, kernels, "stream",
      "Pointers are device addresses on the current device; the kernels are launched asynchronously on stream "
      "(a cudaStream_t as an int, 0: the legacy default stream). A launch error raises RuntimeError.");

  m.def("build_info", &build_info, "CUDA runtime and architectures this module was built for, and the driver's version.");
  m.def("device_count", &device_count,
        "(count, why): CUDA devices this module's runtime sees, and why there are none (\"\" when count > 0).");
}

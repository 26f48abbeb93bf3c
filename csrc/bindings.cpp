// fastpref._C: the native CPU kernels behind fastpref/kernels/cpu.py.
// Tensors cross as raw addresses (Python ints, e.g. tensor.data_ptr()), so building this module
// needs neither torch nor its C++ ABI; the Python wrapper owns every shape, dtype and lifetime check.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "logprobs_cpu.h"

namespace py = pybind11;
namespace fc = fastpref::cpu;

namespace {

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check_dtype(int code, const char* what) {
  if (code != fc::kFloat32 && code != fc::kBFloat16 && code != fc::kFloat16)
    throw py::value_error(std::string(what) + ": dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

void check_common(std::uintptr_t x, std::int64_t x_row_stride, std::int64_t n, std::int64_t V,
                  std::uintptr_t labels, double temperature, double softcap) {
  if (n < 0 || V < 0) throw py::value_error("n and V must be >= 0");
  if (x_row_stride < 0) throw py::value_error("x_row_stride must be >= 0");
  if (n > 0 && labels == 0) throw py::value_error("labels_ptr must be non-null");
  if (n > 0 && V > 0 && x == 0) throw py::value_error("x_ptr must be non-null");
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    throw py::value_error("temperature must be a positive finite number");
  if (!std::isfinite(softcap)) throw py::value_error("softcap must be finite (<= 0 disables it)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpref native CPU row kernels (raw-pointer interface; see fastpref/kernels/cpu.py)";

  m.def(
      "logprobs_fwd",
      [](std::uintptr_t x_ptr, std::int64_t x_row_stride, std::int64_t n, std::int64_t V, int x_dtype,
         std::uintptr_t labels_ptr, double temperature, double softcap, std::int64_t ignore_index,
         std::uintptr_t logp_ptr, std::uintptr_t lse_ptr, std::uintptr_t entropy_ptr, int num_threads) {
        check_dtype(x_dtype, "x_dtype");
        check_common(x_ptr, x_row_stride, n, V, labels_ptr, temperature, softcap);
        if (n > 0 && (logp_ptr == 0 || lse_ptr == 0)) throw py::value_error("logp_ptr and lse_ptr must be non-null");
        fc::FwdArgs a;
        a.x = as_ptr<const void>(x_ptr);
        a.x_row_stride = x_row_stride;
        a.n = n;
        a.V = V;
        a.x_dtype = x_dtype;
        a.labels = as_ptr<const std::int64_t>(labels_ptr);
        a.temperature = float(temperature);
        a.softcap = float(softcap);
        a.ignore_index = ignore_index;
        a.logp = as_ptr<float>(logp_ptr);
        a.lse = as_ptr<float>(lse_ptr);
        a.entropy = as_ptr<float>(entropy_ptr);
        py::gil_scoped_release release;
        fc::logprobs_fwd(a, num_threads);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("n"), py::arg("V"), py::arg("x_dtype"),
      py::arg("labels_ptr"), py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"),
      py::arg("logp_ptr"), py::arg("lse_ptr"), py::arg("entropy_ptr"), py::arg("num_threads") = 0,
      R"doc(Row forward: log-probability of the label, log-sum-exp and (optionally) entropy per row.

x_ptr: address of [n, V] logits (dtype code x_dtype: 0 float32, 1 bfloat16, 2 float16), row r
starting x_row_stride elements after row r - 1, each row contiguous. labels_ptr: [n] int64.
z = softcap * tanh(x / softcap) / temperature (softcap <= 0: z = x / temperature).
Writes fp32 [n] logp = z_label - lse, lse = logsumexp(z) and, when entropy_ptr != 0,
entropy = lse - sum softmax(z) * z. Rows whose label is ignore_index or outside [0, V) get 0s and
their logits are not read. num_threads <= 0 uses the OpenMP default. Releases the GIL.)doc");

  m.def(
      "logprobs_bwd",
      [](std::uintptr_t x_ptr, std::int64_t x_row_stride, std::int64_t n, std::int64_t V, int x_dtype,
         std::uintptr_t labels_ptr, std::uintptr_t lse_ptr, std::uintptr_t entropy_ptr,
         std::uintptr_t grad_logp_ptr, std::uintptr_t grad_entropy_ptr, std::uintptr_t out_ptr,
         std::int64_t out_row_stride, int out_dtype, double temperature, double softcap,
         std::int64_t ignore_index, int num_threads) {
        check_dtype(x_dtype, "x_dtype");
        check_dtype(out_dtype, "out_dtype");
        check_common(x_ptr, x_row_stride, n, V, labels_ptr, temperature, softcap);
        if (n > 1 && out_row_stride < V) throw py::value_error("out_row_stride must be >= V");
        if (n > 0 && lse_ptr == 0) throw py::value_error("lse_ptr must be non-null");
        if (n > 0 && V > 0 && out_ptr == 0) throw py::value_error("out_ptr must be non-null");
        if (out_ptr == x_ptr && (out_dtype != x_dtype || out_row_stride != x_row_stride))
          throw py::value_error("out may alias x only with the same dtype and row stride");
        fc::BwdArgs a;
        a.x = as_ptr<const void>(x_ptr);
        a.x_row_stride = x_row_stride;
        a.n = n;
        a.V = V;
        a.x_dtype = x_dtype;
        a.labels = as_ptr<const std::int64_t>(labels_ptr);
        a.lse = as_ptr<const float>(lse_ptr);
        a.entropy = as_ptr<const float>(entropy_ptr);
        a.grad_logp = as_ptr<const float>(grad_logp_ptr);
        a.grad_entropy = as_ptr<const float>(grad_entropy_ptr);
        a.out = as_ptr<void>(out_ptr);
        a.out_row_stride = out_row_stride;
        a.out_dtype = out_dtype;
        a.temperature = float(temperature);
        a.softcap = float(softcap);
        a.ignore_index = ignore_index;
        py::gil_scoped_release release;
        fc::logprobs_bwd(a, num_threads);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("n"), py::arg("V"), py::arg("x_dtype"),
      py::arg("labels_ptr"), py::arg("lse_ptr"), py::arg("entropy_ptr"), py::arg("grad_logp_ptr"),
      py::arg("grad_entropy_ptr"), py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("out_dtype"),
      py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"), py::arg("num_threads") = 0,
      R"doc(Row backward: writes dL/dx for L = sum grad_logp * logp + grad_entropy * entropy.

Same x / labels / temperature / softcap / ignore_index conventions as logprobs_fwd; lse_ptr and
entropy_ptr are the forward's fp32 [n] outputs. grad_logp_ptr == 0 drops the log-prob term;
entropy_ptr == 0 or grad_entropy_ptr == 0 drops the entropy term. out_ptr: [n, V] of dtype code
out_dtype with row stride out_row_stride; it may be x_ptr itself (same dtype and stride), since
every element is read before it is written. Ignored rows are zero-filled. Releases the GIL.)doc");

  m.def("num_threads", &fc::max_threads, "Threads a call with num_threads <= 0 uses (omp_get_max_threads, 1 without OpenMP).");
  m.def("build_info", &fc::build_info, "Compiler, OpenMP and instruction-set clones this module was built with.");
}

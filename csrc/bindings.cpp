// fastpref._C: the native CPU kernels behind fastpref/kernels/cpu.py.
// Tensors cross as raw addresses (Python ints, e.g. tensor.data_ptr()), so building this module
// needs neither torch nor its C++ ABI; the Python wrapper owns every shape, dtype and lifetime check.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "divergence_cpu.h"
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

void check_temperature(double temperature) {
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    throw py::value_error("temperature must be a positive finite number");
}

void check_common(std::uintptr_t x, std::int64_t x_row_stride, std::int64_t n, std::int64_t V,
                  std::uintptr_t labels, double temperature, double softcap) {
  if (n < 0 || V < 0) throw py::value_error("n and V must be >= 0");
  if (x_row_stride < 0) throw py::value_error("x_row_stride must be >= 0");
  if (n > 0 && labels == 0) throw py::value_error("labels_ptr must be non-null");
  if (n > 0 && V > 0 && x == 0) throw py::value_error("x_ptr must be non-null");
  check_temperature(temperature);
  if (!std::isfinite(softcap)) throw py::value_error("softcap must be finite (<= 0 disables it)");
}

// [n, V] rows of a divergence kernel, `what` naming them in errors. Inputs may overlap (a broadcast
// row has stride 0); outputs may not.
void check_rows(std::uintptr_t ptr, std::int64_t row_stride, int dtype, std::int64_t n, std::int64_t V,
                const std::string& what, bool output) {
  check_dtype(dtype, (what + "_dtype").c_str());
  if (row_stride < 0) throw py::value_error(what + "_row_stride must be >= 0");
  if (output && n > 1 && row_stride < V) throw py::value_error(what + "_row_stride must be >= V");
  if (n > 0 && V > 0 && ptr == 0) throw py::value_error(what + "_ptr must be non-null");
}

void check_divergence(std::int64_t n, std::int64_t V, int div_id, double param, double temperature) {
  if (n < 0 || V < 0) throw py::value_error("n and V must be >= 0");
  if (div_id < fc::kReverseKL || div_id > fc::kHellinger)
    throw py::value_error("div_id must be a kernel id of fastpref.divergences (0 to 5), got " +
                          std::to_string(div_id));
  if ((div_id == fc::kJS || div_id == fc::kAlpha) && !(param > 0.0 && param < 1.0))
    throw py::value_error("param must lie in the open interval (0, 1) for js and alpha");
  check_temperature(temperature);
}

fc::InRows in_rows(std::uintptr_t ptr, std::int64_t row_stride, int dtype) {
  return {as_ptr<const void>(ptr), row_stride, dtype};
}

// An output that is one of the inputs is overwritten chunk by chunk after reading it, which is only
// safe when both walk the same elements in the same order.
void check_alias(std::uintptr_t out, std::int64_t out_stride, int out_dtype, std::uintptr_t in,
                 std::int64_t in_stride, int in_dtype) {
  if (out != 0 && out == in && (out_dtype != in_dtype || out_stride != in_stride))
    throw py::value_error("an output may alias an input only with the same dtype and row stride");
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

  m.def(
      "div_fwd",
      [](std::uintptr_t x_ptr, std::int64_t x_row_stride, int x_dtype, std::uintptr_t xr_ptr,
         std::int64_t xr_row_stride, int xr_dtype, std::int64_t n, std::int64_t V, std::uintptr_t labels_ptr,
         std::int64_t ignore_index, int div_id, double param, double temperature, std::uintptr_t value_ptr,
         std::uintptr_t lse_ptr, std::uintptr_t lse_r_ptr, std::uintptr_t s_a_ptr, std::uintptr_t s_b_ptr,
         int num_threads) {
        check_divergence(n, V, div_id, param, temperature);
        check_rows(x_ptr, x_row_stride, x_dtype, n, V, "x", false);
        check_rows(xr_ptr, xr_row_stride, xr_dtype, n, V, "xr", false);
        if (n > 0 && (value_ptr == 0 || lse_ptr == 0 || lse_r_ptr == 0 || s_a_ptr == 0 || s_b_ptr == 0))
          throw py::value_error("value_ptr, lse_ptr, lse_r_ptr, s_a_ptr and s_b_ptr must be non-null");
        fc::DivFwdArgs a;
        a.x = in_rows(x_ptr, x_row_stride, x_dtype);
        a.xr = in_rows(xr_ptr, xr_row_stride, xr_dtype);
        a.n = n;
        a.V = V;
        a.labels = as_ptr<const std::int64_t>(labels_ptr);
        a.ignore_index = ignore_index;
        a.div = div_id;
        a.param = param;
        a.temperature = float(temperature);
        a.value = as_ptr<float>(value_ptr);
        a.lse = as_ptr<float>(lse_ptr);
        a.lse_r = as_ptr<float>(lse_r_ptr);
        a.s_a = as_ptr<float>(s_a_ptr);
        a.s_b = as_ptr<float>(s_b_ptr);
        py::gil_scoped_release release;
        fc::div_fwd(a, num_threads);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("xr_ptr"), py::arg("xr_row_stride"),
      py::arg("xr_dtype"), py::arg("n"), py::arg("V"), py::arg("labels_ptr"), py::arg("ignore_index"),
      py::arg("div_id"), py::arg("param"), py::arg("temperature"), py::arg("value_ptr"), py::arg("lse_ptr"),
      py::arg("lse_r_ptr"), py::arg("s_a_ptr"), py::arg("s_b_ptr"), py::arg("num_threads") = 0,
      R"doc(Divergence row forward: D_f(p || q) per row pair, p = softmax(x / T), q = softmax(xr / T).

x_ptr, xr_ptr: addresses of [n, V] policy and reference logits (dtype codes as for logprobs_fwd, may
differ), each row contiguous, rows x_row_stride / xr_row_stride elements apart. labels_ptr: [n] int64,
or 0 to mask nothing; rows labelled ignore_index get 0s and their logits are not read. div_id: the
kernel id of fastpref.divergences (0 reverse_kl, 1 forward_kl, 2 js, 3 alpha, 4 tv, 5 hellinger); param:
js's beta or alpha's alpha, in (0, 1). Writes fp32 [n] value, lse = logsumexp(x / T),
lse_r = logsumexp(xr / T), s_a = sum pa and s_b = sum qb (the registry's terms). Releases the GIL.)doc");

  m.def(
      "div_bwd",
      [](std::uintptr_t x_ptr, std::int64_t x_row_stride, int x_dtype, std::uintptr_t xr_ptr,
         std::int64_t xr_row_stride, int xr_dtype, std::int64_t n, std::int64_t V, std::uintptr_t labels_ptr,
         std::int64_t ignore_index, int div_id, double param, double temperature, std::uintptr_t lse_ptr,
         std::uintptr_t lse_r_ptr, std::uintptr_t s_a_ptr, std::uintptr_t s_b_ptr, std::uintptr_t grad_ptr,
         std::uintptr_t out_x_ptr, std::int64_t out_x_row_stride, int out_x_dtype, std::uintptr_t out_xr_ptr,
         std::int64_t out_xr_row_stride, int out_xr_dtype, int num_threads) {
        check_divergence(n, V, div_id, param, temperature);
        check_rows(x_ptr, x_row_stride, x_dtype, n, V, "x", false);
        check_rows(xr_ptr, xr_row_stride, xr_dtype, n, V, "xr", false);
        if (out_x_ptr != 0) check_rows(out_x_ptr, out_x_row_stride, out_x_dtype, n, V, "out_x", true);
        if (out_xr_ptr != 0) check_rows(out_xr_ptr, out_xr_row_stride, out_xr_dtype, n, V, "out_xr", true);
        if (out_x_ptr != 0 && out_x_ptr == out_xr_ptr) throw py::value_error("out_x and out_xr must differ");
        check_alias(out_x_ptr, out_x_row_stride, out_x_dtype, x_ptr, x_row_stride, x_dtype);
        check_alias(out_x_ptr, out_x_row_stride, out_x_dtype, xr_ptr, xr_row_stride, xr_dtype);
        check_alias(out_xr_ptr, out_xr_row_stride, out_xr_dtype, x_ptr, x_row_stride, x_dtype);
        check_alias(out_xr_ptr, out_xr_row_stride, out_xr_dtype, xr_ptr, xr_row_stride, xr_dtype);
        if (n > 0 && (lse_ptr == 0 || lse_r_ptr == 0 || s_a_ptr == 0 || s_b_ptr == 0 || grad_ptr == 0))
          throw py::value_error("lse_ptr, lse_r_ptr, s_a_ptr, s_b_ptr and grad_ptr must be non-null");
        fc::DivBwdArgs a;
        a.x = in_rows(x_ptr, x_row_stride, x_dtype);
        a.xr = in_rows(xr_ptr, xr_row_stride, xr_dtype);
        a.n = n;
        a.V = V;
        a.labels = as_ptr<const std::int64_t>(labels_ptr);
        a.ignore_index = ignore_index;
        a.div = div_id;
        a.param = param;
        a.temperature = float(temperature);
        a.lse = as_ptr<const float>(lse_ptr);
        a.lse_r = as_ptr<const float>(lse_r_ptr);
        a.s_a = as_ptr<const float>(s_a_ptr);
        a.s_b = as_ptr<const float>(s_b_ptr);
        a.grad = as_ptr<const float>(grad_ptr);
        a.out_x = {as_ptr<void>(out_x_ptr), out_x_row_stride, out_x_dtype};
        a.out_xr = {as_ptr<void>(out_xr_ptr), out_xr_row_stride, out_xr_dtype};
        py::gil_scoped_release release;
        fc::div_bwd(a, num_threads);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("xr_ptr"), py::arg("xr_row_stride"),
      py::arg("xr_dtype"), py::arg("n"), py::arg("V"), py::arg("labels_ptr"), py::arg("ignore_index"),
      py::arg("div_id"), py::arg("param"), py::arg("temperature"), py::arg("lse_ptr"), py::arg("lse_r_ptr"),
      py::arg("s_a_ptr"), py::arg("s_b_ptr"), py::arg("grad_ptr"), py::arg("out_x_ptr"),
      py::arg("out_x_row_stride"), py::arg("out_x_dtype"), py::arg("out_xr_ptr"), py::arg("out_xr_row_stride"),
      py::arg("out_xr_dtype"), py::arg("num_threads") = 0,
      R"doc(Divergence row backward: writes out_x = grad (pa - p s_a) / T and out_xr = grad (qb - q s_b) / T.

Same x / xr / labels / div_id / param / temperature conventions as div_fwd; lse_ptr .. s_b_ptr are its
fp32 [n] outputs, grad_ptr the fp32 [n] gradient of value. out_x_ptr / out_xr_ptr: [n, V] of their dtype
code and row stride, or 0 to skip that side; each may be x_ptr or xr_ptr itself (same dtype and stride),
since every chunk of both rows is read before it is written. Masked rows are zero-filled. Releases the
GIL.)doc");

  m.def("num_threads", &fc::max_threads, "Threads a call with num_threads <= 0 uses (omp_get_max_threads, 1 without OpenMP).");
  m.def("build_info", &fc::build_info, "Compiler, OpenMP and instruction-set clones this module was built with.");
}

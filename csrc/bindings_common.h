// The Python interface shared by fastpref._C (bindings.cpp, CPU kernels) and fastpref._C_cuda
// (bindings_cuda.cpp, CUDA kernels): the same four functions with the same arguments and checks, each
// module adding one last argument (num_threads, or the CUDA stream) and the call of its kernels.
// Tensors cross as raw addresses (Python ints, e.g. tensor.data_ptr()), so building either module needs
// neither torch nor its C++ ABI; the Python wrappers own every shape, dtype and lifetime check.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "row_args.h"

namespace fastpref {
namespace bind {

namespace py = pybind11;

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline void check_dtype(int code, const char* what) {
  if (code != kFloat32 && code != kBFloat16 && code != kFloat16)
    throw py::value_error(std::string(what) + ": dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

inline void check_temperature(double temperature) {
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    throw py::value_error("temperature must be a positive finite number");
}

inline void check_common(std::uintptr_t x, std::int64_t x_row_stride, std::int64_t n, std::int64_t V,
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
inline void check_rows(std::uintptr_t ptr, std::int64_t row_stride, int dtype, std::int64_t n, std::int64_t V,
                       const std::string& what, bool output) {
  check_dtype(dtype, (what + "_dtype").c_str());
  if (row_stride < 0) throw py::value_error(what + "_row_stride must be >= 0");
  if (output && n > 1 && row_stride < V) throw py::value_error(what + "_row_stride must be >= V");
  if (n > 0 && V > 0 && ptr == 0) throw py::value_error(what + "_ptr must be non-null");
}

inline void check_divergence(std::int64_t n, std::int64_t V, int div_id, double param, double temperature) {
  if (n < 0 || V < 0) throw py::value_error("n and V must be >= 0");
  if (div_id < kReverseKL || div_id > kHellinger)
    throw py::value_error("div_id must be a kernel id of fastpref.divergences (0 to 5), got " +
                          std::to_string(div_id));
  if ((div_id == kJS || div_id == kAlpha) && !(param > 0.0 && param < 1.0))
    throw py::value_error("param must lie in the open interval (0, 1) for js and alpha");
  check_temperature(temperature);
}

// An output that is one of the inputs is overwritten after reading it, which is only safe when both walk
// the same elements in the same order.
inline void check_alias(std::uintptr_t out, std::int64_t out_stride, int out_dtype, std::uintptr_t in,
                        std::int64_t in_stride, int in_dtype) {
  if (out != 0 && out == in && (out_dtype != in_dtype || out_stride != in_stride))
    throw py::value_error("an output may alias an input only with the same dtype and row stride");
}

// The arguments logprobs_fwd and logprobs_bwd share, checked, in the args struct A (FwdArgs or BwdArgs).
template <class A>
A row_args(std::uintptr_t x_ptr, std::int64_t x_row_stride, std::int64_t n, std::int64_t V, int x_dtype,
           std::uintptr_t labels_ptr, double temperature, double softcap, std::int64_t ignore_index) {
  check_dtype(x_dtype, "x_dtype");
  check_common(x_ptr, x_row_stride, n, V, labels_ptr, temperature, softcap);
  A a;
  a.x = as_ptr<const void>(x_ptr);
  a.x_row_stride = x_row_stride;
  a.n = n;
  a.V = V;
  a.x_dtype = x_dtype;
  a.labels = as_ptr<const std::int64_t>(labels_ptr);
  a.temperature = float(temperature);
  a.softcap = float(softcap);
  a.ignore_index = ignore_index;
  return a;
}

// The arguments div_fwd and div_bwd share, checked, in the args struct A (DivFwdArgs or DivBwdArgs).
template <class A>
A div_args(std::uintptr_t x_ptr, std::int64_t x_row_stride, int x_dtype, std::uintptr_t xr_ptr,
           std::int64_t xr_row_stride, int xr_dtype, std::int64_t n, std::int64_t V, std::uintptr_t labels_ptr,
           std::int64_t ignore_index, int div_id, double param, double temperature) {
  check_divergence(n, V, div_id, param, temperature);
  check_rows(x_ptr, x_row_stride, x_dtype, n, V, "x", false);
  check_rows(xr_ptr, xr_row_stride, xr_dtype, n, V, "xr", false);
  A a;
  a.x = {as_ptr<const void>(x_ptr), x_row_stride, x_dtype};
  a.xr = {as_ptr<const void>(xr_ptr), xr_row_stride, xr_dtype};
  a.n = n;
  a.V = V;
  a.labels = as_ptr<const std::int64_t>(labels_ptr);
  a.ignore_index = ignore_index;
  a.div = div_id;
  a.param = param;
  a.temperature = float(temperature);
  return a;
}

// The kernels of one backend: each member runs its kernel on args already checked, given the module's
// last argument (`extra`).
template <class Fwd, class Bwd, class DivFwd, class DivBwd>
struct Kernels {
  Fwd logprobs_fwd;
  Bwd logprobs_bwd;
  DivFwd div_fwd;
  DivBwd div_bwd;
};

template <class Fwd, class Bwd, class DivFwd, class DivBwd>
Kernels<Fwd, Bwd, DivFwd, DivBwd> kernels(Fwd fwd, Bwd bwd, DivFwd div_fwd, DivBwd div_bwd) {
  return {fwd, bwd, div_fwd, div_bwd};
}

// Defines logprobs_fwd, logprobs_bwd, div_fwd and div_bwd on `m`. `extra_arg` names the last argument
// (default 0) and `note` ends every docstring with what it means for this backend.
template <class K>
void def_row_kernels(py::module_& m, const K& k, const char* extra_arg, const std::string& note) {
  m.def(
      "logprobs_fwd",
      [k](std::uintptr_t x_ptr, std::int64_t x_row_stride, std::int64_t n, std::int64_t V, int x_dtype,
          std::uintptr_t labels_ptr, double temperature, double softcap, std::int64_t ignore_index,
          std::uintptr_t logp_ptr, std::uintptr_t lse_ptr, std::uintptr_t entropy_ptr, std::int64_t extra) {
        auto a = row_args<FwdArgs>(x_ptr, x_row_stride, n, V, x_dtype, labels_ptr, temperature, softcap, ignore_index);
        if (n > 0 && (logp_ptr == 0 || lse_ptr == 0)) throw py::value_error("logp_ptr and lse_ptr must be non-null");
        a.logp = as_ptr<float>(logp_ptr);
        a.lse = as_ptr<float>(lse_ptr);
        a.entropy = as_ptr<float>(entropy_ptr);
        k.logprobs_fwd(a, extra);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("n"), py::arg("V"), py::arg("x_dtype"),
      py::arg("labels_ptr"), py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"),
      py::arg("logp_ptr"), py::arg("lse_ptr"), py::arg("entropy_ptr"), py::arg(extra_arg) = 0,
      (R"doc(Row forward: log-probability of the label, log-sum-exp and (optionally) entropy per row.

x_ptr: address of [n, V] logits (dtype code x_dtype: 0 float32, 1 bfloat16, 2 float16), row r
starting x_row_stride elements after row r - 1, each row contiguous. labels_ptr: [n] int64.
z = softcap * tanh(x / softcap) / temperature (softcap <= 0: z = x / temperature).
Writes fp32 [n] logp = z_label - lse, lse = logsumexp(z) and, when entropy_ptr != 0,
entropy = lse - sum softmax(z) * z. Rows whose label is ignore_index or outside [0, V) get 0s and
their logits are not read. )doc" + note).c_str());

  m.def(
      "logprobs_bwd",
      [k](std::uintptr_t x_ptr, std::int64_t x_row_stride, std::int64_t n, std::int64_t V, int x_dtype,
          std::uintptr_t labels_ptr, std::uintptr_t lse_ptr, std::uintptr_t entropy_ptr,
          std::uintptr_t grad_logp_ptr, std::uintptr_t grad_entropy_ptr, std::uintptr_t out_ptr,
          std::int64_t out_row_stride, int out_dtype, double temperature, double softcap,
          std::int64_t ignore_index, std::int64_t extra) {
        auto a = row_args<BwdArgs>(x_ptr, x_row_stride, n, V, x_dtype, labels_ptr, temperature, softcap, ignore_index);
        check_dtype(out_dtype, "out_dtype");
        if (n > 1 && out_row_stride < V) throw py::value_error("out_row_stride must be >= V");
        if (n > 0 && lse_ptr == 0) throw py::value_error("lse_ptr must be non-null");
        if (n > 0 && V > 0 && out_ptr == 0) throw py::value_error("out_ptr must be non-null");
        if (out_ptr == x_ptr && (out_dtype != x_dtype || out_row_stride != x_row_stride))
          throw py::value_error("out may alias x only with the same dtype and row stride");
        a.lse = as_ptr<const float>(lse_ptr);
        a.entropy = as_ptr<const float>(entropy_ptr);
        a.grad_logp = as_ptr<const float>(grad_logp_ptr);
        a.grad_entropy = as_ptr<const float>(grad_entropy_ptr);
        a.out = as_ptr<void>(out_ptr);
        a.out_row_stride = out_row_stride;
        a.out_dtype = out_dtype;
        k.logprobs_bwd(a, extra);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("n"), py::arg("V"), py::arg("x_dtype"),
      py::arg("labels_ptr"), py::arg("lse_ptr"), py::arg("entropy_ptr"), py::arg("grad_logp_ptr"),
      py::arg("grad_entropy_ptr"), py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("out_dtype"),
      py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"), py::arg(extra_arg) = 0,
      (R"doc(Row backward: writes dL/dx for L = sum grad_logp * logp + grad_entropy * entropy.

Same x / labels / temperature / softcap / ignore_index conventions as logprobs_fwd; lse_ptr and
entropy_ptr are the forward's fp32 [n] outputs. grad_logp_ptr == 0 drops the log-prob term;
entropy_ptr == 0 or grad_entropy_ptr == 0 drops the entropy term. out_ptr: [n, V] of dtype code
out_dtype with row stride out_row_stride; it may be x_ptr itself (same dtype and stride), since
every element is read before it is written. Ignored rows are zero-filled. )doc" + note).c_str());

  m.def(
      "div_fwd",
      [k](std::uintptr_t x_ptr, std::int64_t x_row_stride, int x_dtype, std::uintptr_t xr_ptr,
          std::int64_t xr_row_stride, int xr_dtype, std::int64_t n, std::int64_t V, std::uintptr_t labels_ptr,
          std::int64_t ignore_index, int div_id, double param, double temperature, std::uintptr_t value_ptr,
          std::uintptr_t lse_ptr, std::uintptr_t lse_r_ptr, std::uintptr_t s_a_ptr, std::uintptr_t s_b_ptr,
          std::int64_t extra) {
        auto a = div_args<DivFwdArgs>(x_ptr, x_row_stride, x_dtype, xr_ptr, xr_row_stride, xr_dtype, n, V, labels_ptr,
                                      ignore_index, div_id, param, temperature);
        if (n > 0 && (value_ptr == 0 || lse_ptr == 0 || lse_r_ptr == 0 || s_a_ptr == 0 || s_b_ptr == 0))
          throw py::value_error("value_ptr, lse_ptr, lse_r_ptr, s_a_ptr and s_b_ptr must be non-null");
        a.value = as_ptr<float>(value_ptr);
        a.lse = as_ptr<float>(lse_ptr);
        a.lse_r = as_ptr<float>(lse_r_ptr);
        a.s_a = as_ptr<float>(s_a_ptr);
        a.s_b = as_ptr<float>(s_b_ptr);
        k.div_fwd(a, extra);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("xr_ptr"), py::arg("xr_row_stride"),
      py::arg("xr_dtype"), py::arg("n"), py::arg("V"), py::arg("labels_ptr"), py::arg("ignore_index"),
      py::arg("div_id"), py::arg("param"), py::arg("temperature"), py::arg("value_ptr"), py::arg("lse_ptr"),
      py::arg("lse_r_ptr"), py::arg("s_a_ptr"), py::arg("s_b_ptr"), py::arg(extra_arg) = 0,
      (R"doc(Divergence row forward: D_f(p || q) per row pair, p = softmax(x / T), q = softmax(xr / T).

x_ptr, xr_ptr: addresses of [n, V] policy and reference logits (dtype codes as for logprobs_fwd, may
differ), each row contiguous, rows x_row_stride / xr_row_stride elements apart. labels_ptr: [n] int64,
or 0 to mask nothing; rows labelled ignore_index get 0s and their logits are not read. div_id: the
kernel id of fastpref.divergences (0 reverse_kl, 1 forward_kl, 2 js, 3 alpha, 4 tv, 5 hellinger); param:
js's beta or alpha's alpha, in (0, 1). Writes fp32 [n] value, lse = logsumexp(x / T),
lse_r = logsumexp(xr / T), s_a = sum pa and s_b = sum qb (the registry's terms). )doc" + note).c_str());

  m.def(
      "div_bwd",
      [k](std::uintptr_t x_ptr, std::int64_t x_row_stride, int x_dtype, std::uintptr_t xr_ptr,
          std::int64_t xr_row_stride, int xr_dtype, std::int64_t n, std::int64_t V, std::uintptr_t labels_ptr,
          std::int64_t ignore_index, int div_id, double param, double temperature, std::uintptr_t lse_ptr,
          std::uintptr_t lse_r_ptr, std::uintptr_t s_a_ptr, std::uintptr_t s_b_ptr, std::uintptr_t grad_ptr,
          std::uintptr_t out_x_ptr, std::int64_t out_x_row_stride, int out_x_dtype, std::uintptr_t out_xr_ptr,
          std::int64_t out_xr_row_stride, int out_xr_dtype, std::int64_t extra) {
        auto a = div_args<DivBwdArgs>(x_ptr, x_row_stride, x_dtype, xr_ptr, xr_row_stride, xr_dtype, n, V, labels_ptr,
                                      ignore_index, div_id, param, temperature);
        if (out_x_ptr != 0) check_rows(out_x_ptr, out_x_row_stride, out_x_dtype, n, V, "out_x", true);
        if (out_xr_ptr != 0) check_rows(out_xr_ptr, out_xr_row_stride, out_xr_dtype, n, V, "out_xr", true);
        if (out_x_ptr != 0 && out_x_ptr == out_xr_ptr) throw py::value_error("out_x and out_xr must differ");
        check_alias(out_x_ptr, out_x_row_stride, out_x_dtype, x_ptr, x_row_stride, x_dtype);
        check_alias(out_x_ptr, out_x_row_stride, out_x_dtype, xr_ptr, xr_row_stride, xr_dtype);
        check_alias(out_xr_ptr, out_xr_row_stride, out_xr_dtype, x_ptr, x_row_stride, x_dtype);
        check_alias(out_xr_ptr, out_xr_row_stride, out_xr_dtype, xr_ptr, xr_row_stride, xr_dtype);
        if (n > 0 && (lse_ptr == 0 || lse_r_ptr == 0 || s_a_ptr == 0 || s_b_ptr == 0 || grad_ptr == 0))
          throw py::value_error("lse_ptr, lse_r_ptr, s_a_ptr, s_b_ptr and grad_ptr must be non-null");
        a.lse = as_ptr<const float>(lse_ptr);
        a.lse_r = as_ptr<const float>(lse_r_ptr);
        a.s_a = as_ptr<const float>(s_a_ptr);
        a.s_b = as_ptr<const float>(s_b_ptr);
        a.grad = as_ptr<const float>(grad_ptr);
        a.out_x = {as_ptr<void>(out_x_ptr), out_x_row_stride, out_x_dtype};
        a.out_xr = {as_ptr<void>(out_xr_ptr), out_xr_row_stride, out_xr_dtype};
        k.div_bwd(a, extra);
      },
      py::arg("x_ptr"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("xr_ptr"), py::arg("xr_row_stride"),
      py::arg("xr_dtype"), py::arg("n"), py::arg("V"), py::arg("labels_ptr"), py::arg("ignore_index"),
      py::arg("div_id"), py::arg("param"), py::arg("temperature"), py::arg("lse_ptr"), py::arg("lse_r_ptr"),
      py::arg("s_a_ptr"), py::arg("s_b_ptr"), py::arg("grad_ptr"), py::arg("out_x_ptr"),
      py::arg("out_x_row_stride"), py::arg("out_x_dtype"), py::arg("out_xr_ptr"), py::arg("out_xr_row_stride"),
      py::arg("out_xr_dtype"), py::arg(extra_arg) = 0,
      (R"doc(Divergence row backward: writes out_x = grad (pa - p s_a) / T and out_xr = grad (qb - q s_b) / T.

Same x / xr / labels / div_id / param / temperature conventions as div_fwd; lse_ptr .. s_b_ptr are its
fp32 [n] outputs, grad_ptr the fp32 [n] gradient of value. out_x_ptr / out_xr_ptr: [n, V] of their dtype
code and row stride, or 0 to skip that side; each may be x_ptr or xr_ptr itself (same dtype and stride),
since every element of both rows is read before it is written. Masked rows are zero-filled. )doc" + note).c_str());
}

}  // namespace bind
}  // namespace fastpref

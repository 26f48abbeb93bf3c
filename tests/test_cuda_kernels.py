"""The CUDA C++ row kernels: ``fastpref._C_cuda`` (csrc/*_cuda.cu) behind ``fastpref/kernels/cuda.py``.

Without a GPU (CI): the module builds and imports (the CUDA runtime is linked statically), the ``cuda`` backend
says why it is unavailable, bad arguments raise before anything reaches the GPU, and every kernel compiles for
sm_80 and sm_90a without register spills. With a GPU: the ops on ``backend="cuda"`` against float64 formulas
(the cases of test_logprobs.py; the divergence contract is covered by test_divergence_kernels.py, which
parametrizes over "cuda" too), and the kernels against their CPU twins where the layouts pick the 16-byte
vector path, the scalar path, the warp-per-row and the block-per-row kernels.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastpref
from conftest import backend_params
from fastpref import _native
from fastpref.divergences import REGISTRY
from fastpref.kernels._ptxas import ptxas_report

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*_cuda.cu"))
ARCHS = ("80", "90a")
EXPLICIT_DEVICES = True  # tensors go to the GPU through _cuda() (conftest)
GPU_TESTS = True  # the CUDA backend throughout (conftest.runs_on_gpu)


def _nvcc():
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = _nvcc()
BUILT_WITHOUT_CUDA = os.environ.get("FASTPREF_NO_CUDA", "").strip().lower() not in ("", "0", "false", "no", "off")
needs_module = pytest.mark.skipif(_native.cuda_ext is None, reason=f"{_native.cuda_error}")
CUDA = backend_params("cuda")
needs_gpu = pytest.mark.skipif(not fastpref.backends()["cuda"].available, reason=fastpref.backends()["cuda"].reason)


# ---- without a GPU ------------------------------------------------------------------------------------

@pytest.mark.skipif(NVCC is None or BUILT_WITHOUT_CUDA, reason="no nvcc here (or FASTPREF_NO_CUDA): _C_cuda not built")
def test_module_is_built_and_imports():
    """nvcc was there at install time, so the module must be: it imports even without a GPU or driver."""
    assert _native.cuda_ext is not None, _native.cuda_error
    import fastpref._C_cuda as ext

    info = ext.build_info()
    assert "static" in info and "architectures" in info, info
    count, why = ext.device_count()
    assert count >= 0 and (count > 0) == (why == ""), (count, why)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_backend_unavailable_without_gpu_says_why():
    info = fastpref.backends()["cuda"]
    assert not info.available
    if _native.cuda_ext is None:
        assert "_C_cuda" in info.reason
    else:
        assert info.reason.startswith("no CUDA device"), info.reason
    for call in (lambda: fastpref.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), backend="cuda"),
                 lambda: fastpref.token_divergence(torch.randn(2, 5), torch.randn(2, 5), backend="cuda")):
        with pytest.raises(RuntimeError, match="backend='cuda' is not available: " + re.escape(info.reason)):
            call()


def test_cuda_backend_rejects_cpu_tensors():
    # Unavailable (RuntimeError, no GPU) or the wrong device (ValueError): either way a clear error.
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        fastpref.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), backend="cuda")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        fastpref.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), backend="cuda")


@needs_module
def test_wrappers_check_devices_and_layouts():
    from fastpref.kernels import cuda

    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="x must be a CUDA tensor, got one on cpu"):
        cuda.row_forward(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda.div_forward(x, x, None, div_id=0, param=0.0)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda.row_backward(x, None, None, None, None, None, x)


@needs_module
def test_raw_module_rejects_bad_arguments_before_any_launch():
    ext = _native.cuda_ext
    with pytest.raises(ValueError, match="dtype code"):
        ext.logprobs_fwd(16, 5, 3, 5, 7, 16, 1.0, 0.0, -100, 16, 16, 0, 0)
    with pytest.raises(ValueError, match="temperature"):
        ext.logprobs_fwd(16, 5, 3, 5, 0, 16, 0.0, 0.0, -100, 16, 16, 0, 0)
    with pytest.raises(ValueError, match="labels_ptr"):
        ext.logprobs_fwd(16, 5, 3, 5, 0, 0, 1.0, 0.0, -100, 16, 16, 0, 0)
    with pytest.raises(ValueError, match="kernel id"):
        ext.div_fwd(16, 5, 0, 16, 5, 0, 3, 5, 0, -100, 6, 0.0, 1.0, 16, 16, 16, 16, 16, 0)
    with pytest.raises(ValueError, match="alias"):
        ext.div_bwd(16, 5, 0, 16, 5, 0, 3, 5, 0, -100, 0, 0.0, 1.0, 16, 16, 16, 16, 16, 16, 5, 1, 0, 0, 0, 0)
    # Nothing to do: no CUDA call at all, so this works without a device.
    ext.logprobs_fwd(0, 5, 0, 5, 0, 0, 1.0, 0.0, -100, 0, 0, 0, 0)
    ext.div_bwd(0, 5, 0, 0, 5, 0, 0, 5, 0, -100, 0, 0.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@needs_module
@pytest.mark.skipif(_native.cuda_ext is not None and _native.cuda_ext.device_count()[0] > 0, reason="a device is present")
def test_launch_without_device_raises_the_cuda_error():
    # The launch fails in the runtime (no driver or device) before any pointer is used.
    with pytest.raises(RuntimeError, match=r"fastpref\._C_cuda\.logprobs_fwd: cudaError"):
        _native.cuda_ext.logprobs_fwd(16, 5, 3, 5, 0, 16, 1.0, 0.0, -100, 16, 16, 0, 0)


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDACXX, PATH or /usr/local/cuda/bin)")
def test_kernels_compile_without_spills_for_sm80_and_sm90a(tmp_path):
    """ptxas' register and spill counts for every kernel, with the build's flags (CMakeLists.txt)."""
    jobs = []
    for src in CUDA_SOURCES:
        for arch in ARCHS:
            cmd = [NVCC, "-std=c++17", "-O3", "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                   "-Xptxas=-v", f"-I{ROOT / 'csrc'}", str(src), "-o", str(tmp_path / f"{src.stem}_{arch}.cubin")]
            jobs.append((src.name, arch, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True)))
    rows = {}
    for name, arch, proc in jobs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"nvcc failed on {name} for sm_{arch}:\n{out}"
        found = ptxas_report(out)
        assert found, f"no ptxas report for {name} sm_{arch}:\n{out}"
        assert all(f"sm_{arch}" == a for _, a in found), found.keys()
        rows.update({(name, *key): value for key, value in found.items()})
    names = _demangle(sorted({k[1] for k in rows}))
    table = "\n".join(f"{v.get('registers', '?'):>4} regs {v['spill_stores']:>4} B spill st {v['spill_loads']:>4} B "
                      f"spill ld  {a:<8} {src:<20} {names[k]}" for (src, k, a), v in sorted(rows.items()))
    print(f"\nptxas -v, {len(rows)} kernel builds:\n{table}")
    spills = {k: v for k, v in rows.items() if v["spill_stores"] or v["spill_loads"] or v["stack"]}
    assert not spills, f"register spills or stack frames:\n{table}"
    # Every kernel of each file is built for both architectures.
    for src in CUDA_SOURCES:
        per_arch = [{k for (s, k, a) in rows if s == src.name and a == f"sm_{arch}"} for arch in ARCHS]
        assert per_arch[0] == per_arch[1] and per_arch[0], src.name


# ---- with a GPU ------------------------------------------------------------------------------------------

def _cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1000, 4099])  # a warp per row, a block per row
def test_token_logprobs_dtypes(backend, dtype, V):
    from test_logprobs import check_token, make_labels

    logits = (torch.randn(2, 5, V) * 3).to(dtype)
    labels = make_labels((2, 5), V)
    labels[1] = -100
    lp, ent = check_token(backend, *_cuda(logits, labels), temperature=0.7)
    assert (lp[1] == 0).all() and (ent[1] == 0).all()


@pytest.mark.parametrize("backend", CUDA)
def test_token_logprobs_large_vocab_strides_and_partial_outputs(backend):
    from test_logprobs import check_token, close, make_labels
    from oracle import logprobs_f64

    V = 70001
    check_token(backend, *_cuda(torch.randn(3, V) * 4, torch.tensor([0, V - 1, 12345])))
    check_token(backend, *_cuda(torch.randn(1, 1, 37), torch.tensor([[36]])), entropy=False)
    full = torch.randn(2, 7, 301)
    check_token(backend, *_cuda(full[:, :-1], make_labels((2, 6), 301)))
    check_token(backend, *_cuda(torch.randn(301, 4).t(), make_labels((4,), 301)), temperature=1.3)
    logits = torch.randn(6, 129, device="cuda", requires_grad=True)
    labels = make_labels((6,), 129, ignore_index=3).cuda()
    ref = logits.detach().double().requires_grad_()
    lp, ent = fastpref.token_logprobs(logits, labels, return_entropy=True, backend=backend, ignore_index=3)
    ent.sum().backward()
    logprobs_f64(ref, labels, ignore_index=3)[1].sum().backward()
    close(logits.grad, ref.grad, 2e-5, "entropy-only grad")


@pytest.mark.parametrize("backend", CUDA)
def test_token_logprobs_extreme_logits(backend):
    from test_logprobs import check_token

    V = 777
    logits = torch.randn(4, V) * 50
    logits[1] += 1e3
    logits[2, 5] = 1e3
    check_token(backend, *_cuda(logits, torch.tensor([3, 4, 5, 6])), floor=float(logits.abs().max()),
                grad_rtol=1e-4)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_logprobs(backend, chunk_size):
    from test_logprobs import check_linear, make_labels

    B, T, H, V = 2, 5, 24, 1000
    labels = make_labels((B, T), V)
    labels[0] = -100
    check_linear(backend, *_cuda(torch.randn(B, T, H), torch.randn(V, H) * 0.3, torch.randn(V) * 0.1, labels),
                 chunk_size=chunk_size, temperature=0.8)
    V, H = 70001, 16
    check_linear(backend, *_cuda(torch.randn(3, H), torch.randn(V, H), None, torch.tensor([5, -100, V - 1])),
                 softcap=4.0, chunk_size=2)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_logprobs_half(backend, dtype):
    from test_logprobs import TOL, check_linear, make_labels

    V, H = 517, 32
    check_linear(backend, *_cuda(torch.randn(2, 4, H).to(dtype), (torch.randn(V, H) * 0.2).to(dtype), None,
                                 make_labels((2, 4), V)), rtol=TOL[dtype])


def _rows(n, V, dtype, pad):
    """[n, V] logits of `dtype` on the GPU with rows `pad` elements apart beyond V, starting `pad` in: pad = 0
    gives 16-byte aligned rows when V * itemsize is a multiple of 16 (the vector path), pad = 3 none (scalar)."""
    buf = torch.randn(n, V + 2 * pad, device="cuda") * 3
    return buf.to(dtype)[:, pad:pad + V]


def _assert_close(a, b, rtol, what):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(b).all(), what
    err = (a - b).norm() / b.norm().clamp_min(1e-30)
    assert err <= rtol or (a - b).abs().max() <= 1e-6, f"{what}: relative error {err:.3g}"


LAYOUTS = [(V, pad) for V in (24, 1024, 1025, 4096, 4100) for pad in (0, 3)]


@needs_gpu
@pytest.mark.parametrize("V,pad", LAYOUTS, ids=[f"V{V}-pad{p}" for V, p in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_row_kernels_match_the_cpu_twin(V, pad, dtype, softcap):
    """Vector and scalar paths, warp and block kernels, softcap, entropy, in-place backward, every out dtype."""
    from fastpref.kernels import cpu, cuda

    n = 9
    x = _rows(n, V, dtype, pad)
    labels = torch.randint(0, V, (n,), device="cuda")
    labels[::4] = -100
    labels[1] = V + 5  # out of range: treated as ignored
    kw = dict(temperature=0.8, softcap=softcap, ignore_index=-100)
    got = cuda.row_forward(x, labels, with_entropy=True, **kw)
    want = cpu.row_forward(x.cpu(), labels.cpu(), with_entropy=True, **kw)
    for what, a, b in zip(("logp", "lse", "entropy"), got, want):
        _assert_close(a, b, 1e-5, what)
    gl, gh = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full((n, V), float("nan"), dtype=out_dtype, device="cuda")
        cuda.row_backward(x, labels, got[1], got[2], gl, gh, out, **kw)
        ref = torch.empty(n, V, dtype=out_dtype)
        cpu.row_backward(x.cpu(), labels.cpu(), want[1], want[2], gl.cpu(), gh.cpu(), ref, **kw)
        _assert_close(out, ref, 1e-5 if out_dtype == torch.float32 else 1e-2, f"grad {out_dtype}")
        assert (out[::4] == 0).all() and (out[1] == 0).all()
    # In place: the gradient replaces the logits.
    expect = torch.empty_like(x)
    cuda.row_backward(x, labels, got[1], None, gl, None, expect, **kw)
    cuda.row_backward(x, labels, got[1], None, gl, None, x, **kw)
    assert torch.equal(x, expect)


DIV_LAYOUTS = [(V, pad) for V in (24, 1025, 4100) for pad in (0, 3)]


@needs_gpu
@pytest.mark.parametrize("V,pad", DIV_LAYOUTS, ids=[f"V{V}-pad{p}" for V, p in DIV_LAYOUTS])
@pytest.mark.parametrize("name,param", [("reverse_kl", 0.0), ("forward_kl", 0.0), ("js", 0.3), ("alpha", 0.7),
                                        ("tv", 0.0), ("hellinger", 0.0)])
def test_divergence_kernels_match_the_cpu_twin(V, pad, name, param):
    """Both layouts and kernels, -inf logits (a vocabulary mask), mixed dtypes, in place."""
    from fastpref.kernels import cpu, cuda

    n, div_id = 6, REGISTRY[name].kernel_id
    x, xr = _rows(n, V, torch.float32, pad), _rows(n, V, torch.bfloat16, pad)
    x[:, :5] = xr[:, :5] = float("-inf")
    labels = torch.randint(0, V, (n,), device="cuda")
    labels[2] = -1
    kw = dict(div_id=div_id, param=param, temperature=0.7, ignore_index=-1)
    got = cuda.div_forward(x, xr, labels, **kw)
    want = cpu.div_forward(x.cpu(), xr.cpu(), labels.cpu(), **kw)
    for what, a, b in zip(("value", "lse", "lse_r", "s_a", "s_b"), got, want):
        _assert_close(a, b, 1e-5, what)
    grad = torch.randn(n, device="cuda")
    outs = [torch.full((n, V), float("nan"), dtype=dt, device="cuda") for dt in (torch.bfloat16, torch.float32)]
    cuda.div_backward(x, xr, labels, *got[1:], grad, *outs, **kw)
    refs = [torch.empty(n, V, dtype=o.dtype) for o in outs]
    cpu.div_backward(x.cpu(), xr.cpu(), labels.cpu(), *want[1:], grad.cpu(), *refs, **kw)
    # CUDA's expf/logf and the CPU's polynomials differ by an ulp or two, and the gradients of the two-pass
    # divergences (alpha, hellinger) cancel: up to ~4e-5 apart in norm on an H200. Each side is held to 1e-5
    # against float64 in test_divergence_kernels.py.
    for what, a, b in zip(("grad_x", "grad_xr"), outs, refs):
        _assert_close(a, b, 1e-2 if a.dtype == torch.bfloat16 else 1e-4, what)
        assert (a[2] == 0).all() and (a[:, :5] == 0).all()
    x_copy, xr_copy = x.clone(), xr.clone()
    cuda.div_backward(x, xr, labels, *got[1:], grad, x, xr, **kw)
    expect = [torch.empty_like(x_copy), torch.empty_like(xr_copy)]
    cuda.div_backward(x_copy, xr_copy, labels, *got[1:], grad, *expect, **kw)
    # Bit for bit only where both calls take the same path: misaligned rows written in place take the scalar
    # one, the fresh aligned outputs the vector one, and nvcc contracts the two differently.
    for what, a, b in zip(("in-place grad_x", "in-place grad_xr"), (x, xr), expect):
        if pad:
            _assert_close(a, b, 1e-2 if a.dtype == torch.bfloat16 else 1e-6, what)
        else:
            assert torch.equal(a, b), what


@needs_gpu
def test_runs_on_the_current_stream():
    from fastpref.kernels import cuda

    x = torch.randn(64, 5000, device="cuda")
    labels = torch.randint(0, 5000, (64,), device="cuda")
    want = cuda.row_forward(x, labels, with_entropy=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda.row_forward(x, labels, with_entropy=True)
    torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@needs_gpu
def test_auto_on_cuda_tensors_takes_the_measured_order():
    from fastpref import _backends

    infos = fastpref.backends()
    for family, order in _backends.AUTO_CUDA.items():
        expect = next((name for name in order if infos[name].available), "torch")
        assert _backends.resolve("auto", torch.device("cuda"), family) == expect, family

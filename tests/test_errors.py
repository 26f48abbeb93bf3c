"""Bad input raises a clear exception naming the argument; nothing is read out of bounds."""
import pytest
import torch

import fastpref

V = 50


@pytest.fixture
def logits():
    return torch.randn(2, 3, V)


@pytest.fixture
def labels():
    return torch.randint(0, V, (2, 3))


@pytest.mark.parametrize("bad", [V, -5, 10**6])
def test_label_out_of_range(logits, labels, bad):
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*found {bad}"):
        fastpref.token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="labels must be in"):
        fastpref.linear_logprobs(torch.randn(2, 3, 4), torch.randn(V, 4), labels)


def test_custom_ignore_index_is_not_out_of_range(logits, labels):
    labels[0, 0] = -1
    lp = fastpref.token_logprobs(logits, labels, ignore_index=-1)
    assert lp[0, 0] == 0
    with pytest.raises(ValueError, match="found -1"):
        fastpref.token_logprobs(logits, labels)


def test_shape_dtype_device_errors(logits, labels):
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        fastpref.token_logprobs(logits, labels[:, :2])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fastpref.token_logprobs(logits, labels.float())
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16, got torch.int64"):
        fastpref.token_logprobs(labels.unsqueeze(-1).expand(2, 3, V).contiguous(), labels)
    with pytest.raises(TypeError, match="logits must be float32"):
        fastpref.token_logprobs(logits.double(), labels)
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        fastpref.token_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fastpref.token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        fastpref.token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


def test_linear_errors(labels):
    h, w = torch.randn(2, 3, 8), torch.randn(V, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, 8\]"):
        fastpref.linear_logprobs(h, torch.randn(V, 7), labels)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        fastpref.linear_logprobs(h, torch.randn(V, 8, 1), labels)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 must match hidden dtype torch.float32"):
        fastpref.linear_logprobs(h, w.bfloat16(), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \[50\]"):
        fastpref.linear_logprobs(h, w, labels, bias=torch.randn(V + 1))
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        fastpref.linear_logprobs(h, w, labels, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fastpref.linear_logprobs(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        fastpref.linear_logprobs(h, w, labels.view(-1))


@pytest.mark.gpu
def test_backend_errors(logits, labels, monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpref.token_logprobs(logits, labels, backend="cudnn")
    if not fastpref.backends()["cuda"].available:
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            fastpref.token_logprobs(logits, labels, backend="cuda")
    else:
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            fastpref.token_logprobs(logits, labels, backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="backend='triton' is not available: no CUDA device"):
            fastpref.token_logprobs(logits, labels, backend="triton")


def test_auto_on_cuda_takes_the_measured_order(monkeypatch):
    """auto on CUDA tensors: cuda then triton for the log-probs, triton then cuda for the divergences, triton for
    the pairwise losses, torch when none is usable (resolve only looks at the device's type)."""
    from fastpref import _backends

    def pretend(*usable):
        for name in ("triton", "cuda"):
            monkeypatch.setitem(_backends._INFO, name, lambda ok=name in usable: _backends.BackendInfo(ok, "pretend"))

    gpu = torch.device("cuda")
    pretend("triton", "cuda")
    assert [_backends.resolve("auto", gpu, f) for f in ("logprobs", "divergence", "pairwise")] == \
        ["cuda", "triton", "triton"]
    pretend("triton")
    assert _backends.resolve("auto", gpu, "logprobs") == "triton"
    pretend("cuda")
    assert [_backends.resolve("auto", gpu, f) for f in ("divergence", "pairwise")] == ["cuda", "torch"]
    pretend()
    assert _backends.resolve("auto", gpu, "logprobs") == "torch"


def test_backends_report_reasons():
    infos = fastpref.backends()
    assert set(infos) == {"triton", "cuda", "cpu", "torch"}
    assert infos["torch"].available
    for name, info in infos.items():
        assert info.reason, f"{name} has no reason"


def test_empty_input(labels):
    lp = fastpref.token_logprobs(torch.randn(0, V), torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,)
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(V, 8, requires_grad=True)
    fastpref.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long)).sum().backward()
    assert (w.grad == 0).all()

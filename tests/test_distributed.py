"""Distributed heads, on 2 gloo processes on CPU: the vocabulary-parallel ops (``process_group=``) and FSDP2-sharded
heads (DTensor weights) equal the single-process results, forward and backward; heads that cannot be gathered
fail clearly (here, without processes: DTensor layouts, DeepSpeed ZeRO-3 parameters).

Each distributed test spawns its processes once and runs all its cases there; every rank checks its own shard
against the single-process op run on the full tensors (the same on every rank: one seed).
"""
import enum
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpref
from fastpref import _backends

WORLD = 2


def _run(rank, worker, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        worker(rank)
        # Every rank's collectives finish before either tears the group down: once, in CI, a rank aborted at
        # exit ("terminate called without an active exception", a gloo thread still running).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(worker, tmp_path):
    mp.spawn(_run, args=(worker, str(tmp_path / "store")), nprocs=WORLD)


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check_token_logprobs(rank, backend, dtype=torch.float32, ignore_index=-100):
    """ignore_index 3 is also a local vocabulary id of every shard."""
    N, V_local = 9, 7
    shard = slice(rank * V_local, (rank + 1) * V_local)
    logits = (torch.randn(2, N, WORLD * V_local + 1) * 3).to(dtype)[..., :-1]  # strided rows
    labels = torch.randint(0, WORLD * V_local, (2, N))
    labels[0, :3] = ignore_index
    grad_logp, grad_entropy = torch.randn(2, N), torch.randn(2, N)
    outs = []
    for x, group in ((_leaf(logits), None), (_leaf(logits[..., shard]), dist.group.WORLD)):
        logp, entropy = fastpref.token_logprobs(x, labels, temperature=0.7, ignore_index=ignore_index,
                                                return_entropy=True, backend=backend, process_group=group)
        (logp * grad_logp + entropy * grad_entropy).sum().backward()
        outs.append((logp, entropy, x.grad))
    (logp, entropy, grad), (logp_p, entropy_p, grad_p) = outs
    what = f"token_logprobs {backend} {dtype} ignore_index={ignore_index}"
    close(logp_p, logp, f"{what} logp")
    close(entropy_p, entropy, f"{what} entropy")
    torch.testing.assert_close(grad_p, grad[..., shard], msg=lambda m: f"{what} grad: {m}")


def _check_linear_logprobs(rank, backend):
    N, V_local, H = 9, 7, 5
    shard = slice(rank * V_local, (rank + 1) * V_local)
    hidden, weight, bias = torch.randn(2, N, H), torch.randn(WORLD * V_local, H), torch.randn(WORLD * V_local)
    labels = torch.randint(0, WORLD * V_local, (2, N))
    labels[1, :4] = -100
    grad_logp, grad_entropy = torch.randn(2, N), torch.randn(2, N)
    outs = []
    for w, b, group in ((weight, bias, None), (weight[shard], bias[shard], dist.group.WORLD)):
        h, w, b = _leaf(hidden), _leaf(w), _leaf(b)
        logp, entropy = fastpref.linear_logprobs(h, w, labels, bias=b, softcap=4.0, temperature=0.9,
                                                 return_entropy=True, chunk_size=4, backend=backend,
                                                 process_group=group)
        (logp * grad_logp + entropy * grad_entropy).sum().backward()
        outs.append((logp, entropy, h.grad, w.grad, b.grad))
    (logp, entropy, gh, gw, gb), (logp_p, entropy_p, gh_p, gw_p, gb_p) = outs
    what = f"linear_logprobs {backend}"
    close(logp_p, logp, f"{what} logp")
    close(entropy_p, entropy, f"{what} entropy")
    close(gh_p, gh, f"{what} grad hidden")
    close(gw_p, gw[shard], f"{what} grad weight")
    close(gb_p, gb[shard], f"{what} grad bias")


def _check_token_divergence(rank, backend, divergence):
    N, V_local = 9, 7
    shard = slice(rank * V_local, (rank + 1) * V_local)
    logits, ref_logits = torch.randn(2, N, WORLD * V_local) * 2, torch.randn(2, N, WORLD * V_local) * 2
    labels = torch.randint(0, WORLD * V_local, (2, N))
    labels[0, :3] = -100
    grad = torch.randn(2, N)
    outs = []
    for sl, group in ((slice(None), None), (shard, dist.group.WORLD)):
        x, xr = _leaf(logits[..., sl]), _leaf(ref_logits[..., sl])
        value = fastpref.token_divergence(x, xr, divergence=divergence, labels=labels, temperature=1.3,
                                          backend=backend, process_group=group)
        (value * grad).sum().backward()
        outs.append((value, x.grad, xr.grad))
    (value, gx, gr), (value_p, gx_p, gr_p) = outs
    what = f"token_divergence {divergence} {backend}"
    close(value_p, value, f"{what} value")
    close(gx_p, gx[..., shard], f"{what} grad logits")
    close(gr_p, gr[..., shard], f"{what} grad ref_logits")


def cpu_backends():
    """The backends that take CPU tensors here (gloo reduces CPU tensors): triton only in the interpreter."""
    usable = {name for name, info in fastpref.backends().items() if info.available}
    return [name for name in ("cpu", "torch", "triton") if name in usable and (name != "triton" or
                                                                              _backends.triton_interpreting())]


def _vocab_parallel_worker(rank):
    backends = cpu_backends()
    for backend in backends:
        _check_token_logprobs(rank, backend)
        _check_linear_logprobs(rank, backend)
        _check_token_divergence(rank, backend, "js")
    _check_token_logprobs(rank, backends[0], ignore_index=3)
    _check_token_logprobs(rank, backends[0], dtype=torch.bfloat16)
    for divergence in ("reverse_kl", "forward_kl", "alpha", "tv", "hellinger"):
        _check_token_divergence(rank, backends[0], divergence)


def test_vocab_parallel(tmp_path):
    spawn(_vocab_parallel_worker, tmp_path)


def _uneven_vocab_worker(rank):
    """Shards of different sizes break the Megatron layout (rank r's first id is r * V_local): every rank raises,
    in the forward's collective, instead of returning wrong values (labels < 14 pass every rank's range check)."""
    V_local, H = 7 + rank, 5
    labels = torch.tensor([0, 6, 9, 13, -100])
    cases = {
        "token_logprobs": lambda: fastpref.token_logprobs(torch.randn(5, V_local), labels,
                                                          process_group=dist.group.WORLD),
        "linear_logprobs": lambda: fastpref.linear_logprobs(torch.randn(5, H), torch.randn(V_local, H), labels,
                                                            process_group=dist.group.WORLD),
        "token_divergence": lambda: fastpref.token_divergence(torch.randn(5, V_local), torch.randn(5, V_local),
                                                              labels=labels, process_group=dist.group.WORLD),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError, match=r"vocabulary shards of equal size.* 7 to 8"):
            call()


def test_vocab_parallel_uneven_shards(tmp_path):
    spawn(_uneven_vocab_worker, tmp_path)


def _fsdp_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    B, T, H, V = 2, 5, 6, 10
    mesh = init_device_mesh("cpu", (WORLD,))
    head = torch.nn.Linear(H, V)
    full_w, full_b = head.weight.detach().clone(), head.bias.detach().clone()
    fully_shard(head, mesh=mesh)
    assert type(head.weight).__name__ == "DTensor"
    rows = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
    batches = []  # every rank's batch, for the single-process reference
    for r in range(WORLD):
        g = torch.Generator().manual_seed(100 + r)
        hidden, labels = torch.randn(2 * B, T, H, generator=g), torch.randint(0, V, (2 * B, T), generator=g)
        labels[:, :2] = -100
        batches.append((hidden, labels, torch.randn(2 * B, generator=g)))
    ref_weight = full_w * 0.5
    losses = {
        "linear_logprobs": lambda h, w, b, y, a: (fastpref.linear_logprobs(h, w, y, bias=b) * a[:, None]).sum(),
        "linear_token_divergence": lambda h, w, b, y, a: fastpref.linear_token_divergence(
            h, w, h.detach(), ref_weight, bias=b, labels=y).sum(),
        "linear_dpo_loss": lambda h, w, b, y, a: fastpref.linear_dpo_loss(
            h, w, y, bias=b, ref_chosen_logps=a[:B], ref_rejected_logps=a[B:]).loss,
        "linear_ppo_loss": lambda h, w, b, y, a: fastpref.linear_ppo_loss(h, w, y, None, a, bias=b).loss,
    }
    for name, loss in losses.items():
        head.weight.grad = head.bias.grad = None
        hidden, labels, adv = batches[rank]
        h = _leaf(hidden)
        loss(h, head.weight, head.bias, labels, adv).backward()
        # FSDP2 averages gradients over its mesh: the reference is the gradient of the ranks' mean loss.
        w, b = _leaf(full_w), _leaf(full_b)
        mine = [_leaf(x) for x, _, _ in batches]
        ref = sum(loss(x, w, b, y, a) for x, (_, y, a) in zip(mine, batches)) / WORLD
        ref.backward()
        assert head.weight.grad.placements == head.weight.placements
        close(head.weight.grad.to_local(), w.grad[rows], f"{name} grad weight")
        close(head.bias.grad.to_local(), b.grad[rows], f"{name} grad bias")
        close(h.grad, mine[rank].grad * WORLD, f"{name} grad hidden")

    replicated = distribute_tensor(full_w, mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"weight is a DTensor with placements \(Replicate\(\),\)"):
        fastpref.linear_logprobs(batches[rank][0], replicated, batches[rank][1])


def test_fsdp2_sharded_head(tmp_path):
    spawn(_fsdp_worker, tmp_path)


class _Status(enum.Enum):  # deepspeed.runtime.zero.partition_parameters.ZeroParamStatus
    AVAILABLE = 1
    NOT_AVAILABLE = 2


def _zero3_param(full):
    """A parameter laid out as ZeRO-3 leaves one between forwards: empty data, ``ds_id`` and ``ds_status``."""
    param = torch.nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_status, param.ds_full = 7, _Status.NOT_AVAILABLE, full
    return param


class _GatheredParameters:
    """deepspeed.zero.GatheredParameters on the parameters of ``_zero3_param``."""

    def __init__(self, params, modifier_rank=None):
        self.params = params

    def __enter__(self):
        for p in self.params:
            p.data, p.ds_status = p.ds_full, _Status.AVAILABLE

    def __exit__(self, *exc):
        for p in self.params:
            p.data, p.ds_status = torch.empty(0), _Status.NOT_AVAILABLE


def test_zero3_without_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    weight = _zero3_param(torch.randn(10, 4)).requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"weight is a DeepSpeed ZeRO-3 partitioned parameter .*GatheredParameters"):
        fastpref.linear_logprobs(torch.randn(3, 4), weight, torch.zeros(3, dtype=torch.long))


def test_zero3_gathered(monkeypatch):
    """A frozen partitioned head is gathered for the call; one that needs a gradient must be gathered by the
    caller (for the backward too), and then it is used as is."""
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(
        zero=types.SimpleNamespace(GatheredParameters=_GatheredParameters)))
    full = torch.randn(10, 4)
    hidden, labels = torch.randn(3, 4), torch.tensor([1, 9, -100])
    expected = fastpref.linear_logprobs(hidden, full, labels)
    weight = _zero3_param(full).requires_grad_(False)
    close(fastpref.linear_logprobs(hidden, weight, labels), expected, "frozen ZeRO-3 head")
    assert weight.numel() == 0  # partitioned again

    weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="needs a gradient, which ZeRO-3 accumulates only while"):
        fastpref.linear_logprobs(hidden, weight, labels)
    with _GatheredParameters([weight]):
        fastpref.linear_logprobs(hidden, weight, labels).sum().backward()
    w = _leaf(full)
    fastpref.linear_logprobs(hidden, w, labels).sum().backward()
    close(weight.grad, w.grad, "gathered ZeRO-3 head grad")

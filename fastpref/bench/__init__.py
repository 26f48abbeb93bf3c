"""``fastpref bench``: the benchmark suite (see ``fastpref/cli.py`` for the command line).

One module per op family (``logprobs``, ``divergence``, ``dpo``, ``grpo``), each with a ``case(device=...,
impl=..., **sizes)`` that the harness runs in a fresh process, and a ``SUITE`` that says which
implementations to run at which sizes and how to count the op's floor; ``harness`` measures, ``suite`` runs
the sweep and writes the tables, the JSON and the plots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

OPS = ("logprobs", "divergence", "dpo", "grpo")


def grid(**axes) -> list[dict]:
    """Sizes along the one axis given as a tuple, the others fixed: ``grid(H=512, N=(1, 2))``."""
    (key, values), = [(k, v) for k, v in axes.items() if isinstance(v, tuple)]
    return [dict(axes, **{key: v}) for v in values]


HEADS = dict(full=dict(cpu=(1024, 32000), cuda=(4096, 128256)), quick=dict(cpu=(512, 16000), cuda=(4096, 128256)),
             tiny=dict(any=(32, 300)))  # (H, V) of the fused-linear losses' heads by mode and device


def head_sweeps(**sweeps) -> dict[str, dict[str, list[dict]]]:
    """``Suite.sizes`` of a fused-linear loss from ``full_cpu=dict(B=(2, 4), T=1024)`` and the like: each
    sweep at its mode's and device's head size (``HEADS``)."""
    sizes = {}
    for key, axes in sweeps.items():
        mode, device = key.split("_")
        H, V = HEADS[mode][device]
        sizes.setdefault(mode, {})[device] = grid(H=H, V=V, **axes)
    return sizes


def head_inputs(device, dtype: str, rows: int, T: int, H: int, V: int):
    """The fused-linear losses' inputs, seeded: policy hidden states [rows, T, H] and head [V, H] (both
    requiring grad), the reference's, and labels [rows, T]."""
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(rows, T, H, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    ref_hidden = torch.randn(rows, T, H, device=device, dtype=dt)
    ref_weight = torch.randn(V, H, device=device, dtype=dt) * H**-0.5
    return hidden, weight, ref_hidden, ref_weight, torch.randint(0, V, (rows, T), device=device)


def policy_and_reference_work(tokens: float, H: int, V: int) -> tuple[float, float]:
    """FLOPs of a fused loss over ``tokens`` with a reference head: forward, the policy and reference logits
    GEMMs (2 x 2 tokens H V); forward+backward adds grad_hidden and grad_weight (4 x 2 tokens H V)."""
    gemm = 2 * tokens * H * V
    return 2 * gemm, 4 * gemm


@dataclass(frozen=True)
class Impl:
    """A non-fastpref implementation: ``key`` is the ``impl`` its case takes; ``label`` its description (the
    per-op command line's row name), ``short`` its name in the tables; ``needs`` the module a peer
    imports (its row says "not installed" without it); ``cuda_only`` for Triton-only peers; ``only(sizes)``
    says at which sizes it applies (default: all)."""

    key: str
    label: str
    short: str
    needs: str | None = None
    cuda_only: bool = False
    only: Callable[[dict], bool] | None = None


@dataclass(frozen=True)
class Suite:
    name: str                                  # the module and ``--ops`` name
    op: str                                    # the fastpref function measured
    title: str
    peers: tuple[Impl, ...]                    # the reference (eager) first; fastpref backends follow
    sizes: dict[str, dict[str, list[dict]]]    # mode (full, quick, tiny) -> device -> sweep (tiny: "any")
    floor: str                                 # "flops" (matmul rate) or "bytes" (copy bandwidth)
    floor_doc: str                             # how ``work`` counts
    work: Callable[[dict], tuple[float, float]]  # sizes (with dtype) -> (forward, forward+backward) work
    x_label: str
    x: Callable[[dict], int]                   # sizes -> the sweep's x value

    def peers_for(self, device: str | None, sizes: dict) -> list[Impl]:
        """The peers that apply at ``sizes``; given a ``device``, only those that run there."""
        return [i for i in self.peers
                if (device is None or not i.cuda_only or device == "cuda") and (i.only is None or i.only(sizes))]

    def sweep(self, device: str, mode: str) -> list[dict]:
        by_device = self.sizes[mode]
        return by_device.get(device, by_device.get("any", []))

"""linear_logprobs vs the naive path (logits, log_softmax, gather), its torch.compile and Cut Cross-Entropy
(and Liger-Kernel's fused linear cross-entropy on a GPU): forward+backward time and peak memory.

    python benchmarks/logprobs.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

Each implementation runs in its own process (see harness.py for how memory and time are measured).
"""
from __future__ import annotations

import sys

import torch

import fastpref

from . import Impl, Suite, grid
from .harness import legacy_main


def eager(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def case(*, device, impl, N, H, V, dtype):
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(N, H, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)

    if impl in ("naive", "eager"):
        forward = eager
    elif impl == "compile":
        forward = torch.compile(eager)
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        cce_impl = "cce" if device == "cuda" else "torch_compile"  # "cce" is GPU-only; its pure-torch path

        def forward(h, w, y):
            return -linear_cross_entropy(h, w, y, reduction="none", impl=cce_impl).float()
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def forward(h, w, y):
            return -liger(w, h, y).float()
    else:
        def forward(h, w, y):
            return fastpref.linear_logprobs(h, w, y, backend=impl)

    def step(backward=True):
        lp = forward(hidden, weight, labels)
        if backward:
            (lp * upstream).sum().backward()
            hidden.grad = weight.grad = None
        return lp.detach()

    return step, (N * H + V * H) * hidden.element_size()


def _work(s):
    gemm = 2 * s["N"] * s["H"] * s["V"]
    return gemm, 3 * gemm


SUITE = Suite(
    name="logprobs", op="linear_logprobs", title="log-probs of the labels from hidden states and the head",
    peers=(Impl("eager", "naive (logits, log_softmax, gather)", "eager"),
           Impl("compile", "torch.compile of the naive path", "torch.compile"),
           Impl("cce", "Cut Cross-Entropy linear_cross_entropy", "Cut Cross-Entropy", needs="cut_cross_entropy"),
           Impl("liger", "Liger-Kernel LigerFusedLinearCrossEntropyLoss", "Liger-Kernel", needs="liger_kernel", cuda_only=True)),
    sizes=dict(
        full=dict(cpu=grid(N=(1024, 2048, 4096), H=1024, V=32000), cuda=grid(N=(4096, 8192, 16384), H=4096, V=128256)),
        quick=dict(cpu=grid(N=(256, 1024), H=512, V=16000), cuda=grid(N=(2048, 4096), H=2048, V=128256)),
        tiny=dict(any=grid(N=(16, 32), H=32, V=300))),
    floor="flops",
    floor_doc="2 N H V FLOPs forward (the logits GEMM); 3 x 2 N H V forward+backward (logits, grad_hidden, "
              "grad_weight GEMMs; recomputing the logits in backward is above the floor)",
    work=_work, x_label="tokens N", x=lambda s: s["N"])


def legacy_variants(device, quick):
    if device == "cuda":
        sizes = [(4096, 2048, 128256)] if quick else [(4096, 2048, 128256), (16384, 4096, 128256)]
    else:
        sizes = [(1024, 512, 32000)] if quick else [(4096, 1024, 32000)]
    return [("linear_logprobs", s, [(i.label, i.key) for i in SUITE.peers_for(device, s)])
            for s in (dict(N=N, H=H, V=V) for N, H, V in sizes)]


def main(argv=None, **kwargs):
    legacy_main(sys.modules[__name__], argv, **kwargs)

"""token_divergence vs eager PyTorch (log_softmax of both + the formula, its torch.compile, and F.kl_div):
forward+backward time and peak memory.

    python benchmarks/divergence.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

Gradient to the policy logits only (a frozen reference, the RLHF KL penalty). Liger-Kernel's KL/JSD ops are
Triton-only and run where a GPU is present.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastpref

from . import Impl, Suite, grid
from .harness import legacy_main


def eager(logits, ref, divergence):
    logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
    if divergence == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    m = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0))
    return 0.5 * ((logp.exp() * (logp - m)).sum(-1) + (logq.exp() * (logq - m)).sum(-1))


def case(*, device, impl, divergence, N, V, dtype):
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    logits = (torch.randn(N, V, device=device) * 2).to(dt).requires_grad_()
    ref = (torch.randn(N, V, device=device) * 2).to(dt)
    upstream = torch.randn(N, device=device)

    if impl == "liger":
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        liger = LigerKLDIVLoss(reduction="none", log_target=True) if divergence == "reverse_kl" else LigerJSD(beta=0.5)
    compiled = torch.compile(eager) if impl == "compile" else None

    def forward():
        if impl == "eager":
            return eager(logits, ref, divergence)
        if impl == "compile":
            return compiled(logits, ref, divergence)
        if impl == "kl_div":
            logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
            return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
        if impl == "liger":
            logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
            return liger(logq, logp).sum(-1) if divergence == "reverse_kl" else liger(logp, logq) * N
        return fastpref.token_divergence(logits, ref, divergence=divergence, backend=impl)

    def step(backward=True):
        d = forward()
        if backward:
            (d * upstream).sum().backward() if d.dim() else d.backward()
            logits.grad = None
        return d.detach()

    return step, N * V * logits.element_size()


def _work(s):
    row = s["N"] * s["V"] * torch.empty((), dtype=getattr(torch, s["dtype"])).element_size()
    return 2 * row, 5 * row


SUITE = Suite(
    name="divergence", op="token_divergence", title="full-vocabulary divergence between two logits",
    peers=(Impl("eager", "eager (log_softmax x2 + formula)", "eager"),
           Impl("compile", "torch.compile of eager", "torch.compile"),
           Impl("kl_div", "F.kl_div", "F.kl_div", only=lambda s: s["divergence"] == "reverse_kl"),
           Impl("liger", "Liger-Kernel LigerKLDIVLoss / LigerJSD", "Liger-Kernel", needs="liger_kernel", cuda_only=True)),
    sizes=dict(
        full=dict(cpu=[s for d in ("reverse_kl", "js") for s in grid(divergence=d, N=(1024, 2048, 4096), V=32000)],
                  cuda=[s for d in ("reverse_kl", "js") for s in grid(divergence=d, N=(4096, 8192, 16384), V=128256)]),
        quick=dict(cpu=grid(divergence="reverse_kl", N=(256, 1024), V=32000),
                   cuda=grid(divergence="reverse_kl", N=(4096, 16384), V=128256)),
        tiny=dict(any=grid(divergence="reverse_kl", N=(16, 32), V=300))),
    floor="bytes",
    floor_doc="forward reads both [N, V] logits (2 N V element bytes); forward+backward adds backward's read "
              "of both and write of the gradient: 5 N V element bytes",
    work=_work, x_label="positions N", x=lambda s: s["N"])


def legacy_variants(device, quick):
    N, V = (1024, 32000) if quick else (4096, 32000) if device == "cpu" else (16384, 128256)
    variants = []
    for divergence in ("reverse_kl", "js"):
        sizes = dict(divergence=divergence, N=N, V=V)
        variants.append((f"token_divergence {divergence}", sizes,
                         [(i.label, i.key) for i in SUITE.peers_for(device, sizes)]))
    return variants


def main(argv=None, **kwargs):
    legacy_main(sys.modules[__name__], argv, **kwargs)

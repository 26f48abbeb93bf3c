"""linear_dpo_loss vs the eager TRL-style path, its torch.compile and Liger-Kernel's LigerFusedLinearDPOLoss:
fwd+bwd time and peak memory, sigmoid DPO with the reference computed from reference hidden states and head.

    python benchmarks/dpo.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import sys

import torch

import fastpref

from . import Impl, Suite, head_inputs, head_sweeps, policy_and_reference_work
from .harness import fused_legacy_variants, legacy_main


def eager(hidden, weight, ref_hidden, ref_weight, labels, pairs):
    def eager_logps(h, w):
        logp = torch.log_softmax((h @ w.T).float(), -1)
        mask = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok * mask).sum(1)

    seq = eager_logps(hidden, weight)
    with torch.no_grad():
        ref = eager_logps(ref_hidden, ref_weight)
    return fastpref.dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:], beta=0.1).loss


def case(*, device, impl, pairs, T, H, V, dtype):
    hidden, weight, ref_hidden, ref_weight, labels = head_inputs(device, dtype, 2 * pairs, T, H, V)
    labels[:, : T // 4] = -100  # prompt tokens

    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
    compiled = torch.compile(eager) if impl == "compile" else None

    def step(backward=True):
        if impl == "eager":
            loss = eager(hidden, weight, ref_hidden, ref_weight, labels, pairs)
        elif impl == "compile":
            loss = compiled(hidden, weight, ref_hidden, ref_weight, labels, pairs)
        elif impl == "liger":
            loss = liger(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]
        else:
            loss = fastpref.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                            beta=0.1, backend=impl).loss
        if backward:
            loss.backward()
            hidden.grad = weight.grad = None
        return loss.detach()

    return step, (hidden.numel() + weight.numel()) * hidden.element_size()


def _work(s):
    return policy_and_reference_work(2 * s["pairs"] * (s["T"] - s["T"] // 4), s["H"], s["V"])


SUITE = Suite(
    name="dpo", op="linear_dpo_loss", title="sigmoid DPO, reference from hidden states",
    peers=(Impl("eager", "eager TRL-style (logits, log_softmax, gather)", "eager"),
           Impl("compile", "torch.compile of eager", "torch.compile"),
           Impl("liger", "Liger-Kernel LigerFusedLinearDPOLoss", "Liger-Kernel", needs="liger_kernel")),
    sizes=head_sweeps(full_cpu=dict(pairs=2, T=(512, 1024, 2048)), full_cuda=dict(pairs=(2, 4, 8), T=1024),
                      quick_cpu=dict(pairs=1, T=(128, 512)), quick_cuda=dict(pairs=(1, 2), T=1024),
                      tiny_any=dict(pairs=1, T=(8, 16))),
    floor="flops",
    floor_doc="K = 2 pairs (T - T/4) completion tokens (prompt tokens are -100); forward: the policy and "
              "reference logits GEMMs, 2 x 2 K H V FLOPs; forward+backward adds grad_hidden and grad_weight: "
              "4 x 2 K H V",
    work=_work, x_label="tokens (2 x pairs x T)", x=lambda s: 2 * s["pairs"] * s["T"])


def legacy_variants(device, quick):
    sizes = [dict(pairs=2, T=512)] if quick else [dict(pairs=2, T=512), dict(pairs=4, T=1024), dict(pairs=2, T=2048)]
    return fused_legacy_variants(SUITE, device, sizes)


def main(argv=None, **kwargs):
    legacy_main(sys.modules[__name__], argv, **kwargs)

"""linear_ppo_loss vs the eager TRL-style GRPO path, its torch.compile and Liger-Kernel's
LigerFusedLinearGRPOLoss: fwd+bwd time and peak memory; GRPO loss (seq-mean-token-mean), k3 KL (beta 0.04)
against a reference model given as hidden states + head, old log-probs from an earlier policy, completions of
random length (padding masked).

    python benchmarks/grpo.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import sys

import torch

import fastpref

from . import Impl, Suite, head_inputs, head_sweeps, policy_and_reference_work
from .harness import fused_legacy_variants, legacy_main

KL_COEF = 0.04


def eager(hidden, weight, ref_hidden, ref_weight, labels, old, adv, mask):
    def eager_logps(h, w, with_entropy):
        logits = (h @ w.T).float()
        logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        if not with_entropy:
            return logp, None
        with torch.no_grad():  # logged, as TRL's entropy_from_logits
            lsm = torch.log_softmax(logits, -1)
            entropy = -(lsm.exp() * lsm).sum(-1)
        return logp, entropy

    logp, entropy = eager_logps(hidden, weight, True)
    with torch.no_grad():
        ref, _ = eager_logps(ref_hidden, ref_weight, False)
    return fastpref.ppo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=KL_COEF, entropy=entropy,
                             loss_agg="seq-mean-token-mean").loss


def case(*, device, impl, B, T, H, V, dtype):
    hidden, weight, ref_hidden, ref_weight, labels = head_inputs(device, dtype, B, T, H, V)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device) < lengths[:, None]
    with torch.no_grad():
        old = fastpref.linear_logprobs(hidden * 0.98, weight, labels)  # a slightly older policy
    adv = torch.randn(B, device=device)
    kept = int(mask.sum())

    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=KL_COEF, use_ref_model=True, loss_type="grpo")
    compiled = torch.compile(eager) if impl == "compile" else None

    def step(backward=True):
        if impl in ("eager", "compile"):
            loss = (compiled or eager)(hidden, weight, ref_hidden, ref_weight, labels, old, adv, mask)
        elif impl == "liger":
            loss = liger(hidden, weight, labels, mask.long(), adv, old_per_token_logps=old, ref_input=ref_hidden,
                         ref_weight=ref_weight)[0]
        else:
            loss = fastpref.linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_hidden=ref_hidden,
                                            ref_weight=ref_weight, kl_coef=KL_COEF, loss_agg="seq-mean-token-mean",
                                            backend=impl).loss
        if backward:
            loss.backward()
            hidden.grad = weight.grad = None
        return loss.detach()

    step.work = policy_and_reference_work(kept, H, V)  # the floor counts the completion tokens only
    return step, (hidden.numel() + weight.numel()) * hidden.element_size()


def _work(s):  # the expected number of completion tokens (the case counts them: step.work)
    return policy_and_reference_work(s["B"] * (s["T"] // 2 + s["T"]) / 2, s["H"], s["V"])


SUITE = Suite(
    name="grpo", op="linear_ppo_loss", title="GRPO, k3 KL to a reference from hidden states",
    peers=(Impl("eager", "eager TRL-style (logits, log-softmax, entropy)", "eager"),
           Impl("compile", "torch.compile of eager", "torch.compile"),
           Impl("liger", "Liger-Kernel LigerFusedLinearGRPOLoss", "Liger-Kernel", needs="liger_kernel")),
    sizes=head_sweeps(full_cpu=dict(B=(2, 4, 8), T=1024), full_cuda=dict(B=(4, 8, 16), T=1024),
                      quick_cpu=dict(B=2, T=(64, 256)), quick_cuda=dict(B=(2, 4), T=1024), tiny_any=dict(B=2, T=(8, 16))),
    floor="flops",
    floor_doc="K = the completion tokens (mask.sum(), counted in the case; about B x 3T/4); forward: "
              "the policy and reference logits GEMMs, 2 x 2 K H V FLOPs; forward+backward adds grad_hidden and "
              "grad_weight: 4 x 2 K H V (the entropy and the old log-probs need no further GEMM)",
    work=_work, x_label="tokens (B x T)", x=lambda s: s["B"] * s["T"])


def legacy_variants(device, quick):
    return fused_legacy_variants(SUITE, device, [dict(B=2, T=512)] if quick else [dict(B=8, T=1024)])


def main(argv=None, **kwargs):
    legacy_main(sys.modules[__name__], argv, **kwargs)

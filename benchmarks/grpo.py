"""linear_ppo_loss vs the eager TRL-style GRPO path and Liger-Kernel's LigerFusedLinearGRPOLoss: fwd+bwd time
and peak memory; GRPO loss (seq-mean-token-mean), k3 KL (beta 0.04) against a reference model given as
hidden states + head, old log-probs from an earlier policy, completions of random length (padding masked).

    python benchmarks/grpo.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

from harness import fused_loss_main

KL_COEF = 0.04


def case(*, device, impl, B, T, H, V, dtype):
    import torch

    import fastpref

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(B, T, H, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    ref_hidden = torch.randn(B, T, H, device=device, dtype=dt)
    ref_weight = torch.randn(V, H, device=device, dtype=dt) * H**-0.5
    labels = torch.randint(0, V, (B, T), device=device)
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device) < lengths[:, None]
    with torch.no_grad():
        old = fastpref.linear_logprobs(hidden * 0.98, weight, labels)  # a slightly older policy
    adv = torch.randn(B, device=device)

    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=KL_COEF, use_ref_model=True, loss_type="grpo")

    def eager_logps(h, w, with_entropy):
        logits = (h @ w.T).float()
        logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        if not with_entropy:
            return logp, None
        with torch.no_grad():  # logged, as TRL's entropy_from_logits
            lsm = torch.log_softmax(logits, -1)
            entropy = -(lsm.exp() * lsm).sum(-1)
        return logp, entropy

    def step():
        if impl == "eager":
            logp, entropy = eager_logps(hidden, weight, True)
            with torch.no_grad():
                ref, _ = eager_logps(ref_hidden, ref_weight, False)
            loss = fastpref.ppo_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=KL_COEF, entropy=entropy,
                                     loss_agg="seq-mean-token-mean").loss
        elif impl == "liger":
            loss = liger(hidden, weight, labels, mask.long(), adv, old_per_token_logps=old, ref_input=ref_hidden,
                         ref_weight=ref_weight)[0]
        else:
            loss = fastpref.linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_hidden=ref_hidden,
                                            ref_weight=ref_weight, kl_coef=KL_COEF, loss_agg="seq-mean-token-mean",
                                            backend=impl).loss
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.detach()

    return step, (hidden.numel() + weight.numel()) * hidden.element_size()


def main(argv=None):
    fused_loss_main("grpo", __doc__, "GRPO, k3 KL to a reference from hidden states",
                    [("eager TRL-style (logits, log-softmax, entropy)", "eager"),
                     ("Liger-Kernel LigerFusedLinearGRPOLoss", "liger")],
                    sizes=[dict(B=8, T=1024)], quick_sizes=[dict(B=2, T=512)], argv=argv)


if __name__ == "__main__":
    main()

"""linear_dpo_loss vs the eager TRL-style path and Liger-Kernel's LigerFusedLinearDPOLoss: fwd+bwd time and
peak memory, sigmoid DPO with the reference computed from reference hidden states and head.

    python benchmarks/dpo.py [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

from harness import fused_loss_main


def case(*, device, impl, pairs, T, H, V, dtype):
    import torch
    import torch.nn.functional as F

    import fastpref

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(2 * pairs, T, H, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    ref_hidden = torch.randn(2 * pairs, T, H, device=device, dtype=dt)
    ref_weight = torch.randn(V, H, device=device, dtype=dt) * H**-0.5
    labels = torch.randint(0, V, (2 * pairs, T), device=device)
    labels[:, : T // 4] = -100  # prompt tokens

    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)

    def eager_logps(h, w):
        logp = torch.log_softmax((h @ w.T).float(), -1)
        mask = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok * mask).sum(1)

    def step():
        if impl == "eager":
            seq = eager_logps(hidden, weight)
            with torch.no_grad():
                ref = eager_logps(ref_hidden, ref_weight)
            loss = fastpref.dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:], beta=0.1).loss
        elif impl == "liger":
            loss = liger(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]
        else:
            loss = fastpref.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                            beta=0.1, backend=impl).loss
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.detach()

    return step, (hidden.numel() + weight.numel()) * hidden.element_size()


def main(argv=None):
    fused_loss_main("dpo", __doc__, "sigmoid DPO, reference from hidden states",
                    [("eager TRL-style (logits, log_softmax, gather)", "eager"),
                     ("Liger-Kernel LigerFusedLinearDPOLoss", "liger")],
                    sizes=[dict(pairs=2, T=512), dict(pairs=4, T=1024), dict(pairs=2, T=2048)],
                    quick_sizes=[dict(pairs=2, T=512)], argv=argv)


if __name__ == "__main__":
    main()

"""token_divergence vs eager PyTorch (log_softmax of both + the formula, and F.kl_div): fwd+bwd time, memory.

    python benchmarks/divergence.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

Gradient to the policy logits only (a frozen reference, the RLHF KL penalty). Liger-Kernel's KL/JSD ops are
Triton-only and run where a GPU is present.
"""
from __future__ import annotations

from harness import device_name, fastpref_backends, parse_args, report, write_results


def case(*, device, impl, divergence, N, V, dtype):
    import torch
    import torch.nn.functional as F

    import fastpref

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    logits = (torch.randn(N, V, device=device) * 2).to(dt).requires_grad_()
    ref = (torch.randn(N, V, device=device) * 2).to(dt)
    upstream = torch.randn(N, device=device)

    if impl == "liger":
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

        liger = LigerKLDIVLoss(reduction="none", log_target=True) if divergence == "reverse_kl" else LigerJSD(beta=0.5)

    def forward():
        if impl == "eager":
            logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
            if divergence == "reverse_kl":
                return (logp.exp() * (logp - logq)).sum(-1)
            m = torch.logaddexp(logp, logq) - torch.log(torch.tensor(2.0))
            return 0.5 * ((logp.exp() * (logp - m)).sum(-1) + (logq.exp() * (logq - m)).sum(-1))
        if impl == "kl_div":
            logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
            return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
        if impl == "liger":
            logp, logq = F.log_softmax(logits.float(), -1), F.log_softmax(ref.float(), -1)
            return liger(logq, logp).sum(-1) if divergence == "reverse_kl" else liger(logp, logq) * N
        return fastpref.token_divergence(logits, ref, divergence=divergence, backend=impl)

    def step():
        d = forward()
        (d * upstream).sum().backward() if d.dim() else d.backward()
        logits.grad = None
        return d.detach()

    return step, N * V * logits.element_size()


def main(argv=None):
    import torch

    args = parse_args(__doc__.splitlines()[0], argv)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    N, V = (1024, 32000) if args.quick else (4096, 32000) if args.device == "cpu" else (16384, 128256)
    reps = 2 if args.quick else 3
    print(f"token_divergence fwd+bwd on {args.device} ({device_name(args.device)}), {dtype}, torch {torch.__version__}")
    rows = []
    for divergence in ("reverse_kl", "js"):
        cases = [("eager (log_softmax x2 + formula)", "divergence:case", dict(impl="eager"))]
        if divergence == "reverse_kl":
            cases.append(("F.kl_div", "divergence:case", dict(impl="kl_div")))
        if args.device == "cuda":
            cases.append(("Liger-Kernel", "divergence:case", dict(impl="liger")))
        cases += [(f"fastpref {b}", "divergence:case", dict(impl=b)) for b in fastpref_backends(args.device)]
        rows += report(f"token_divergence {divergence}", cases, device=args.device, reps=reps,
                       sizes=dict(divergence=divergence, N=N, V=V, dtype=dtype))
    write_results(args, "divergence", rows)


if __name__ == "__main__":
    main()

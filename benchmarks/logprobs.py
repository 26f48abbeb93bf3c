"""linear_logprobs vs the naive path (logits, log_softmax, gather): forward+backward time and peak memory.

    python benchmarks/logprobs.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

Each implementation runs in its own process (see harness.py for how memory and time are measured).
"""
from __future__ import annotations

from harness import device_name, fastpref_backends, parse_args, report, write_results


def case(*, device, impl, N, H, V, dtype):
    import torch

    import fastpref

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(N, H, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(V, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    upstream = torch.randn(N, device=device)

    def step():
        if impl == "naive":
            logits = hidden @ weight.T
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        else:
            lp = fastpref.linear_logprobs(hidden, weight, labels, backend=impl)
        (lp * upstream).sum().backward()
        hidden.grad = weight.grad = None
        return lp.detach()

    return step, (N * H + V * H) * hidden.element_size()


def main(argv=None):
    import torch

    import fastpref

    args = parse_args(__doc__.splitlines()[0], argv)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda":
        sizes = [(4096, 2048, 128256)] if args.quick else [(4096, 2048, 128256), (16384, 4096, 128256)]
    else:
        sizes = [(1024, 512, 32000)] if args.quick else [(4096, 1024, 32000)]
    reps = 2 if args.quick else 3
    print(f"linear_logprobs fwd+bwd on {args.device} ({device_name(args.device)}), {dtype}, "
          f"torch {torch.__version__}, fastpref {fastpref.__version__}, {torch.get_num_threads()} CPU threads")
    cases = [("naive (logits, log_softmax, gather)", "logprobs:case", dict(impl="naive"))]
    cases += [(f"fastpref {b}", "logprobs:case", dict(impl=b)) for b in fastpref_backends(args.device)]
    rows = []
    for N, H, V in sizes:
        rows += report("linear_logprobs", cases, device=args.device, reps=reps, sizes=dict(N=N, H=H, V=V, dtype=dtype))
    write_results(args, "logprobs", rows)


if __name__ == "__main__":
    main()

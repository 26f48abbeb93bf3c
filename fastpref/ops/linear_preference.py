"""linear_dpo_loss: sequence log-probs from hidden states and the head, and the DPO-family loss, in one call.

Never holds [N, V] logits. The loss is a function of the 2B sequence log-prob sums only, and for every
type but aot, aot_unpaired and orpo it is a sum over pairs. Tokens are therefore processed pair by pair,
and a pair's loss gradient is known as soon as its last token's log-prob is:

- chunks that hold whole pairs compute their head gradients from the logits still in the buffer (3
  matmuls per token instead of 4);
- a pair that runs past the end of a chunk has its tokens' gradients computed with a unit coefficient:
  the hidden-gradient rows wait unscaled, the weight gradient goes to a [V, H] fp32 buffer per side
  (chosen, rejected), and both are scaled when the pair completes (still 3 matmuls per token, for two
  weight-sized buffers; used when those cost at most 4 chunk buffers, H <= 2 x chunk);
- otherwise (a loss that couples pairs, or a large head with small chunks) a first pass computes all
  sequence log-probs and a second recomputes each chunk for the gradients.
"""
from __future__ import annotations

import torch

from fastpref import _backends
from fastpref._validate import check_chunk_size, check_float, check_labels, check_positive, check_same_device
from fastpref.ops import compiling, resolve
from fastpref.ops._sharded import gathered
from fastpref.ops.logprobs import (HeadGrads, _accumulate_fp32, _chunk_logits, chunk_buffers, head_chunk_size,
                                   linear_logprobs, scale_head_grads)
from fastpref.ops.preference import LOSS_TYPES, PreferenceOutput, dpo_loss

_COUPLED = ("aot", "aot_unpaired", "orpo")  # their loss does not split into independent pairs
# Loss types that see a pair through its margin alone (with the reverse-KL score and no NLL term).
_MARGIN_TYPES = ("sigmoid", "hinge", "robust", "exo_pair", "discopop")


def _pair_order(labels, ignore_index):
    """Flat indices of the kept tokens grouped pair by pair (chosen i, then rejected i), the sequence of each,
    and the cumulative token count at the end of each pair."""
    two_b, T = labels.shape
    B = two_b // 2
    keep = labels != ignore_index
    row = torch.arange(two_b, device=labels.device)
    key = ((row % B) * 2 + (row >= B)).unsqueeze(1) * T + torch.arange(T, device=labels.device)
    flat = keep.flatten().nonzero().squeeze(1)
    order = flat[torch.argsort(key.flatten()[flat])]
    seq = order // T
    per_pair = keep.sum(1).view(2, B).sum(0)
    return order, seq, torch.cumsum(per_pair, 0), keep.sum(1)


def _chunks(ends, chunk, align):
    """Token ranges [s, e) of at most ``chunk`` tokens; with ``align``, ranges end on pair boundaries
    ``ends`` (the cumulative token count at each pair's end; every pair must then fit in a chunk)."""
    total = ends[-1] if ends else 0
    if not align:
        return [(s, min(s + chunk, total)) for s in range(0, total, chunk)]
    out, s = [], 0
    for p, e in enumerate(ends):
        if e - s > chunk:
            out.append((s, ends[p - 1]))
            s = ends[p - 1]
    if total > s:
        out.append((s, total))
    return out


class _DeferredPair:
    """The head gradients of the tokens of a pair whose loss gradient is not known yet (the pair runs past
    the end of the chunk): their rows of the hidden gradient stay unscaled in ``grads.gh``, and their
    weight and bias gradients accumulate in [V, H] fp32 buffers, one per side (chosen, rejected). When the
    pair completes, ``settle`` scales the rows and adds c_w acc_w + c_l acc_l: the same three matmuls per
    token as a chunk that holds whole pairs.

    ``antisymmetric``: the loss sees a pair only through its margin rho_w - rho_l, so c_l = -c_w exactly
    (autograd of a difference): one buffer holds acc_w - acc_l, settled with c_w, half the memory."""

    def __init__(self, grads, antisymmetric):
        self.grads = grads
        self.single = antisymmetric
        sides = 1 if antisymmetric else 2
        self.acc_w = None if grads.gw is None else [torch.zeros_like(grads.gw) for _ in range(sides)]
        self.acc_b = None if grads.gb is None else [torch.zeros_like(grads.gb) for _ in range(sides)]
        self.start = None  # first token row of the open pair

    def add(self, g, s, e, split):
        """Rows [s, e) of the open pair with their unit-coefficient logit gradient ``g``; rows before
        ``split`` are chosen tokens, the rest rejected."""
        grads = self.grads
        if self.start is None:
            self.start = s
        if grads.gh is not None:
            torch.mm(g, grads.weight, out=grads.gh[s:e])
        for side, (a, b) in enumerate(((s, split), (split, e))):
            if b > a:
                # With one buffer the rejected side goes in negated: through its [rows, H] hidden rows, a
                # far smaller copy than the [rows, V] gradient.
                acc, negate = (0, side == 1) if self.single else (side, False)
                if self.acc_w is not None:
                    rows = grads.h[a:b]
                    _accumulate_fp32(self.acc_w[acc], g[a - s:b - s].t(), -rows if negate else rows)
                if self.acc_b is not None:
                    total = g[a - s:b - s].sum(0, dtype=torch.float32)
                    self.acc_b[acc].sub_(total) if negate else self.acc_b[acc].add_(total)

    def settle(self, end, row_coef, c_w, c_l):
        """The open pair completed: rows [start, end) get their coefficients ``row_coef``."""
        grads = self.grads
        if grads.gh is not None:
            grads.gh[self.start:end] *= row_coef.unsqueeze(1).to(grads.gh.dtype)
        for acc, total in ((self.acc_w, grads.gw), (self.acc_b, grads.gb)):
            if acc is not None:
                for buffer, coef in zip(acc, (c_w, c_l)):
                    total += buffer.mul_(coef)
                    buffer.zero_()
        self.start = None


def dpo_pass(hidden, weight, bias, labels, ref_logps, cfg, need):
    """The chunk passes of ``linear_dpo_loss`` (its autograd Function's and its compiled op's): (sequence
    log-probs [2B] fp32, completion lengths [2B], chosen token count, (grad hidden, grad weight, grad bias)), the
    gradients those of the loss, None where ``need`` (3 bools) is False."""
    ops = _backends.row_kernels(cfg["backend"], "logprobs")
    two_b = labels.shape[0]
    B = two_b // 2
    order, seq, pair_end, lengths = _pair_order(labels, cfg["ignore_index"])
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, order)
    y = labels.reshape(-1).index_select(0, order)
    n, V = h.shape[0], weight.shape[0]
    need_any = any(need)
    decomposable = cfg["loss_type"] not in _COUPLED
    ends = pair_end.tolist()
    starts = [0] + ends[:-1]
    largest = max((e - s for s, e in zip(starts, ends)), default=0)
    chunk = cfg["chunk_size"] or _auto_chunk(n, V, hidden, largest, decomposable and need_any, need[1])
    aligned = largest <= chunk
    # One pass (gradients in the forward) when the pairs decompose and either every pair fits in a chunk
    # or the open pair's deferred weight gradients (1 or 2 x [V, H] fp32) cost at most 4 chunk buffers.
    antisymmetric = (cfg["loss_type"] in _MARGIN_TYPES and cfg["divergence"] == "reverse_kl"
                     and not cfg["nll_coef"])
    sides = 1 if antisymmetric else 2
    one_pass = need_any and decomposable and (aligned or not need[1] or sides * hidden.shape[-1] <= 4 * chunk)
    plan = _chunks(ends, chunk, aligned and decomposable)
    kw = dict(temperature=1.0, softcap=0.0, ignore_index=cfg["ignore_index"])

    chosen_tokens = lengths[:B].sum().clamp(min=1)
    seq_logps = torch.zeros(two_b, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grads = HeadGrads(h, weight, bias, need, single=len(plan) == 1)
    buf, gbuf = chunk_buffers(min(chunk, max(n, 1)), V, hidden)
    chosen_len = lengths[:B].tolist()
    deferred = _DeferredPair(grads, antisymmetric) if one_pass and not aligned else None
    done = 0  # pairs whose coefficients are applied
    for s, e in plan:
        z = _chunk_logits(h[s:e], weight, bias, buf[: e - s])
        lp, ls, _ = ops.row_forward(z, y[s:e], **kw)
        lse[s:e] = ls
        seq_logps.index_add_(0, seq[s:e], lp)
        if not one_pass:
            continue
        complete = done
        while complete < B and ends[complete] <= e:
            complete += 1
        if complete > done:
            pairs = torch.arange(done, complete, device=h.device)
            c = _sequence_grads(seq_logps, ref_logps, lengths, chosen_tokens, cfg, B, torch.cat([pairs, pairs + B]))
        else:  # the chunk lies inside one open pair
            c = torch.zeros_like(seq_logps)
        rows = seq[s:e]
        # Tokens of the pair still open at e get coefficient 1: their gradient is scaled when it completes.
        coef = torch.where(rows % B < complete, c[rows], torch.ones_like(c[rows]))
        g = gbuf[: e - s]
        ops.row_backward(z, y[s:e], ls, None, coef, None, g, **kw)
        open_from = max(s, starts[complete]) if complete < B and starts[complete] < e else e
        if deferred is not None and deferred.start is not None and complete > done:
            p = done  # the pair left open by the previous chunk completes in this one
            deferred.settle(s, c[seq[deferred.start:s]], c[p], c[p + B])
        grads.add(g[: open_from - s], s, open_from)
        if open_from < e:
            chosen_end = starts[complete] + chosen_len[complete]  # the open pair's rejected rows start here
            deferred.add(g[open_from - s:], open_from, e, min(e, max(open_from, chosen_end)))
        done = complete
    if need_any and not one_pass:
        coef = _sequence_grads(seq_logps, ref_logps, lengths, chosen_tokens, cfg, B, None)
        for s, e in plan:
            z = _chunk_logits(h[s:e], weight, bias, buf[: e - s])
            g = gbuf[: e - s]
            ops.row_backward(z, y[s:e], lse[s:e], None, coef[seq[s:e]], None, g, **kw)
            grads.add(g, s, e)
    buf = gbuf = z = g = None  # freed before ``result`` converts an fp32 accumulator (as in ``ppo_pass``)
    gh, gw, gb = grads.result(hidden.reshape(-1, hidden.shape[-1]), order)
    return seq_logps, lengths, chosen_tokens, (None if gh is None else gh.view(hidden.shape), gw, gb)


class _LinearDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_logps, cfg):
        # Inside forward grad mode is off; the caller's mode (eval: no gradient work) comes in cfg.
        need = [ctx.needs_input_grad[i] and cfg["grad"] for i in range(3)]
        seq_logps, lengths, chosen_tokens, grads = dpo_pass(hidden, weight, bias, labels, ref_logps, cfg, need)
        out = _loss(seq_logps, ref_logps, lengths, chosen_tokens, cfg)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return (*scale_head_grads(grad_loss, ctx.saved_tensors), None, None, None)


def _auto_chunk(n, V, hidden, largest, one_pass_possible, weight_grad):
    """The log-prob chunk budget (``head_chunk_size``: all tokens at once when that costs less than a 16-bit
    head's fp32 accumulator), stretched up to 4x so that the largest pair (``largest`` tokens) fits in one
    chunk when that lets the gradients be computed in the forward: one matmul in four saved for a bounded
    buffer."""
    base = head_chunk_size(n, V, hidden, weight_grad)
    if one_pass_possible and base < largest <= 4 * base:
        return largest
    return base


def _loss(seq_logps, ref_logps, lengths, chosen_tokens, cfg):
    """(loss, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)."""
    B = seq_logps.shape[0] // 2
    out = _preference(seq_logps, ref_logps, lengths, cfg, B, None)
    loss = out.loss
    if cfg["nll_coef"]:
        loss = loss - cfg["nll_coef"] * seq_logps[:B].sum() / chosen_tokens
    return loss, out.chosen_rewards, out.rejected_rewards, seq_logps[:B].clone(), seq_logps[B:].clone()


def _preference(seq_logps, ref_logps, lengths, cfg, B, idx, reduction=None):
    w, l = seq_logps[:B], seq_logps[B:]
    rw = rl = None
    if ref_logps is not None:
        rw, rl = ref_logps[:B], ref_logps[B:]
    lw, ll = lengths[:B], lengths[B:]
    if idx is not None:  # a subset of pairs (idx holds chosen rows then their rejected rows)
        pairs = idx[: idx.shape[0] // 2]
        w, l, lw, ll = w[pairs], l[pairs], lw[pairs], ll[pairs]
        if rw is not None:
            rw, rl = rw[pairs], rl[pairs]
    return dpo_loss(w, l, rw, rl, beta=cfg["beta"], loss_type=cfg["loss_type"], divergence=cfg["divergence"],
                    label_smoothing=cfg["label_smoothing"], reduction=reduction or cfg["reduction"],
                    chosen_lengths=lw, rejected_lengths=ll, backend=cfg["backend"], **cfg["params"])


def _sequence_grads(seq_logps, ref_logps, lengths, chosen_tokens, cfg, B, idx):
    """d loss / d sequence log-prob for the sequences in ``idx`` (all when None), zero elsewhere."""
    x = seq_logps.detach().requires_grad_()
    with torch.enable_grad():
        if idx is None:
            loss = _preference(x, ref_logps, lengths, cfg, B, None).loss
        else:
            per_pair = _preference(x, ref_logps, lengths, cfg, B, idx, reduction="none").loss
            loss = per_pair.sum() / (B if cfg["reduction"] == "mean" else 1)
        (c,) = torch.autograd.grad(loss, x)
    if cfg["nll_coef"]:
        nll = torch.zeros_like(c)
        rows = torch.arange(B, device=c.device) if idx is None else idx[: idx.shape[0] // 2]
        nll[rows] = -cfg["nll_coef"] / chosen_tokens
        c = c + nll
    return c


def linear_dpo_loss(hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                    ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1, loss_type="sigmoid",
                    divergence="reverse_kl", label_smoothing=0.0, nll_coef=0.0, reduction="mean",
                    ignore_index=-100, chunk_size=None, backend="auto", **params):
    """DPO-family loss straight from hidden states: hidden [2B, T, H] (the B chosen rows first), the head
    weight [V, H] (+ bias), labels [2B, T] already shifted, ``ignore_index`` on prompt and padding.

    Sequence log-prob = sum of the completion tokens' log-probs (the length-normalized types ipo,
    sigmoid_norm, simpo and orpo divide by the completion lengths, see ``dpo_loss``). The reference comes
    either precomputed (``ref_chosen_logps`` / ``ref_rejected_logps``, [B] sums) or from ``ref_hidden`` +
    ``ref_weight`` (+ ``ref_bias``), computed chunkwise without gradient. ``nll_coef`` adds RPO's
    ``nll_coef * NLL(chosen)`` (token mean over the batch's chosen completions). ``reduction`` is "mean"
    or "sum" (the loss must be a scalar: gradients are computed inside the forward and scaled in backward).

    ``chunk_size`` (tokens per chunk) defaults to the log-prob budget (``auto_chunk_size``), stretched up to
    4x when that makes the largest pair fit, so that the gradients come out of the forward pass (3 matmuls
    per token, not 4); larger pairs defer the gradients of the pair open at a chunk's end (module
    docstring), or, when H > 2 x chunk_size, take two passes. With a bf16/fp16 head, the weight gradient
    of several chunks is summed in an fp32 [V, H] buffer (twice the gradient's size); one chunk writes it
    directly, so all tokens go in one chunk whenever that costs less memory than the buffer
    (``head_chunk_size``). Returns a PreferenceOutput whose metrics also
    hold the per-sequence ``chosen_logps`` and ``rejected_logps`` [B]. Without grad (eval) no gradient work
    is done. The heads may be sharded parameters (FSDP2 DTensor, DeepSpeed ZeRO-3), gathered for the call as
    in ``linear_logprobs``.
    """
    # A sharded reference head is gathered by linear_logprobs, which runs it without grad.
    weight, bias = gathered("weight", weight), gathered("bias", bias)
    check_float("hidden", hidden, dim=3)
    check_float("weight", weight, dim=2)
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden must hold B chosen then B rejected rows: an even first dim, got {hidden.shape[0]}")
    if weight.shape[1] != hidden.shape[2] or weight.dtype != hidden.dtype:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}] of dtype {hidden.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] of dtype {hidden.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_labels(labels, hidden.shape[:2], weight.shape[0], ignore_index)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for linear_dpo_loss, got {reduction!r}")
    check_positive("nll_coef", nll_coef, allow_zero=True)
    check_chunk_size(chunk_size)
    B = hidden.shape[0] // 2
    has_pre = ref_chosen_logps is not None or ref_rejected_logps is not None
    has_model = ref_hidden is not None or ref_weight is not None
    if has_pre and has_model:
        raise ValueError("pass either ref_chosen_logps/ref_rejected_logps or ref_hidden/ref_weight, not both")
    ref_logps = None
    if has_pre:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps")
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t.shape != (B,):
                raise ValueError(f"{name} must have shape ({B},), got {tuple(t.shape)}")
        ref_logps = torch.cat([ref_chosen_logps, ref_rejected_logps]).float().detach()
    elif has_model:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("pass both ref_hidden and ref_weight")
        with torch.no_grad():
            ref_tok = linear_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, ignore_index=ignore_index,
                                      chunk_size=chunk_size, backend=backend)
        ref_logps = ref_tok.sum(1)
    cfg = dict(beta=beta, loss_type=loss_type, divergence=divergence, label_smoothing=label_smoothing,
               nll_coef=nll_coef, reduction=reduction, ignore_index=int(ignore_index), chunk_size=chunk_size,
               backend=resolve(backend, hidden.device, "logprobs"), params=params,
               grad=torch.is_grad_enabled())
    # Validates every loss option on small vectors before any matmul runs.
    lengths = (labels != ignore_index).sum(1)
    probe = torch.zeros(2 * B, device=hidden.device)
    _preference(probe, None if ref_logps is None else probe, lengths, cfg, B, None)
    if compiling():
        from fastpref.ops import _library

        loss, rw, rl, cw, cl = _library.linear_dpo(hidden, weight, bias, labels, ref_logps, cfg)
    else:
        loss, rw, rl, cw, cl = _LinearDPOFunction.apply(hidden, weight, bias, labels, ref_logps, cfg)
    metrics = _preference(torch.cat([cw, cl]), ref_logps, lengths, cfg, B, None).metrics
    metrics.update(chosen_logps=cw, rejected_logps=cl)
    return PreferenceOutput(loss, rw, rl, metrics)

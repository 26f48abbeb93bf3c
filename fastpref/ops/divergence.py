"""token_divergence and linear_token_divergence: full-vocabulary D_f(pi || pi_ref) per position.

Autograd Functions over the divergence row kernels (contract at the bottom of
``fastpref.kernels.reference``); the registry of divergences is ``fastpref.divergences``.
"""
from __future__ import annotations

import torch

from fastpref import _backends, divergences
from fastpref._validate import check_chunk_size, check_float, check_labels, check_positive, check_same_device
from fastpref.ops import compiling, resolve
from fastpref.ops._sharded import gathered
from fastpref.ops._vocab_parallel import div_forward as vocab_parallel_div_forward
from fastpref.ops._vocab_parallel import group_size
from fastpref.ops.logprobs import (SliceGrads, _chunk_logits, _kept_rows, _logits_dtype, _row_pieces, auto_chunk_size,
                                   gather_rows, row_buffer, slice_buffers, slice_logits, slice_width,
                                   take)


def token_div_forward(logits, ref_logits, labels, kw, backend, group=None):
    """(value [...], lse, lse_r, s_a, s_b [N]): the forward of ``token_divergence``, for its autograd Function and
    its compiled op (``ops/_library.py``). ``group``: vocabulary-parallel shards (``ops/_vocab_parallel.py``)."""
    ops = _backends.row_kernels(backend, "divergence")
    x, xr = _two_d(logits), _two_d(ref_logits)
    y = None if labels is None else labels.reshape(-1)
    if group is None:
        value, *stats = ops.div_forward(x, xr, y, **kw)
    else:
        value, *stats = vocab_parallel_div_forward(ops, x, xr, y, group, **kw)
    return value.view(logits.shape[:-1]), *stats


def token_div_backward(logits, ref_logits, labels, lse, lse_r, s_a, s_b, grad, need, kw, backend):
    """(grad logits, grad ref_logits), None where ``need`` (2 bools) is False. The same with vocabulary shards:
    the statistics are global, and each shard's gradient follows from them."""
    ops = _backends.row_kernels(backend, "divergence")
    V = logits.shape[-1]
    gx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need[0] else None
    gr = torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=ref_logits.device) if need[1] else None
    ops.div_backward(_two_d(logits), _two_d(ref_logits), None if labels is None else labels.reshape(-1), lse, lse_r,
                     s_a, s_b, grad.float().reshape(-1).contiguous(), None if gx is None else gx.view(-1, V),
                     None if gr is None else gr.view(-1, V), **kw)
    return gx, gr


class TokenDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, labels, kw, backend, group):
        value, *stats = token_div_forward(logits, ref_logits, labels, kw, backend, group)
        ctx.save_for_backward(logits, ref_logits, labels, *stats)
        ctx.kw, ctx.backend = kw, backend
        return value

    @staticmethod
    def backward(ctx, grad):
        logits, ref_logits, labels, *stats = ctx.saved_tensors
        return (*token_div_backward(logits, ref_logits, labels, *stats, grad, ctx.needs_input_grad[:2], ctx.kw,
                                    ctx.backend), None, None, None, None)


def _two_d(t):
    """[..., V] -> [N, V] with unit column stride (a view when the layout allows, else a copy)."""
    pieces = _row_pieces(t)
    return pieces[0] if len(pieces) == 1 else t.reshape(-1, t.shape[-1]).contiguous()


def _check_common(divergence, params, labels, shape, V, ignore_index, temperature, device, **tensors):
    d, param = divergences.get(divergence, params)
    check_same_device(**tensors, labels=labels)
    if labels is not None:
        check_labels(labels, shape, V, ignore_index)
    check_positive("temperature", temperature)
    return dict(div_id=d.kernel_id, param=param, temperature=float(temperature), ignore_index=int(ignore_index))


def token_divergence(logits, ref_logits, *, divergence="reverse_kl", labels=None, ignore_index=-100,
                     temperature=1.0, backend="auto", process_group=None, **params):
    """Per-position full-vocabulary f-divergence D_f(pi || pi_ref) = sum_v pi_ref f(pi / pi_ref).

    pi = softmax(logits / temperature), pi_ref = softmax(ref_logits / temperature) (the same temperature
    for both, as when both come from one sampling setup).

    Args:
        logits, ref_logits: [..., V], float32/bfloat16/float16 (their dtypes may differ). A -inf logit is
            probability 0: an entry masked on both sides adds nothing, one masked on one side alone gives
            each term its limit (a KL that is infinite comes out as inf; on the torch backend as a number
            past 1e30).
        divergence: a name in ``fastpref.divergences.REGISTRY``: reverse_kl, forward_kl, js (``beta``, or
            ``js_beta`` as the losses call it; default 0.5), alpha (``alpha``, default 0.5, TRL's convention:
            alpha -> 1 is reverse KL), tv, hellinger. Parameters go as keyword arguments and must lie in (0, 1).
        labels: optional [...] integer tensor; it only masks positions (``ignore_index`` -> 0, no gradient).
        process_group: vocabulary parallelism (Megatron layout, as in ``token_logprobs``): both logits are this
            rank's shard [..., V_local] of the same vocabulary ids. The values are the full-vocabulary ones on
            every rank (three all-reduces of [N]-sized statistics in the forward, none in the backward). The
            sharded forward evaluates the divergence terms in PyTorch after the backend's kernel (which
            normalizes within the shard) gave the shard's log-sum-exps; the backward is the backend's kernel.

    Returns:
        fp32 [...] values. Gradients flow to ``logits`` and, when it requires grad, to ``ref_logits``
        (on-policy distillation). ``tv``'s gradient is a subgradient: sign(0) = 0 where pi == pi_ref.
    """
    check_float("logits", logits, min_dim=1)
    check_float("ref_logits", ref_logits, min_dim=1)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    ranks = 1 if process_group is None else group_size(process_group)
    kw = _check_common(divergence, params, labels, logits.shape[:-1], logits.shape[-1] * ranks, ignore_index,
                       temperature, logits.device, logits=logits, ref_logits=ref_logits)
    name = resolve(backend, logits.device, "divergence")
    if compiling() and process_group is None:
        from fastpref.ops import _library

        return _library.token_divergence(logits, ref_logits, labels, kw, name)
    return TokenDivergenceFunction.apply(logits, ref_logits, labels, kw, name, process_group)


def _div_chunk(chunk_size, n, V, hidden):
    """Token rows per chunk: ``chunk_size``, or the log-prob budget for the two heads' logits."""
    return chunk_size or max(1, auto_chunk_size(n, 2 * V, hidden))


def linear_div_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kw, chunk_size, backend):
    """(value, lse, lse_r, s_a, s_b [N], chunk): the forward of ``linear_token_divergence`` on rows [N, H], for its
    autograd Function and its compiled op: chunks of both heads' logits in bounded buffers."""
    ops = _backends.row_kernels(backend, "divergence")
    N, V = hidden.shape[0], weight.shape[0]
    rows = None if labels is None else _kept_rows(labels, kw["ignore_index"])
    n = N if rows is None else rows.shape[0]
    chunk = _div_chunk(chunk_size, n, V, hidden)
    outs = [torch.zeros(N, dtype=torch.float32, device=hidden.device) for _ in range(5)]
    buf = torch.empty(min(chunk, n), V, dtype=_logits_dtype(hidden), device=hidden.device)
    rbuf = torch.empty(min(chunk, n), V, dtype=_logits_dtype(ref_hidden), device=hidden.device)
    hbufs = [row_buffer(rows, min(chunk, n), h) for h in (hidden, ref_hidden)]
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = _chunk_logits(gather_rows(hidden, rows, s, e, hbufs[0]), weight, bias, buf[: e - s])
        zr = _chunk_logits(gather_rows(ref_hidden, rows, s, e, hbufs[1]), ref_weight, ref_bias, rbuf[: e - s])
        res = ops.div_forward(z, zr, None, **kw)
        idx = rows[s:e] if rows is not None else slice(s, e)
        for out, r in zip(outs, res):
            out[idx] = r
    return (*outs, chunk)


def linear_div_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, lse_r, s_a, s_b, grad,
                        needs, kw, chunk, backend):
    """The gradients of ``linear_token_divergence`` w.r.t. (hidden, weight, bias, ref_hidden, ref_weight,
    ref_bias), None where ``needs`` (6 bools) is False: both heads' logits are recomputed a slice of the
    vocabulary at a time for every kept token (``SliceGrads``: no fp32 [V, H] accumulator), a slice holding at
    most the forward's ``chunk`` rows of both heads' logits (None: the forward's default). The kernels' gradient
    of an element needs only its row's statistics, so a slice needs no correction."""
    ops = _backends.row_kernels(backend, "divergence")
    V = weight.shape[0]
    rows = None if labels is None else _kept_rows(labels, kw["ignore_index"])
    sel = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    g_all, lse, lse_r, s_a, s_b = (sel(t) for t in (grad.float().contiguous(), lse, lse_r, s_a, s_b))
    hs = [sel(hidden), sel(ref_hidden)]
    n = lse.shape[0]
    width = slice_width(n, V, _div_chunk(chunk, n, V, hidden))
    sides = []  # (SliceGrads or None for a frozen head, flat logits buffer, flat gradient buffer or None)
    for hh, w, b, need in ((hs[0], weight, bias, needs[0:3]), (hs[1], ref_weight, ref_bias, needs[3:6])):
        if any(need):
            sides.append((SliceGrads(hh, w, b, need, single=width == V), *slice_buffers(n, width, hh)))
        else:
            sides.append((None, torch.empty(n * width, dtype=_logits_dtype(hh), device=hh.device), None))
    for a in range(0, V, width):
        b = min(a + width, V)
        z = slice_logits(hs[0], weight, bias, a, b, sides[0][1])
        zr = slice_logits(hs[1], ref_weight, ref_bias, a, b, sides[1][1])
        outs = [None if gbuf is None else take(gbuf, n, b - a) for _, _, gbuf in sides]
        ops.div_backward(z, zr, None, lse, lse_r, s_a, s_b, g_all, *outs, **kw)
        for (grads, _, _), g in zip(sides, outs):
            if grads is not None:
                grads.add(g, a, b)
    result = []
    for (grads, _, _), full_h in zip(sides, (hidden, ref_hidden)):
        result += grads.result(full_h, rows) if grads is not None else (None, None, None)
    return tuple(result)


class LinearTokenDivergenceFunction(torch.autograd.Function):
    """Chunks of both heads' logits in bounded buffers; backward recomputes them a vocabulary slice at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kw, chunk_size, backend):
        value, *stats, chunk = linear_div_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, kw,
                                                  chunk_size, backend)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, *stats)
        ctx.kw, ctx.backend, ctx.chunk = kw, backend, chunk
        return value

    @staticmethod
    def backward(ctx, grad):
        *tensors, lse, lse_r, s_a, s_b = ctx.saved_tensors
        return (*linear_div_backward(*tensors, lse, lse_r, s_a, s_b, grad, ctx.needs_input_grad, ctx.kw, ctx.chunk,
                                     ctx.backend), None, None, None, None)


def linear_token_divergence(hidden, weight, ref_hidden, ref_weight, *, divergence="reverse_kl", bias=None,
                            ref_bias=None, labels=None, ignore_index=-100, temperature=1.0, chunk_size=None,
                            backend="auto", **params):
    """``token_divergence`` of ``hidden @ weight.T + bias`` against ``ref_hidden @ ref_weight.T + ref_bias``.

    Neither [N, V] logits is materialized: the forward runs both heads on bounded chunks of tokens and keeps
    the log-sum-exps and two per-token sums; the backward recomputes both heads' logits a slice of the
    vocabulary at a time for all tokens, within the same bound. Gradients flow to every tensor that requires
    one, the reference side included (distillation); each slice's weight/bias gradient is one matmul (fp32
    accumulation inside it) written in their dtype, the hidden gradients are summed in fp32. Positions masked
    by ``labels`` are dropped before the matmuls.

    hidden [..., H], weight [V, H]; ref_hidden [..., H_ref] with the same leading dims, ref_weight
    [V, H_ref] (the reference may have another hidden size). See ``token_divergence`` for the rest. Either
    head may be a sharded parameter (FSDP2 DTensor, DeepSpeed ZeRO-3), gathered for the call as in
    ``linear_logprobs``.
    """
    weight, bias = gathered("weight", weight), gathered("bias", bias)
    ref_weight, ref_bias = gathered("ref_weight", ref_weight), gathered("ref_bias", ref_bias)
    check_float("hidden", hidden, min_dim=1)
    check_float("ref_hidden", ref_hidden, min_dim=1)
    for name, w, h, b in (("weight", weight, hidden, bias), ("ref_weight", ref_weight, ref_hidden, ref_bias)):
        prefix = name[: -len("weight")]
        check_float(name, w, dim=2)
        if w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name} must have shape [V, {h.shape[-1]}] to match {prefix}hidden, "
                             f"got {tuple(w.shape)}")
        if w.dtype != h.dtype:
            raise TypeError(f"{name} dtype {w.dtype} must match {prefix}hidden dtype {h.dtype}")
        if b is not None:
            check_float(f"{prefix}bias", b, dim=1)
            if b.shape[0] != w.shape[0] or b.dtype != h.dtype:
                raise ValueError(f"{prefix}bias must be [{w.shape[0]}] of dtype {h.dtype}, got "
                                 f"{tuple(b.shape)} {b.dtype}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has {ref_weight.shape[0]} rows but weight has {weight.shape[0]}: "
                         "both heads must share the vocabulary")
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden leading dims {tuple(ref_hidden.shape[:-1])} must match hidden's "
                         f"{tuple(hidden.shape[:-1])}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    kw = _check_common(divergence, params, labels, hidden.shape[:-1], V, ignore_index, temperature,
                       hidden.device, hidden=hidden, weight=weight, ref_hidden=ref_hidden, ref_weight=ref_weight,
                       bias=bias, ref_bias=ref_bias)
    check_chunk_size(chunk_size)
    name = resolve(backend, hidden.device, "divergence")
    args = (hidden.reshape(-1, hidden.shape[-1]), weight, bias, ref_hidden.reshape(-1, ref_hidden.shape[-1]),
            ref_weight, ref_bias, None if labels is None else labels.reshape(-1), kw, chunk_size, name)
    if compiling():
        from fastpref.ops import _library

        return _library.linear_token_divergence(*args).view(hidden.shape[:-1])
    return LinearTokenDivergenceFunction.apply(*args).view(hidden.shape[:-1])

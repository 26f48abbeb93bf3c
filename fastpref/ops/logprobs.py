"""token_logprobs and linear_logprobs: autograd Functions (custom backward) and backend dispatch.

The kernels live in ``fastpref/kernels`` and follow the row-kernel contract of
``fastpref.kernels.reference``; this module turns them into differentiable ops.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from fastpref import _backends
from fastpref._validate import check_chunk_size, check_float, check_labels, check_positive, check_same_device
from fastpref.ops import compiling, resolve
from fastpref.ops._sharded import gathered
from fastpref.ops._vocab_parallel import LOCAL_IGNORE, VocabShard, first_column, fix_first_column, group_size


def _f32(g):
    return None if g is None else g.float().contiguous()


def _row_pieces(x: torch.Tensor) -> list[torch.Tensor]:
    """[..., V] -> 2-D views [rows, V] with unit column stride that cover the rows in order.

    A sliced batch such as ``logits[:, :-1]`` cannot be viewed as one 2-D matrix, but each of its
    sequences can: walking them avoids the full copy of the logits that ``reshape`` would make.
    """
    V = x.shape[-1]
    if x.stride(-1) == 1:
        try:
            return [x.view(-1, V)]
        except RuntimeError:
            pass
        if x.dim() >= 3:
            return [x[idx] for idx in itertools.product(*map(range, x.shape[:-2]))]
    return [x.contiguous().view(-1, V)]


def token_forward(logits, labels, temperature, ignore_index, with_entropy, backend, group=None):
    """(logp [labels.shape], lse [N], entropy [labels.shape] or None): the forward of ``token_logprobs``, for
    its autograd Function and its compiled op (``ops/_library.py``). ``group``: vocabulary-parallel shard."""
    ops = _backends.row_kernels(backend, "logprobs")
    y = labels.reshape(-1)
    shard = None if group is None else VocabShard(y, logits.shape[-1], ignore_index, group)
    kw = dict(temperature=temperature, softcap=0.0, ignore_index=ignore_index if shard is None else LOCAL_IGNORE)
    yk = y if shard is None else shard.labels
    outs, start = [], 0
    for x in _row_pieces(logits):
        n = x.shape[0]
        outs.append(ops.row_forward(x, yk[start:start + n], with_entropy=with_entropy, **kw))
        start += n
    logp = torch.cat([o[0] for o in outs])
    lse = torch.cat([o[1] for o in outs])
    entropy = torch.cat([o[2] for o in outs]) if with_entropy else None
    if shard is not None:
        logp, lse, entropy = shard.combine(logp, lse, entropy)
    return logp.view(labels.shape), lse, None if entropy is None else entropy.view(labels.shape)


def token_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend,
                   group=None):
    """The gradient of ``token_logprobs`` w.r.t. the logits (their dtype), given the forward's lse and entropy."""
    ops = _backends.row_kernels(backend, "logprobs")
    V = logits.shape[-1]
    y = labels.reshape(-1)
    gl, gh = _f32(grad_logp), _f32(grad_entropy)
    gl = None if gl is None else gl.view(-1)
    gh = None if gh is None else gh.view(-1)
    ent = None if entropy is None or gh is None else entropy.reshape(-1)
    shard = None if group is None else VocabShard(y, V, ignore_index, group)
    kw = dict(temperature=temperature, softcap=0.0, ignore_index=ignore_index if shard is None else LOCAL_IGNORE)
    yk = y if shard is None else shard.labels
    # The gradient comes back in the logits' dtype, written by the kernel row by row: no fp32 copy.
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    rows = grad.view(-1, V)
    pieces = _row_pieces(logits)
    start = 0
    for x in pieces:
        sl = slice(start, start + x.shape[0])
        ops.row_backward(x, yk[sl], lse[sl], ent[sl] if ent is not None else None,
                         gl[sl] if gl is not None else None, gh[sl] if gh is not None else None,
                         rows[sl], **kw)
        start = sl.stop
    if shard is not None:
        x0 = torch.cat([first_column(x) for x in pieces])
        fix_first_column(rows, x0, shard.keep & ~shard.owned, lse, ent, gl, gh, temperature=temperature, softcap=0.0)
    return grad


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, with_entropy, backend, group):
        logp, lse, entropy = token_forward(logits, labels, temperature, ignore_index, with_entropy, backend, group)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = temperature, ignore_index, backend, group
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, labels, lse, entropy = ctx.saved_tensors
        return token_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, *ctx.args), *[None] * 6


def token_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0, return_entropy=False, backend="auto",
                   process_group=None):
    """Per-token log-probability of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: [..., V] float32/bfloat16/float16. Any leading shape; rows may be strided (e.g.
            ``logits[:, :-1]``) without a copy. A -inf logit (a masked vocabulary entry) is probability 0
            and gets a zero gradient.
        labels: [...] integer, in [0, V) or ``ignore_index``; ignored positions give 0 and no gradient.
        temperature: > 0; the log-probs are those of the tempered distribution (as in PPO/GRPO rollouts).
        return_entropy: also return the entropy H = lse(z) - sum_v p_v z_v of each position (0 where ignored),
            differentiable.
        backend: "auto", "triton", "cpu" or "torch" (see ``fastpref.backends()``).
        process_group: vocabulary parallelism (Megatron layout): ``logits`` [..., V_local] is this rank's
            shard, vocabulary ids [rank * V_local, (rank + 1) * V_local) of V = V_local * group size (every
            rank holds the same V_local), and ``labels`` are global ids, the same on every rank. The results
            are the full-vocabulary ones on every rank (two all-reduces of [N] vectors in the forward, none in
            the backward); the gradient is that of this rank's shard.

    Returns:
        float32 ``logp`` of shape ``labels.shape``, or ``(logp, entropy)``. Gradients to ``logits`` come back
        in its dtype.
    """
    check_float("logits", logits, min_dim=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension, got shape "
                         f"{tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels)
    ranks = 1 if process_group is None else group_size(process_group)
    check_labels(labels, logits.shape[:-1], logits.shape[-1] * ranks, ignore_index)
    check_positive("temperature", temperature)
    name = resolve(backend, logits.device, "logprobs")
    args = (logits, labels, float(temperature), int(ignore_index), bool(return_entropy), name)
    if compiling() and process_group is None:
        from fastpref.ops import _library

        return _library.token_logprobs(*args)
    return TokenLogprobsFunction.apply(*args, process_group)


# Chunk buffers target this many bytes of logits (plus their gradient when it has another dtype).
_CPU_CHUNK_BYTES = 64 << 20
_GPU_CHUNK_BYTES_MAX = 1 << 30


def _logits_dtype(hidden: torch.Tensor) -> torch.dtype:
    """bf16/fp16 logits on CUDA come out of the matmul in fp32 (fp32 accumulate, no rounding to bf16)."""
    return torch.float32 if hidden.is_cuda else hidden.dtype


def auto_chunk_size(n: int, V: int, hidden: torch.Tensor) -> int:
    """Token rows per chunk: the logits buffer stays within a budget that depends on the device.

    CPU: 64 MiB (GEMMs with fewer than ~512 rows lose speed on CPU, and 64 MiB at V = 32000 is 524 rows).
    CUDA: 1/8 of the free memory, at most 1 GiB. Rounded to a multiple of 64 rows for GEMM tiling.
    """
    per_row = chunk_row_bytes(V, hidden)
    if hidden.is_cuda:
        free, _ = torch.cuda.mem_get_info(hidden.device)
        budget = min(_GPU_CHUNK_BYTES_MAX, max(64 << 20, free // 8))
    else:
        budget = _CPU_CHUNK_BYTES
    rows = max(1, budget // per_row)
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n))


def chunk_row_bytes(V: int, hidden: torch.Tensor) -> int:
    """Bytes of ``chunk_buffers`` per token row: the logits, and their gradient when it has another dtype."""
    per_row = V * torch.finfo(_logits_dtype(hidden)).bits // 8
    if _logits_dtype(hidden) != hidden.dtype:
        per_row += V * hidden.element_size()
    return per_row


def head_chunk_size(n: int, V: int, hidden: torch.Tensor, weight_grad: bool) -> int:
    """Token rows per chunk of a pass that computes a head's gradients token chunk by token chunk
    (``HeadGrads``): ``auto_chunk_size``, or all ``n`` rows in one chunk when that costs at most the fp32
    [V, H] weight-gradient accumulator that a second chunk needs for a 16-bit head (4 V H bytes: 2 GiB for a
    128k x 4096 head, against 6 V bytes per extra row on a GPU, so up to 2H/3 rows over the budget). One
    chunk writes the gradient once in the head's dtype and skips the accumulator's read and write per chunk."""
    chunk = auto_chunk_size(max(n, 1), V, hidden)
    accumulator_rows = 4 * V * hidden.shape[-1] // chunk_row_bytes(V, hidden)
    if weight_grad and hidden.dtype != torch.float32 and chunk < n <= chunk + accumulator_rows:
        return n
    return chunk


def _chunk_logits(h, weight, bias, out):
    """out[:] = h @ weight.T + bias, with fp32 output for half inputs on CUDA."""
    if out.dtype != h.dtype:
        torch.ops.aten.mm.dtype_out(h, weight.t(), out.dtype, out=out)
        if bias is not None:
            out.add_(bias)
    elif bias is not None:
        torch.addmm(bias, h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=out)
    return out


def _accumulate_fp32(acc, a, b):
    """acc (fp32) += a @ b. Half inputs on CUDA: the matmul writes fp32, the product is never rounded to their
    dtype. On CPU, which has no such matmul, the product is rounded to their dtype once before the fp32 sum:
    fp32 copies of a and b instead cost a temporary as large as the chunk's logits in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def chunk_buffers(rows, V, hidden):
    """The logits buffer for ``rows`` tokens and the buffer the row kernel writes the gradient into: the
    same one when the dtypes agree (CPU, fp32), so the gradient overwrites the logits it was read from."""
    buf = torch.empty(rows, V, dtype=_logits_dtype(hidden), device=hidden.device)
    return buf, buf if buf.dtype == hidden.dtype else torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)


def row_buffer(rows, chunk, hidden):
    """The buffer ``gather_rows`` fills with a chunk of ``hidden``'s kept rows (None when no row is dropped:
    chunks are then views)."""
    return None if rows is None else hidden.new_empty(chunk, hidden.shape[1])


def gather_rows(hidden, rows, s, e, out):
    """Rows [s, e) of ``hidden`` (rows None) or of ``hidden[rows]``, gathered into ``out`` [>= e - s, H]: a
    chunk of the kept tokens without a copy of all of them."""
    if rows is None:
        return hidden[s:e]
    return torch.index_select(hidden, 0, rows[s:e], out=out[: e - s])


class HeadGrads:
    """Gradients of a linear head's input rows ``h``, weight and bias, accumulated chunk by chunk from the
    gradient of the chunk's logits; weight and bias in fp32, or with ``single`` (one chunk holds every row)
    the weight gradient written once by one matmul in the weight's dtype. ``need`` = (hidden, weight, bias).

    ``rows`` (optional): chunk [s, e) covers ``h[rows[s:e]]``, gathered chunk by chunk (``gather``) instead
    of a compact copy of every kept row, and the hidden gradient goes straight into its [N, H] result:
    two [kept, H] buffers fewer."""

    def __init__(self, h, weight, bias, need, rows=None, single=False):
        self.h, self.weight, self.bias, self.rows, self.single = h, weight, bias, rows, single
        self.gh = None if not need[0] else torch.empty_like(h) if rows is None else torch.zeros_like(h)
        self.gw = None
        if need[1]:
            self.gw = torch.empty_like(weight) if single else weight.new_zeros(weight.shape, dtype=torch.float32)
        self.gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need[2] else None

    def gather(self, s, e, out):
        """The input rows of chunk [s, e): a view, or with ``rows`` gathered into ``out``."""
        return gather_rows(self.h, self.rows, s, e, out)

    def add(self, g, s, e, hc=None):
        """Adds chunk [s, e)'s logit gradient ``g``; ``hc`` its input rows when they were gathered."""
        hc = self.h[s:e] if hc is None else hc
        if self.gh is not None:
            if self.rows is None:
                torch.mm(g, self.weight, out=self.gh[s:e])
            else:
                self.gh.index_copy_(0, self.rows[s:e], g @ self.weight)
        if self.gw is not None:
            if self.single:
                torch.mm(g.t(), hc, out=self.gw)
            else:
                _accumulate_fp32(self.gw, g.t(), hc)
        if self.gb is not None:
            self.gb += g.sum(0, dtype=torch.float32)

    def result(self, hidden, rows):
        """(grad hidden, grad weight, grad bias); ``h`` was ``hidden[rows]`` (rows None: all of it, in order,
        or the rows were gathered)."""
        gh = self.gh
        if gh is not None and rows is not None and self.rows is None:
            gh = torch.zeros_like(hidden).index_copy_(0, rows, gh)
        return (gh, None if self.gw is None else self.gw.to(self.weight.dtype),
                None if self.gb is None else self.gb.to(self.bias.dtype))


class SliceGrads:
    """Gradients of a linear head from the gradient of its logits, a slice of the vocabulary at a time over all
    its input rows ``h`` [n, H] (the kept tokens): each slice's weight and bias gradient is one matmul (fp32
    accumulation inside it) written once in their dtype, and only the hidden gradient [n, H] is summed over
    the slices, in fp32 (written directly when ``single``: one slice covers the vocabulary). Chunking tokens
    instead (``HeadGrads``) needs an fp32 [V, H] accumulator, read and written once per chunk: on a GPU with
    a 16-bit head, twice the size of the gradient it returns. ``need`` = (hidden, weight, bias)."""

    def __init__(self, h, weight, bias, need, single):
        self.h, self.weight, self.single = h, weight, single
        self.dh = None
        if need[0]:
            self.dh = torch.empty_like(h) if single else h.new_zeros(h.shape, dtype=torch.float32)
        self.gw = torch.empty_like(weight) if need[1] else None
        self.gb = torch.empty_like(bias) if need[2] else None

    def add(self, g, a, b):
        """Adds slice [a, b)'s logit gradient ``g`` [n, b - a]."""
        w_s = self.weight[a:b]
        if self.dh is not None:
            if self.single:
                torch.mm(g, w_s, out=self.dh)
            else:
                _accumulate_fp32(self.dh, g, w_s)
        if self.gw is not None:
            torch.mm(g.t(), self.h, out=self.gw[a:b])
        if self.gb is not None:
            self.gb[a:b] = g.sum(0, dtype=torch.float32)

    def result(self, hidden, rows):
        """(grad hidden, grad weight, grad bias); ``h`` was ``hidden[rows]`` (rows None: all of it)."""
        dh = self.dh
        if dh is not None:
            dh = dh.to(hidden.dtype)
            if rows is not None:
                dh = torch.zeros_like(hidden).index_copy_(0, rows, dh)
        return dh, self.gw, self.gb


def slice_width(n, V, chunk):
    """Vocabulary columns per slice for ``n`` token rows: a slice holds at most the logits of ``chunk`` token
    rows, the forward's bound; the slices are made equal (no sliver of a few columns at the end)."""
    if n == 0:
        return V
    slices = -(-V // max(1, min(V, chunk * V // n)))
    return -(-V // slices)


def slice_buffers(n, width, hidden):
    """``chunk_buffers`` for slices of ``width`` columns, flat: ``take(buf, n, cols)`` is then a contiguous
    [n, cols] view for the last, narrower slice too (matmul ``out=``)."""
    return tuple(t.view(-1) for t in chunk_buffers(n, width, hidden))


def take(buf, n, cols):
    """The first n * cols elements of a flat buffer as [n, cols]."""
    return buf[: n * cols].view(n, cols)


def slice_logits(h, weight, bias, a, b, buf):
    """The logits of vocabulary slice [a, b) of the head (weight, bias) for the rows ``h``, in the flat ``buf``."""
    return _chunk_logits(h, weight[a:b], None if bias is None else bias[a:b], take(buf, h.shape[0], b - a))


def scale_head_grads(grad, grads):
    """The saved head gradients of a scalar loss times its upstream gradient ``grad`` (a 0-d tensor); no
    copy of the weight-sized gradient in the usual ``loss.backward()``, where ``grad`` is 1."""
    if bool(grad == 1):
        return grads
    return tuple(None if t is None else t * grad.to(t.dtype) for t in grads)


def linear_forward(hidden, weight, bias, labels, temperature, softcap, ignore_index, with_entropy, chunk_size,
                   backend, group=None):
    """(logp [N], lse [N], entropy [N] or None, chunk): the forward of ``linear_logprobs`` on hidden [N, H] and
    labels [N], for its autograd Function and its compiled op. It keeps only lse (and entropy) per token."""
    ops = _backends.row_kernels(backend, "logprobs")
    N, V = hidden.shape[0], weight.shape[0]
    rows = _kept_rows(labels, ignore_index)
    shard = None if group is None else VocabShard(labels, V, ignore_index, group)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index if shard is None else LOCAL_IGNORE)
    y = labels if shard is None else shard.labels
    y = y if rows is None else y.index_select(0, rows)
    n = y.shape[0]
    chunk = chunk_size or auto_chunk_size(n, V, hidden)
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else None
    buf = torch.empty(min(chunk, n), V, dtype=_logits_dtype(hidden), device=hidden.device)
    hbuf = row_buffer(rows, min(chunk, n), hidden)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = _chunk_logits(gather_rows(hidden, rows, s, e, hbuf), weight, bias, buf[: e - s])
        lp, ls, en = ops.row_forward(z, y[s:e], with_entropy=with_entropy, **kw)
        idx = rows[s:e] if rows is not None else slice(s, e)
        logp[idx], lse[idx] = lp, ls
        if with_entropy:
            entropy[idx] = en
    if shard is not None:
        logp, lse, entropy = shard.combine(logp, lse, entropy)
    return logp, lse, entropy, chunk


def linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, need, temperature,
                    softcap, ignore_index, chunk, backend, group=None):
    """(grad hidden, grad weight, grad bias) of ``linear_logprobs``, None where ``need`` (3 bools) is False.

    The logits are recomputed a slice of the vocabulary at a time for every kept token (``SliceGrads``), a slice
    holding at most ``chunk`` * V logits (``chunk``: the forward's token rows per chunk, None for
    ``auto_chunk_size``). The row kernels see each slice as a vocabulary shard (as with ``group``): a token
    whose label lies outside the slice gets column 0, whose one-hot ``fix_first_column`` removes. With
    ``group``, the hidden gradient is summed over the group (the hidden states are replicated on its ranks,
    each of which holds a slice of the head)."""
    ops = _backends.row_kernels(backend, "logprobs")
    V = weight.shape[0]
    rows = _kept_rows(labels, ignore_index)
    pick = (lambda t: t) if rows is None else (lambda t: None if t is None else t.index_select(0, rows))
    shard = None if group is None else VocabShard(labels, V, ignore_index, group)
    y = pick(labels if shard is None else shard.labels)
    held = None if shard is None else pick(shard.owned)  # the kept tokens whose label this rank holds
    gl, gh = pick(_f32(grad_logp)), pick(_f32(grad_entropy))
    lse = pick(lse)
    ent = pick(entropy) if gh is not None else None
    h = pick(hidden)
    n = h.shape[0]
    width = slice_width(n, V, chunk or auto_chunk_size(n, V, hidden))
    grads = SliceGrads(h, weight, bias, need, single=width == V)
    buf, gbuf = slice_buffers(n, width, hidden)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=LOCAL_IGNORE)
    for a in range(0, V, width):
        b = min(a + width, V)
        z = slice_logits(h, weight, bias, a, b, buf)
        inside = (y >= a) & (y < b) if held is None else held & (y >= a) & (y < b)
        # Column 0's raw logits, before the kernel may overwrite z with g; not needed when every label is inside.
        x0 = None if gl is None or (width == V and held is None) else first_column(z)
        g = take(gbuf, n, b - a)
        ops.row_backward(z, torch.where(inside, y - a, 0), lse, ent, gl, gh, g, **kw)
        if x0 is not None:
            fix_first_column(g, x0, ~inside, lse, ent, gl, gh, temperature=temperature, softcap=softcap)
        grads.add(g, a, b)
    result = grads.result(hidden, rows)
    if shard is not None and result[0] is not None:
        dist.all_reduce(result[0], group=group)
    return result


class LinearLogprobsFunction(torch.autograd.Function):
    """Forward keeps only lse (and entropy) per token; backward recomputes the logits a vocabulary slice at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, softcap, ignore_index, with_entropy, chunk_size,
                backend, group):
        logp, lse, entropy, chunk = linear_forward(hidden, weight, bias, labels, temperature, softcap, ignore_index,
                                                   with_entropy, chunk_size, backend, group)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = temperature, softcap, ignore_index, chunk, backend, group
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        grads = linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
                                ctx.needs_input_grad[:3], *ctx.args)
        return *grads, *[None] * 8


def _kept_rows(labels, ignore_index):
    """Indices of the non-ignored tokens, or None when none is ignored.

    Skipping ignored tokens (prompt and padding in preference data) saves their share of every matmul.
    """
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def linear_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                    return_entropy=False, chunk_size=None, backend="auto", process_group=None):
    """Per-token log-probs (and entropy) of ``labels`` under ``softmax(head(hidden))``, never holding [N, V].

    logits = softcap(hidden @ weight.T + bias) / temperature, where softcap(x) = c * tanh(x / c) (Gemma-style,
    applied to the raw logits before the temperature, as the model does before sampling).

    Args:
        hidden: [..., H] float32/bfloat16/float16 last hidden states.
        weight: [V, H] output head (same dtype as ``hidden``); ``bias``: optional [V].
        labels: [...] (the leading dims of ``hidden``), in [0, V) or ``ignore_index``.
        chunk_size: token rows per chunk; default chosen from V and the device's (free) memory, see
            ``auto_chunk_size``. Peak extra memory is O(chunk_size * V + N * H).
        backend: "auto", "triton", "cpu" or "torch" for the row kernel run on each chunk.
        process_group: vocabulary parallelism (Megatron layout, as in ``token_logprobs``): ``weight`` [V_local, H]
            (and ``bias``) hold this rank's vocabulary rows, ``hidden`` and ``labels`` (global ids) are the same on
            every rank. The results are the full-vocabulary ones; the hidden gradient is summed over the group
            (one all-reduce in the backward), the weight and bias gradients are this rank's rows.

    ``weight`` (and ``bias``) may be sharded parameters (``fastpref.ops._sharded.gathered``): an FSDP2 DTensor
    is gathered for the call and its gradient reduce-scattered back to the shards (averaged over the mesh, as
    FSDP2 does); a DeepSpeed ZeRO-3 parameter is gathered when it needs no gradient.

    The forward keeps only the log-sum-exp (and entropy) per token, a chunk of tokens at a time; the backward
    recomputes the logits a slice of the vocabulary at a time for all tokens (4 matmuls in all against 3 for
    the naive path, in exchange for the memory). Ignored tokens are dropped before any matmul. Gradients flow
    to hidden, weight and bias: each slice's weight and bias gradient comes from one matmul (fp32 accumulation
    inside it) and is written once in their dtype, so no fp32 [V, H] buffer is needed; the hidden gradient is
    summed over the slices in fp32.
    """
    weight, bias = gathered("weight", weight), gathered("bias", bias)
    check_float("hidden", hidden, min_dim=1)
    check_float("weight", weight, dim=2)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, {H}] to match hidden [..., {H}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if bias is not None:
        check_float("bias", bias, dim=1)
        if bias.shape[0] != V:
            raise ValueError(f"bias must have shape [{V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    ranks = 1 if process_group is None else group_size(process_group)
    check_labels(labels, hidden.shape[:-1], V * ranks, ignore_index)
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    check_chunk_size(chunk_size)
    name = resolve(backend, hidden.device, "logprobs")
    args = (hidden.reshape(-1, H), weight, bias, labels.reshape(-1), float(temperature), float(softcap or 0.0),
            int(ignore_index), bool(return_entropy), chunk_size, name)
    if compiling() and process_group is None:
        from fastpref.ops import _library

        out = _library.linear_logprobs(*args)
    else:
        out = LinearLogprobsFunction.apply(*args, process_group)
    if return_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)

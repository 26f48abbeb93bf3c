"""Vocabulary-parallel row statistics: ``process_group=`` on token_logprobs, linear_logprobs and token_divergence.

Megatron layout: on a group of P ranks, rank r holds the logits (or head rows) of vocabulary ids
[r * V_local, (r + 1) * V_local); labels are global ids, the same on every rank (as are the hidden states of
linear_logprobs). Each rank runs the row kernels on its shard, then the per-row statistics are combined:
one MAX and one SUM all-reduce of [n]-sized vectors in the forward (token_divergence: one more SUM, of its
sums), none for the logits' gradient, which depends on the global statistics only (linear_logprobs sums its
hidden-state gradient over the group).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastpref.divergences import BY_KERNEL_ID
from fastpref.kernels.reference import _log_probs, _rows_per_step, _scaled

# The label value the shard's kernels treat as ignored: never a local column, whatever the caller's ignore_index.
LOCAL_IGNORE = -1


def group_size(group) -> int:
    """The number of ranks of ``process_group``, validated."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group= needs torch.distributed initialized (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.get_world_size(group)


def max_reduce(t, local_vocab, group):
    """``t`` all-reduced with MAX over ``group``; the same collective checks that every rank holds ``local_vocab``
    ids (the Megatron layout puts rank r's first id at r * V_local), so that every rank raises, none hangs."""
    flat = torch.cat([t.reshape(-1).float(), t.new_tensor([local_vocab, -local_vocab], dtype=torch.float32)])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = int(flat[-2]), -int(flat[-1])
    if largest != smallest:
        raise ValueError(f"process_group= needs vocabulary shards of equal size on every rank; the ranks hold "
                         f"{smallest} to {largest} ids (pad the vocabulary to a multiple of the group size)")
    return flat[:-2].view(t.shape)


class VocabShard:
    """This rank's share of a vocabulary-parallel call on labels [n] (global ids).

    ``labels``: the local labels for the kernels. A row whose label another rank holds gets local column 0, so
    that the kernel still computes the row's statistics (it skips ignored rows); ``fix_first_column`` removes
    that column's one-hot from the gradient. ``keep``: rows not ignored; ``owned``: rows whose label is here.
    """

    def __init__(self, labels, local_vocab, ignore_index, group):
        self.group, self.local_vocab = group, local_vocab
        start = dist.get_rank(group) * local_vocab
        self.keep = labels != ignore_index
        self.owned = self.keep & (labels >= start) & (labels < start + local_vocab)
        self.labels = torch.where(self.owned, labels - start, torch.where(self.keep, 0, LOCAL_IGNORE))

    def combine(self, logp, lse, entropy):
        """Global (logp, lse, entropy) from this shard's kernel outputs (entropy may be None).

        With w_r = exp(lse_r - lse) the probability mass of shard r: lse = log sum_r exp(lse_r),
        H = sum_r w_r (H_r - log w_r) (no cancellation for large logits, unlike lse - sum p z), and the label's
        logit z_y = logp_r + lse_r comes from the rank that holds it.
        """
        m = max_reduce(lse, self.local_vocab, self.group)
        e = torch.exp(lse - m)
        parts = [e, torch.where(self.owned, logp + lse, 0.0)]
        if entropy is not None:
            parts.append(e * (entropy - (lse - m)))
        sums = torch.stack(parts)
        dist.all_reduce(sums, group=self.group)
        log_s = torch.log(sums[0])
        lse = m + log_s
        out_entropy = None if entropy is None else torch.where(self.keep, sums[2] / sums[0] + log_s, 0.0)
        return torch.where(self.keep, sums[1] - lse, 0.0), torch.where(self.keep, lse, 0.0), out_entropy


def first_column(x):
    """A copy of column 0 of logit rows [n, V] in fp32, taken before a backward kernel overwrites it
    (``fix_first_column``)."""
    return x[:, 0].to(torch.float32, copy=True)


def fix_first_column(out, x0, fix, lse, entropy, grad_logp, grad_entropy, *, temperature, softcap):
    """Rewrites column 0 of the logit gradient ``out`` [n, V_local] on the rows ``fix`` (kept, label held by
    another rank) without the one-hot the kernel added there: dL/dz_0 = -g_logp p_0 - g_H p_0 (z_0 - mu).
    ``x0``: the raw logits of column 0 (``first_column``); lse and entropy are the global ones."""
    if grad_logp is None:
        return
    z0 = _scaled(x0, temperature, softcap)
    p0 = torch.exp(z0 - lse)
    dz = -grad_logp * p0
    if grad_entropy is not None and entropy is not None:
        dz = dz - grad_entropy * p0 * (z0 - (lse - entropy))
    dx = dz / temperature
    if softcap > 0:
        dx = dx * (1.0 - torch.tanh(x0 / softcap) ** 2)
    out[:, 0] = torch.where(fix, dx.to(out.dtype), out[:, 0])


def div_forward(ops, x, xr, labels, group, *, div_id, param, temperature, ignore_index):
    """``div_forward``'s contract on a vocabulary shard: (value, lse, lse_r, s_a, s_b) of the full vocabulary.

    The log-sum-exps come from this rank's kernel and are combined over the group; the sums of the divergence
    terms then run in PyTorch with the global normalizers (the kernels normalize within their shard, which no
    per-row correction undoes for a general f) and are summed over the group. ``div_backward`` with these
    statistics gives each shard's gradient as is.
    """
    n = x.shape[0]
    _, lse_local, lse_r_local, _, _ = ops.div_forward(x, xr, labels, div_id=div_id, param=param,
                                                      temperature=temperature, ignore_index=ignore_index)
    lse2 = torch.stack([lse_local, lse_r_local])
    m = max_reduce(lse2, x.shape[1], group)
    s = torch.exp(lse2 - m)
    dist.all_reduce(s, group=group)
    lse, lse_r = m + torch.log(s)
    terms = BY_KERNEL_ID[div_id].terms
    sums = torch.zeros(3, n, dtype=torch.float32, device=x.device)
    step = _rows_per_step(n, x.shape[1])
    for a in range(0, n, step):
        b = min(n, a + step)
        lp = _log_probs(_scaled(x[a:b], temperature, 0.0), lse[a:b])
        lq = _log_probs(_scaled(xr[a:b], temperature, 0.0), lse_r[a:b])
        sums[:, a:b] = torch.stack([t.sum(-1) for t in terms(lp, lq, param)])
    dist.all_reduce(sums, group=group)
    keep = torch.ones(n, dtype=torch.bool, device=x.device) if labels is None else labels != ignore_index
    value, s_a, s_b = (torch.where(keep, t, 0.0) for t in sums)
    return value, torch.where(keep, lse, 0.0), torch.where(keep, lse_r, 0.0), s_a, s_b

"""Float64 formulas the tests compare every backend against (independent of fastpref's own code)."""
import torch


def logprobs_f64(logits, labels, *, ignore_index=-100, temperature=1.0, softcap=None):
    """(logp, entropy) in float64 by autograd-able torch ops over the full logits."""
    z = logits.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lsm = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    lp = lsm.gather(-1, torch.where(keep, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero)


def _f(name, u, param):
    """Generators as DESIGN.md writes them (u = p / q)."""
    if name == "reverse_kl":
        return u * torch.log(u)
    if name == "forward_kl":
        return -torch.log(u)
    if name == "js":
        b = param
        return b * u * torch.log(u) - (b * u + 1 - b) * torch.log(b * u + 1 - b)
    if name == "alpha":
        a = param
        return (u**a - a * u - (1 - a)) / (a * (a - 1))
    if name == "tv":
        return (u - 1).abs() / 2
    if name == "hellinger":
        return (u.sqrt() - 1) ** 2
    raise KeyError(name)


def divergence_f64(logits, ref_logits, name, param=None, *, temperature=1.0, labels=None, ignore_index=-100):
    """sum_v q_v f(p_v / q_v) in float64, differentiable in both inputs."""
    p = torch.softmax(logits.double() / temperature, -1)
    q = torch.softmax(ref_logits.double() / temperature, -1)
    d = (q * _f(name, p / q, param)).sum(-1)
    if labels is not None:
        d = torch.where(labels != ignore_index, d, torch.zeros((), dtype=d.dtype))
    return d

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
    lp = lsm.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    return torch.where(keep, lp, zero), torch.where(keep, ent, zero)

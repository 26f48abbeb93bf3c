"""kl_estimate: sampled per-token KL estimators for y ~ pi (elementwise; autograd through torch ops)."""
from __future__ import annotations

import torch

from fastpref import divergences

_BASE = ("k1", "k2", "k3", "low_var_kl")
# "+" = straight-through: the named estimator's value, k2's gradient (verl's convention).
ESTIMATORS = _BASE + tuple(f"{k}+" for k in _BASE if k != "k2")


def _estimate(r: torch.Tensor, name: str) -> torch.Tensor:
    if name == "k1":
        return -r
    if name == "k2":
        return 0.5 * r * r
    if name == "k3":
        return torch.expm1(r) - r
    r = r.clamp(-20.0, 20.0)
    return (torch.expm1(r) - r).clamp(-10.0, 10.0)


def _check_pair(logp, ref_logp):
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    if logp.device != ref_logp.device:
        raise ValueError(f"ref_logp is on {ref_logp.device} but logp is on {logp.device}")


def kl_estimate(logp, ref_logp, *, estimator="k3"):
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of sampled tokens, r = ref_logp - logp.

    ``k1 = -r`` (unbiased, high variance), ``k2 = r^2 / 2``, ``k3 = exp(r) - 1 - r`` (unbiased, >= 0),
    ``low_var_kl`` = k3 with r clamped to [-20, 20] and the result to [-10, 10] (verl). A ``+`` suffix
    (``k1+``, ``k3+``, ``low_var_kl+``) gives that estimator's value with the gradient of k2, whose
    gradient is the unbiased gradient of the KL for on-policy samples. Gradients flow to both inputs.
    """
    _check_pair(logp, ref_logp)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    r = ref_logp.float() - logp.float()
    if estimator.endswith("+"):
        k2 = _estimate(r, "k2")
        return k2 + (_estimate(r, estimator[:-1]) - k2).detach()
    return _estimate(r, estimator)


def generator_penalty(logp, ref_logp, *, divergence="forward_kl", log_ratio_clamp=20.0, **params):
    """Per-token sampled estimate of D_f(pi || pi_0) at tokens drawn from the initial policy pi_0 (DPH-RL's
    generator form): ``f(u) - f'(1) (u - 1)``, u = pi / pi_0 = exp(clamp(logp - ref_logp)).

    Since E_{y ~ pi_0}[f(u)] = D_f(pi || pi_0) and E_{y ~ pi_0}[u - 1] = 0, the affine term changes no
    expectation; it makes the estimate >= 0 with a minimum at u = 1 (forward_kl gives u - 1 - log u, the
    k3 form of KL(pi_0 || pi)). ``divergence`` is any ``fastpref.divergences`` entry (forward_kl, js,
    alpha, ...; params ``js_beta`` / ``alpha``). ``log_ratio_clamp`` bounds |log u| (our default 20, as
    low_var_kl's clamp) so that one rare token cannot overflow u. Gradient flows to ``logp``
    (``ref_logp`` is treated as a constant unless it requires grad).
    """
    _check_pair(logp, ref_logp)
    if not isinstance(log_ratio_clamp, (int, float)) or not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be a number > 0, got {log_ratio_clamp!r}")
    d, param = divergences.get(divergence, params)
    u = torch.exp((logp.float() - ref_logp.float()).clamp(-log_ratio_clamp, log_ratio_clamp))
    one = torch.ones((), dtype=torch.float32, device=u.device)
    return d.f(u, param) - d.f_prime(one, param) * (u - 1)

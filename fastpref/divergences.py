"""The f-divergence registry: one source of truth for every op that takes ``divergence=``.

D_f(pi || pi_ref) = sum_v q_v f(p_v / q_v), u = p / q, with p = pi (policy), q = pi_ref (reference).

For each divergence the registry holds:
- ``f`` and ``f_prime``: the generator and its derivative in u (documentation and DPO scores);
- ``terms(lp, lq, param)``: the per-element quantities every kernel computes, in log space so that
  nothing overflows: ``qf = q f(u)`` (summed: the value), ``pa = p f'(u)`` and ``qb = q (f(u) - u f'(u))``.
  The gradients follow from them (D depends on z through p and on z_ref through q):
      dD/dz_k = pa_k - p_k * sum_v pa_v,      dD/dz_ref_k = qb_k - q_k * sum_v qb_v;
- ``score(rho, param)``: the f-DPO score g(rho), rho = log pi - log pi_ref (None where f-DPO has none);
- ``kernel_id``: the integer the Triton and C++ kernels switch on;
- its parameter name, default and open range.

Adding a divergence: a new entry here and one branch per kernel (``DIV_*`` in the kernel files).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Divergence:
    name: str
    kernel_id: int
    f: Callable
    f_prime: Callable
    terms: Callable
    score: Optional[Callable] = None
    param: Optional[str] = None
    default: float = 0.0
    doc: str = ""


def _rkl_terms(lp, lq, _):
    p = lp.exp()
    return p * (lp - lq), p * (lp - lq + 1), -p


def _fkl_terms(lp, lq, _):
    q = lq.exp()
    return q * (lq - lp), -q, q * (lq - lp + 1)


def _js_terms(lp, lq, beta):
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return (beta * p * (lp - lm) + (1 - beta) * q * (lq - lm), beta * p * (lp - lm), -(1 - beta) * q * (lm - lq))


def _alpha_terms(lp, lq, a):
    # w = p^a q^(1-a) <= max(p, q): bounded, unlike u^a.
    p, q, w = lp.exp(), lq.exp(), (a * lp + (1 - a) * lq).exp()
    return (w - a * p - (1 - a) * q) / (a * (a - 1)), (w - p) / (a - 1), -(w - q) / a


def _tv_terms(lp, lq, _):
    p, q = lp.exp(), lq.exp()
    s = torch.sign(p - q)  # subgradient: 0 where p == q
    return (p - q).abs() / 2, p * s / 2, -q * s / 2


def _hellinger_terms(lp, lq, _):
    p, q, g = lp.exp(), lq.exp(), ((lp + lq) / 2).exp()
    return p + q - 2 * g, p - g, q - g


REGISTRY: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("reverse_kl", 0, lambda u, _=None: u * torch.log(u), lambda u, _=None: torch.log(u) + 1,
                   _rkl_terms, score=lambda rho, _=None: rho, doc="KL(pi || pi_ref), mode-seeking"),
        Divergence("forward_kl", 1, lambda u, _=None: -torch.log(u), lambda u, _=None: -1 / u, _fkl_terms,
                   score=lambda rho, _=None: -torch.exp(-rho), doc="KL(pi_ref || pi), mass-covering"),
        Divergence("js", 2,
                   lambda u, b: b * u * torch.log(u) - (b * u + 1 - b) * torch.log(b * u + 1 - b),
                   lambda u, b: b * (torch.log(u) - torch.log(b * u + 1 - b)), _js_terms,
                   # f-DPO drops constants; for beta = 0.5 this is log sigmoid(rho).
                   score=lambda rho, b: torch.nn.functional.logsigmoid(rho + math.log(b / (1 - b))),
                   param="beta", default=0.5,
                   doc="beta KL(pi || m) + (1 - beta) KL(pi_ref || m), m = beta pi + (1 - beta) pi_ref"),
        Divergence("alpha", 3, lambda u, a: (u**a - a * u - (1 - a)) / (a * (a - 1)),
                   lambda u, a: (u ** (a - 1) - 1) / (a - 1), _alpha_terms,
                   score=lambda rho, a: torch.exp((a - 1) * rho) / (a - 1), param="alpha", default=0.5,
                   doc="alpha-divergence (TRL's convention): alpha -> 1 reverse KL, alpha -> 0 forward KL"),
        Divergence("tv", 4, lambda u, _=None: (u - 1).abs() / 2, lambda u, _=None: torch.sign(u - 1) / 2,
                   _tv_terms, doc="total variation sum |pi - pi_ref| / 2; its gradient is a subgradient "
                                  "(sign(0) = 0 where pi == pi_ref)"),
        Divergence("hellinger", 5, lambda u, _=None: (u.sqrt() - 1) ** 2, lambda u, _=None: 1 - u.rsqrt(),
                   _hellinger_terms, doc="squared Hellinger sum (sqrt pi - sqrt pi_ref)^2 (no 1/2 factor)"),
    )
}


# Parameter names the losses document for a divergence whose own name there means something else (their
# ``beta`` is DPO's temperature or PPO's KL weight): js_beta is js's beta.
ALIASES = {"js_beta": "beta"}


def get(name: str, params: dict) -> tuple[Divergence, float]:
    """The registry entry and its (validated) parameter value; unknown names or parameters raise."""
    clash = [a for a, p in ALIASES.items() if a in params and p in params]
    if clash:
        raise TypeError(f"got both {clash[0]!r} and {ALIASES[clash[0]]!r}: they name one parameter")
    given = {ALIASES.get(k, k): k for k in params}  # canonical name -> the caller's
    params = {ALIASES.get(k, k): v for k, v in params.items()}
    if name not in REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(REGISTRY)}")
    d = REGISTRY[name]
    extra = {given[k] for k in params if k != d.param}
    if extra:
        allowed = f"its parameter is {d.param!r}" if d.param else "it takes no parameter"
        raise TypeError(f"divergence {name!r} got unexpected parameter(s) {sorted(extra)}; {allowed}")
    if d.param is None:
        return d, 0.0
    value = params.get(d.param, d.default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise ValueError(f"{d.param} must be in the open interval (0, 1) for divergence {name!r}, got {value!r}")
    return d, float(value)

BY_KERNEL_ID = {d.kernel_id: d for d in REGISTRY.values()}

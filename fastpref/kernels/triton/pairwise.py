"""Triton twin of ``kernels/reference.py``'s ``pair_forward`` (contract: that module): the pairwise
preference losses over [B] vectors, each pair's loss and both its derivatives in one launch.

One program per ``BLOCK`` pairs loads the policy log-probs (chosen, rejected), the reference log-probs and
the completion lengths where the loss type uses them, and writes loss[B], d loss/d chosen[B] and
d loss/d rejected[B], all fp32 (inputs fp32/bf16/fp16). The autograd wrapper in ``ops/preference.py``
saves the two derivative vectors and its backward only scales them by the upstream gradient.

Covered (``fastpref.ops.preference.PAIRWISE_TYPES``; the loss type's index there is ``LOSS``): every type
whose per-pair loss depends on that pair alone. aot / aot_unpaired (which sort the batch) and orpo (whose
NLL term is a token mean over the whole batch) stay on the torch path.

Math, with rho = logp - ref_logp (the log-probs themselves for simpo and bt), s = g(rho) the divergence's
f-DPO score (``DIV``: reverse_kl g = rho, forward_kl -exp(-rho), js log sig(rho + log(b / (1 - b))), alpha
exp((a - 1) rho) / (a - 1)) and g' its derivative (1, exp(-rho), sig(-(rho + log(b / (1 - b)))),
exp((a - 1) rho)):
- the types that are a function f of one scalar z = c (s_w / n_w - s_l / n_l) - offset (c = beta, except
  1 for ipo and bt; n the completion length for ipo, sigmoid_norm and simpo, else 1; offset gamma for
  simpo, 1 / (2 beta) for ipo, the margin for bt, else 0) give
  d loss/d logp_w = f'(z) c g'(rho_w) / n_w and d loss/d logp_l = -f'(z) c g'(rho_l) / n_l, with
  f'(z): sigmoid / simpo / bt / sigmoid_norm ``eps sig(z) - (1 - eps) sig(-z)`` (eps = 0 for the last
  two), hinge ``-[z < 1]``,
  ipo ``2 z``, robust ``-((1 - eps) sig(-z) + eps sig(z)) / (1 - 2 eps)``, exo_pair
  ``sig(z) sig(-z) (z - log((1 - eps) / eps))``, discopop (t = 1 / tau, m = sig(t z))
  ``-sig(-z) (1 - m) + t log sig(z) m (1 - m) + exp(-z) m (t (1 - m) - 1)``; bt adds
  ``center_coef (r_w + r_l)^2`` (derivative ``2 center_coef (r_w + r_l)`` to both);
- the log-ratio types (a = beta rho_w, b = beta rho_l) differentiate term by term: nca_pair
  ``beta (sig(a) / 2 - sig(-a))``, ``beta sig(b) / 2``; bco_pair ``-beta sig(-a)``, ``beta sig(b)``;
  sppo_hard ``2 (rho_w - 1 / (2 beta))``, ``2 (rho_l + 1 / (2 beta))``; apo_zero ``-beta sig(a) sig(-a)``,
  ``beta sig(b) sig(-b)``; apo_down (d = a - b) ``beta (sig(a) sig(-a) - sig(d) sig(-d))``,
  ``beta sig(d) sig(-d)``.

Every sigmoid and log-sigmoid comes from e = exp(-|x|) in (0, 1] (``_sigmoids``), so nothing overflows
whatever the log-ratio, and log sig(x) = min(x, 0) - log1p(e) keeps its relative precision for large x;
discopop's exp(-z) sig(z / tau) is exp(-z + log sig(z / tau)), finite where exp(-z) alone would overflow.
Every exp is ``_exp`` (a few ulp for any argument, where a GPU's tl.exp loses |x| 2^-24) and every division
is correctly rounded (``div_rn``, not a GPU's 2-ulp div.full): a batch of pairs is small, so accuracy
costs nothing measurable here.
The exponential scores (forward_kl, alpha) exceed fp32 for rho below about -88 / (1 - alpha), and such a
pair's loss or gradients are inf or NaN, as on the torch path; where a factor that vanishes faster meets
such an infinite score (sig(-z) = 0, hinge's flat side, eps = 0), the product is its limit 0 (``_times``).

``launch_configs()`` lists every compiled variant the launcher can ask for (see ``_aot.py``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastpref.divergences import REGISTRY
from fastpref.ops.preference import PAIRWISE_TYPES

DIV_REVERSE_KL: tl.constexpr = tl.constexpr(REGISTRY["reverse_kl"].kernel_id)
DIV_FORWARD_KL: tl.constexpr = tl.constexpr(REGISTRY["forward_kl"].kernel_id)
DIV_JS: tl.constexpr = tl.constexpr(REGISTRY["js"].kernel_id)
DIV_ALPHA: tl.constexpr = tl.constexpr(REGISTRY["alpha"].kernel_id)
_SCORE_DIVS = tuple(REGISTRY[n].kernel_id for n in ("reverse_kl", "forward_kl", "js", "alpha"))

SIGMOID: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("sigmoid"))
HINGE: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("hinge"))
IPO: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("ipo"))
ROBUST: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("robust"))
EXO_PAIR: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("exo_pair"))
DISCOPOP: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("discopop"))
SIGMOID_NORM: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("sigmoid_norm"))
NCA_PAIR: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("nca_pair"))
BCO_PAIR: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("bco_pair"))
SPPO_HARD: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("sppo_hard"))
APO_ZERO: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("apo_zero"))
APO_DOWN: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("apo_down"))
SIMPO: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("simpo"))
BT: tl.constexpr = tl.constexpr(PAIRWISE_TYPES.index("bt"))
# Types defined by a divergence score (any DIV); the others take the log-ratios (or log-probs) as they are.
_SCORE_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm")
_RATIO_LOSSES = ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down")

# 8 pairs per thread: whole 16-byte chunks for every input dtype, so 16-divisible B keeps 128-bit loads
# and stores (the JIT specializes B on divisibility by 16). One configuration: a batch of pairs is small,
# and every entry here would multiply the AOT check's variants.
BLOCK = 1024
NUM_WARPS = 4

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1], to full relative precision: log(u) * e / (u - 1) with u = 1 + e
    cancels the rounding of u (Goldberg); e itself where u rounds to 1."""
    u = 1.0 + e
    d = u - 1.0
    tiny = d == 0.0
    return tl.where(tiny, e, tl.log(u) * tl.math.div_rn(e, tl.where(tiny, 1.0, d)))


@triton.jit
def _exp(x):
    """exp(x) to a few ulp for any x. On a GPU tl.exp is ex2.approx(x log2 e) with x log2 e rounded to fp32
    first; that rounding alone is |x| 2^-24 of relative error (CUDA documents __expf at 2 + 1.17 |x|
    ulp), and the exponential scores (forward_kl, alpha) and the sigmoids feed it, scaled by the score,
    into z. Cody-Waite: x = n ln 2 + r with n an integer (n ln2_hi exact: ln2_hi has 9 trailing zero
    bits) and |r| <= ln 2 / 2, so the approximate exp only sees r; 2^n in two halves keeps exp(x) finite
    up to fp32's maximum and gradual below its minimum. |x| is clamped at 110 first (where exp is inf or
    0 either way) so that n stays finite; NaN passes through."""
    xc = tl.minimum(tl.maximum(x, -110.0, propagate_nan=tl.PropagateNan.ALL), 110.0,
                    propagate_nan=tl.PropagateNan.ALL)
    n = tl.floor(xc * 1.4426950408889634 + 0.5)
    r = (xc - n * 0.693359375) + n * 2.12194440e-4
    n1 = tl.floor(n * 0.5)
    return tl.exp2(n1) * (tl.exp2(n - n1) * tl.exp(r))


@triton.jit
def _sigmoids(x):
    """(sig(x), sig(-x), log sig(x), log sig(-x)) from one exp of -|x| (in (0, 1]: no overflow) and one log."""
    e = _exp(-tl.abs(x))
    # Correctly rounded: a GPU's fp32 "/" is div.full (2 ulp), and differences of sigmoid products
    # (apo_down's gradient) show it.
    r = tl.math.div_rn(1.0, 1.0 + e)
    pos = x >= 0.0
    l1p = _log1p(e)
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r), tl.minimum(x, 0.0) - l1p, tl.minimum(-x, 0.0) - l1p


@triton.jit
def _times(a, b):
    """a * b, with 0 where a is 0: the limit wherever an infinite b (a score or log-sigmoid beyond fp32,
    as exp(-rho) for rho < -88) meets a factor that vanishes faster (sig(-z), or eps = 0)."""
    return tl.where(a == 0.0, 0.0, a * b)


@triton.jit
def _score(rho, g0, g1, DIV: tl.constexpr):
    """(g(rho), g'(rho)): the f-DPO score of ``fastpref.divergences`` and its derivative. g0, g1 are
    ``_coefficients()``'s: js log(b / (1 - b)); alpha a - 1 and 1 / (a - 1). For alpha the score comes back
    without its factor g1 (= g'(rho) then): the caller scales the difference of two scores, because
    g1 * e_w - g1 * e_l compiles to an FMA on a GPU that leaves the rounding error of g1 * e_l, as large as
    1e11 for scores of 1e18, where equal log-ratios must give exactly 0."""
    if DIV == DIV_REVERSE_KL:
        s = rho
        ds = tl.full(rho.shape, 1.0, tl.float32)
    elif DIV == DIV_FORWARD_KL:
        ds = _exp(-rho)
        s = -ds
    elif DIV == DIV_JS:
        _, ds, s, _ = _sigmoids(rho + g0)
    else:
        tl.static_assert(DIV == DIV_ALPHA)
        ds = _exp(g0 * rho)
        s = ds
    return s, ds


@triton.jit
def _of_z(z, eps, c0, c1, LOSS: tl.constexpr):
    """(f(z), f'(z)) of the single-margin loss types; c0, c1 are ``_coefficients()``'s (robust
    1 / (1 - 2 eps); exo_pair log(1 - eps), log(eps); discopop 1 / tau)."""
    sp, sn, lsp, lsn = _sigmoids(z)
    if LOSS == HINGE:
        f = tl.maximum(1.0 - z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        df = tl.where(z < 1.0, -1.0, 0.0)
    elif LOSS == IPO:
        f = z * z
        df = 2.0 * z
    elif LOSS == ROBUST:
        f = ((1.0 - eps) * -lsp + _times(eps, lsn)) * c0
        df = -((1.0 - eps) * sn + eps * sp) * c0
    elif LOSS == EXO_PAIR:
        # sig(z) (log sig(z) - log(1 - eps)) + sig(-z) (log sig(-z) - log eps); its derivative collapses
        # because log sig(z) - log sig(-z) = z.
        f = _times(sp, lsp - c0) + _times(sn, lsn - c1)
        df = _times(sp * sn, z - (c0 - c1))
    elif LOSS == DISCOPOP:
        mp, mn, lmp, _ = _sigmoids(z * c0)
        decay = _exp(lmp - z)  # exp(-z) sig(z / tau)
        f = -lsp * mn + decay
        df = -sn * mn + c0 * lsp * mp * mn + decay * (c0 * mn - 1.0)
    else:
        tl.static_assert((LOSS == SIGMOID) or (LOSS == SIGMOID_NORM) or (LOSS == SIMPO) or (LOSS == BT))
        # eps-smoothed -log sig(z) (eps = 0 for sigmoid_norm and bt).
        f = -(1.0 - eps) * lsp - _times(eps, lsn)
        df = eps * sp - (1.0 - eps) * sn
    return f, df


@triton.jit
def _pairwise_kernel(
    cw_ptr, cl_ptr, rw_ptr, rl_ptr, nw_ptr, nl_ptr, margin_ptr, loss_ptr, gw_ptr, gl_ptr,
    B, beta, eps, offset, c0, c1, g0, g1,
    LOSS: tl.constexpr, DIV: tl.constexpr, HAS_MARGIN: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    cw = tl.load(cw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cl = tl.load(cl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rho_w = cw
    rho_l = cl
    if (LOSS != SIMPO) and (LOSS != BT):
        rho_w = cw - tl.load(rw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rho_l = cl - tl.load(rl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if (LOSS >= NCA_PAIR) and (LOSS <= APO_DOWN):
        tl.static_assert((NCA_PAIR + 4 == APO_DOWN) and (DIV == DIV_REVERSE_KL))
        a = beta * rho_w
        b = beta * rho_l
        spa, sna, lspa, lsna = _sigmoids(a)
        spb, snb, lspb, lsnb = _sigmoids(b)
        if LOSS == NCA_PAIR:
            loss = -lspa - 0.5 * lsna - 0.5 * lsnb
            gw = beta * (0.5 * spa - sna)
            gl = (0.5 * beta) * spb
        elif LOSS == BCO_PAIR:
            loss = -lspa - lsnb
            gw = -beta * sna
            gl = beta * spb
        elif LOSS == SPPO_HARD:
            dw = rho_w - offset
            dl = rho_l + offset
            loss = dw * dw + dl * dl
            gw = 2.0 * dw
            gl = 2.0 * dl
        elif LOSS == APO_ZERO:
            loss = 1.0 - spa + spb
            gw = -beta * spa * sna
            gl = beta * spb * snb
        else:
            tl.static_assert(LOSS == APO_DOWN)
            spd, snd, _, _ = _sigmoids(a - b)
            loss = spa + 1.0 - spd
            gl = beta * spd * snd
            gw = beta * spa * sna - gl
    else:
        s_w, ds_w = _score(rho_w, g0, g1, DIV)
        s_l, ds_l = _score(rho_l, g0, g1, DIV)
        if (LOSS == IPO) or (LOSS == SIGMOID_NORM) or (LOSS == SIMPO):
            # Lengths arrive as fp32 counts, clamped to >= 1 by the caller.
            nw = tl.load(nw_ptr + offs, mask=mask, other=1.0)
            nl = tl.load(nl_ptr + offs, mask=mask, other=1.0)
            s_w = tl.math.div_rn(s_w, nw)
            s_l = tl.math.div_rn(s_l, nl)
            ds_w = tl.math.div_rn(ds_w, nw)
            ds_l = tl.math.div_rn(ds_l, nl)
        scale = beta
        if (LOSS == IPO) or (LOSS == BT):
            scale = 1.0
        score_scale = scale
        if DIV == DIV_ALPHA:
            score_scale = scale * g1
        z = score_scale * (s_w - s_l)
        if HAS_MARGIN:
            z -= tl.load(margin_ptr + offs, mask=mask, other=0.0)
        else:
            z -= offset
        loss, df = _of_z(z, eps, c0, c1, LOSS)
        gw = _times(df * scale, ds_w)
        gl = -_times(df * scale, ds_l)
        if LOSS == BT:
            # Reward centering (c0 = center_coef).
            t = cw + cl
            loss += c0 * t * t
            gw += (2.0 * c0) * t
            gl += (2.0 * c0) * t
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(gw_ptr + offs, gw, mask=mask)
    tl.store(gl_ptr + offs, gl, mask=mask)


def _coefficients(loss_type, *, beta, label_smoothing, div_id, param, gamma, tau, margin, center_coef):
    """The kernel's scalars (eps, offset, c0, c1, g0, g1), from the options in double."""
    eps = label_smoothing if loss_type in ("sigmoid", "robust", "exo_pair", "simpo") else 0.0
    offset = {"simpo": gamma, "ipo": 1 / (2 * beta), "sppo_hard": 0.5 / beta}.get(loss_type, 0.0)
    if loss_type == "bt" and margin is not None and not isinstance(margin, torch.Tensor):
        offset = margin
    c0 = c1 = g0 = g1 = 0.0
    if loss_type == "robust":
        c0 = 1 / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        c0, c1 = math.log1p(-eps), math.log(eps)
    elif loss_type == "discopop":
        c0 = 1 / tau
    elif loss_type == "bt":
        c0 = center_coef
    if div_id == DIV_JS.value:
        g0 = math.log(param / (1 - param))
    elif div_id == DIV_ALPHA.value:
        g0, g1 = param - 1, 1 / (param - 1)
    return float(eps), float(offset), float(c0), float(c1), float(g0), float(g1)


def _pair_of(a, b):
    """a and b as one contiguous dtype the kernel takes (fp32 when they differ or are another dtype)."""
    dtype = a.dtype if a.dtype == b.dtype and a.dtype in _DTYPES else torch.float32
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def pair_forward(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_lengths=None, rejected_lengths=None,
                 margin=None, *, loss_type, beta=1.0, label_smoothing=0.0, div_id=0, param=0.0, gamma=0.5,
                 tau=0.05, center_coef=0.0):
    if loss_type not in PAIRWISE_TYPES:
        raise ValueError(f"loss_type {loss_type!r} has no pairwise kernel; covered: {', '.join(PAIRWISE_TYPES)}")
    if div_id not in _SCORE_DIVS or (div_id != DIV_REVERSE_KL.value and loss_type not in _SCORE_LOSSES):
        raise ValueError(f"divergence kernel id {div_id!r} is not valid for loss_type {loss_type!r}")
    if margin is not None and loss_type != "bt":
        raise ValueError(f"margin is bt's option, not {loss_type!r}'s")
    cw, cl = _pair_of(chosen, rejected)
    B = cw.shape[0]
    loss, gw, gl = (torch.empty(B, dtype=torch.float32, device=cw.device) for _ in range(3))
    if B == 0:
        return loss, gw, gl
    # Absent inputs' slots get a present tensor of the same role's dtype: a None would compile a variant.
    rw, rl = (cw, cl) if ref_chosen is None else _pair_of(ref_chosen, ref_rejected)
    nw, nl = (loss, loss) if chosen_lengths is None else (chosen_lengths.float().contiguous(),
                                                        rejected_lengths.float().contiguous())
    # A tensor margin (a 0-d one included: reading it on the host would synchronize) is loaded per pair.
    has_margin = isinstance(margin, torch.Tensor)
    margin_arg = torch.broadcast_to(margin.float(), (B,)).contiguous() if has_margin else loss
    scalars = _coefficients(loss_type, beta=beta, label_smoothing=label_smoothing, div_id=div_id, param=param,
                            gamma=gamma, tau=tau, margin=margin, center_coef=center_coef)
    _pairwise_kernel[(triton.cdiv(B, BLOCK),)](
        cw, cl, rw, rl, nw, nl, margin_arg, loss, gw, gl,
        B, float(beta), *scalars,
        LOSS=PAIRWISE_TYPES.index(loss_type), DIV=div_id, HAS_MARGIN=has_margin, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return loss, gw, gl


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launcher can launch.

    The policy pair and the reference pair each take one of fp32/bf16/fp16 (a reference-free type's
    reference slots hold the policy's), everything else is fp32: 9 variants per (loss type, divergence)
    with a reference, 3 without, 306 in all. B is 16-divisible (see ``BLOCK``), as the JIT specializes it.
    """
    dtypes = list(_DTYPES.values())
    configs = []
    for loss_id, loss_type in enumerate(PAIRWISE_TYPES):
        for div_id in _SCORE_DIVS if loss_type in _SCORE_LOSSES else (DIV_REVERSE_KL.value,):
            for has_margin in (False, True) if loss_type == "bt" else (False,):
                for x_ty in dtypes:
                    for r_ty in dtypes if loss_type not in ("simpo", "bt") else [x_ty]:
                        sig = {"cw_ptr": f"*{x_ty}", "cl_ptr": f"*{x_ty}", "rw_ptr": f"*{r_ty}", "rl_ptr": f"*{r_ty}",
                               "nw_ptr": "*fp32", "nl_ptr": "*fp32", "margin_ptr": "*fp32", "loss_ptr": "*fp32",
                               "gw_ptr": "*fp32", "gl_ptr": "*fp32", "B": "i32", "beta": "fp32", "eps": "fp32",
                               "offset": "fp32", "c0": "fp32", "c1": "fp32", "g0": "fp32", "g1": "fp32",
                               "LOSS": "constexpr", "DIV": "constexpr", "HAS_MARGIN": "constexpr",
                               "BLOCK": "constexpr"}
                        const = {"LOSS": loss_id, "DIV": div_id, "HAS_MARGIN": has_margin, "BLOCK": BLOCK}
                        configs.append((_pairwise_kernel, sig, const, NUM_WARPS))
    return configs

"""Variants of the CUDA row kernels side by side: each is built from a patched copy of csrc/ into its own
``_C_cuda`` module, swapped in for ``fastpref._C_cuda``, checked against the unpatched build's outputs and timed
as bare kernels (``fastpref.kernels.cuda``: no label check, no autograd), interleaved, with the unpatched
build timed first and last (the spread of the same code says what a difference between variants is worth).

    python benchmarks/cuda_variants.py [--variants base,load4,...] [--out FILE.json] [--build-only] [--apply-best]
    python benchmarks/cuda_variants.py --profile      # one launch of each bare forward, for ncu

A variant is a list of (file, old text, new text) replacements; each old text must occur exactly once, so
a variant that no longer applies fails loudly instead of timing the unpatched code. Builds need nvcc and
pybind11 (as setup.py does); ``--build-only`` also works without a GPU (it prints each kernel's registers).
The sizes and inputs are benchmarks/row_kernels.py's (bf16, 1 row in 7 ignored). ``--apply-best`` patches
this checkout's csrc/ with the variant that is clearly faster (FASTER below), so that a GPU call can go on to
build, test and time it; the choice and the timings go to --out.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.machinery
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's fastpref, and row_kernels

from fastpref.kernels._ptxas import ptxas_report  # noqa: E402

_FWD_BOUNDS = "__launch_bounds__(block_threads<NT>())\n    div_fwd_kernel"
# Overrides common_cuda.cuh's kLoadPacks in divergence_cuda.cu alone (it is included just before this line).
_DIV_INCLUDE = '#include "divergence_terms.h"\n'
VARIANTS = {
    "base": [],
    # 4 packs of each row loaded before use instead of 2: twice the bytes in flight per thread.
    "load4": [("common_cuda.cuh", "constexpr int kLoadPacks = 2;", "constexpr int kLoadPacks = 4;")],
    # The divergence kernels alone with 1 or 3 packs of each row per step: fewer registers (more blocks per SM)
    # against fewer bytes in flight per thread.
    "div_load1": [("divergence_cuda.cu", _DIV_INCLUDE, _DIV_INCLUDE + "#define kLoadPacks 1\n")],
    "div_load3": [("divergence_cuda.cu", _DIV_INCLUDE, _DIV_INCLUDE + "#define kLoadPacks 3\n")],
    # Threads per row's block: fewer, larger blocks, or more, smaller ones.
    "block512": [("common_cuda.cuh", "constexpr int kBlockThreads = 256;", "constexpr int kBlockThreads = 512;")],
    "block128": [("common_cuda.cuh", "constexpr int kBlockThreads = 256;", "constexpr int kBlockThreads = 128;")],
    # The divergence forward held to 40 registers: 6 blocks of 256 per SM instead of 5 (ptxas spills a little).
    "occ6": [("divergence_cuda.cu", _FWD_BOUNDS,
              "__launch_bounds__(block_threads<NT>(), NT == 32 ? 1 : 6)\n    div_fwd_kernel")],
}
# --apply-best: a variant replaces the code only if its KL forward is at least this much faster than the
# faster of the two base timings at both sizes, and no other timed case is slower than that by more than
# SLOWER, and its outputs match base's to MATCH of their largest magnitude.
FASTER, SLOWER, MATCH = 0.97, 1.02, 1e-5


def apply(csrc: Path, patches) -> None:
    for name, old, new in patches:
        path = csrc / name
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"variant patch does not apply: {old!r} occurs {text.count(old)} times in {name}")
        path.write_text(text.replace(old, new))


def best_variant(rows) -> str | None:
    """The variant --apply-best applies (see FASTER), or None."""
    def t(variant, case, N, key):
        return min(r[key] for r in rows if (r["variant"], r["case"], r["N"]) == (variant, case, N))

    sizes = sorted({r["N"] for r in rows})
    score = {}
    for v in sorted({r["variant"] for r in rows} & set(VARIANTS) - {"base"}):
        if max(r["max_rel_diff"] for r in rows if r["variant"] == v) > MATCH:
            continue
        ratios = {(c, N, k): t(v, c, N, k) / t("base", c, N, k) for c, _, _, bwd in CASES for N in sizes
                  for k in (("fwd_s", "fwd_bwd_s") if bwd else ("fwd_s",))}
        kl = [ratios["reverse_kl", N, "fwd_s"] for N in sizes]
        if max(kl) <= FASTER and max(ratios.values()) <= SLOWER:
            score[v] = max(kl)
    return min(score, key=score.get) if score else None


def build(name: str, patches, workdir: Path, arch: str, source: Path = ROOT / "csrc") -> tuple[Path, dict]:
    """Builds variant `name` (source, patched) into workdir/name/_C_cuda*.so; returns the module's path and each
    kernel's registers (ptxas -v)."""
    import pybind11

    src = workdir / name / "csrc"
    shutil.copytree(source, src)
    apply(src, patches)
    out = workdir / name / ("_C_cuda" + importlib.machinery.EXTENSION_SUFFIXES[0])
    cmd = ["nvcc", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", "-shared",
           "-cudart=static", "-Xcompiler=-fPIC,-fvisibility=hidden", f'-DFASTPREF_CUDA_ARCHS="{arch}"',
           f"-I{src}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(src / "bindings_cuda.cpp"), str(src / "logprobs_cuda.cu"), str(src / "divergence_cuda.cu"),
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed to build:\n{proc.stderr[-4000:]}")
    regs = {}
    for (mangled, _), report in ptxas_report(proc.stderr).items():
        m = re.search(r"((?:div|logprobs)_(?:fwd|bwd)_kernel)I(\S*?)EEvNS", mangled)
        if m:  # e.g. div_fwd_kernel<0,256> (template arguments; n1 is -1)
            args = [a.replace("n", "-") for a in re.findall(r"L[ib](n?\d+)E", m.group(2) + "E")]
            regs[m.group(1) + "<" + ",".join(args) + ">"] = report
    return out, regs


def load(path: Path):
    spec = importlib.util.spec_from_file_location("_C_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# (label, row_kernels op, divergence, forward+backward too)
CASES = [("logprobs", "token_logprobs", None, True), ("reverse_kl", "token_divergence", "reverse_kl", True),
         ("js", "token_divergence", "js", False)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--build-only", action="store_true", help="build and list registers; no GPU needed")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="also time the csrc/ in DIR (e.g. another commit's, from git worktree), as variant 'against'")
    ap.add_argument("--apply-best", action="store_true",
                    help="patch this checkout's csrc/ with the best variant, if one is clearly faster (FASTER)")
    ap.add_argument("--profile", action="store_true",
                    help="one launch of each bare forward of the installed fastpref._C_cuda, for ncu")
    args = ap.parse_args(argv)
    import torch

    import fastpref
    from fastpref import _native
    from row_kernels import SIZES, bare_kernels, copy_bandwidth, floor_bytes, inputs, timer

    if args.profile:
        x, xr, y = inputs(*SIZES[0], "cuda", torch.bfloat16, ignore_every=7)
        for _, op, div, _ in CASES:
            bare_kernels(op, "cuda", div)[0](x, xr, y)
        torch.cuda.synchronize()
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    if "base" not in names:
        names.insert(0, "base")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}" + ("a" if major == 9 else "")
    else:
        arch = "90a"
    workdir = Path(tempfile.mkdtemp(prefix="fastpref-variants-"))
    jobs = {n: (VARIANTS[n], ROOT / "csrc") for n in names}
    if args.against:
        names.append("against")
        jobs["against"] = ([], Path(args.against).resolve())
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        built = dict(zip(names, pool.map(lambda n: build(n, jobs[n][0], workdir, arch, jobs[n][1]), names)))
    for name, (_, regs) in built.items():
        # The kernels the timings below launch: reverse KL's and js' (bf16 or any dtype), bf16 log-probs' (with
        # entropy), a block per row.
        shown = [k for k in sorted(regs) if re.fullmatch(r"div_(fwd|bwd)_kernel<[02],\d\d\d+(,-?1)?>|"
                                                        r"logprobs_(fwd|bwd)_kernel<1,0,1,\d\d\d+>", k)]
        print(f"{name:9s} registers (spilled bytes): " +
              ", ".join(f"{k} {regs[k]['registers']} ({regs[k]['spill_stores']})" for k in shown))
    if args.build_only:
        return 0
    mods = {name: load(path) for name, (path, _) in built.items()}
    measure = timer("cuda", warmup=25, rep=200)
    bandwidth = copy_bandwidth("cuda", 2**31, measure)
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bandwidth / 1e9:.0f} GB/s; variants {names} (base timed first and last)", flush=True)
    order = names + ["base"]
    rows = []
    for N, V in SIZES:
        x, xr, y = inputs(N, V, "cuda", torch.bfloat16, ignore_every=7)
        kept = int((y != -100).sum())
        out, out32 = torch.empty_like(x), torch.empty(x.shape, device=x.device)
        for label, op, div, with_bwd in CASES:
            fwd, fwd_bwd = bare_kernels(op, "cuda", div)
            fwd_bytes, bwd_bytes = floor_bytes(op, N, V, kept, x.element_size())
            ref = None
            for i, name in enumerate(order):
                _native.cuda_ext = mods[name]
                got = [t.clone() for t in fwd(x, xr, y) if t is not None]
                if with_bwd:  # the gradient too, in fp32 (a bf16 one would differ by whole ulps of rounding)
                    fwd_bwd(x, xr, y, out32)
                    got.append(out32.clone())
                if ref is None:
                    ref = got
                diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, ref))
                row = dict(variant=name, repeat=i > 0 and name == "base", case=label, N=N, V=V, max_rel_diff=diff,
                           fwd_s=measure(lambda: fwd(x, xr, y)))
                row["fwd_frac"] = fwd_bytes / row["fwd_s"] / bandwidth
                if with_bwd:
                    row["fwd_bwd_s"] = measure(lambda: fwd_bwd(x, xr, y, out))
                    row["fwd_bwd_frac"] = bwd_bytes / row["fwd_bwd_s"] / bandwidth
                rows.append(row)
                bwd = (f"  fwd+bwd {row['fwd_bwd_s'] * 1e3:7.3f} ms ({row['fwd_bwd_frac']:6.1%})"
                       if with_bwd else "")
                print(f"{label:10s} N={N:5d} V={V:6d} {name:9s} fwd {row['fwd_s'] * 1e3:7.3f} ms "
                      f"({row['fwd_frac']:6.1%}){bwd}  max diff {diff:.1e} of max", flush=True)
    best = best_variant(rows)
    print(f"best variant: {best or 'none'} (a KL forward {1 - FASTER:.0%} faster at both sizes, nothing "
          f"{SLOWER - 1:.0%} slower, outputs within {MATCH:g})" + (": applied to csrc/" if best and args.apply_best
                                                                    else ""), flush=True)
    if best and args.apply_best:
        apply(ROOT / "csrc", VARIANTS[best])
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=device, torch=torch.__version__, copy_bandwidth=bandwidth,
                                                  best=best, applied=bool(best and args.apply_best),
                                                  registers={n: r for n, (_, r) in built.items()},
                                                  fastpref=fastpref.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

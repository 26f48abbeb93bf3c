"""Ahead-of-time compile check of the Triton kernels for real GPUs, runnable without one.

``python -m fastpref.kernels.triton._aot`` compiles the variants of ``logprobs.launch_configs()``,
``divergence.launch_configs()`` and ``pairwise.launch_configs()`` for sm_80 and sm_90 with the ptxas
bundled in the Triton wheel, reads each cubin's resource usage with the wheel's cuobjdump, and prints one
JSON report on stdout. The exit status is nonzero if any variant fails to compile or spills to local
memory: the interpreter tests cannot see either problem.

Every log-prob variant is compiled; of the divergence variants, a sample that covers every kernel shape and
every dtype in every pointer position (``_divergence_sample``), because their full cross product (3456
variants, ~20 minutes on two cores) is mostly dtype combinations that differ only in which loads and
stores convert; of the 306 pairwise variants, each loss type and each divergence score once
(``_pairwise_sample``). ``--all`` compiles every variant.

Access widths come from the PTX (``ld.global.v4.b32`` is a 128-bit load; ptxas keeps it one LDG.E.128).
``--sass`` also disassembles every cubin and counts LDG/STG widths there; it is off by default because
each disassembly costs ~0.4 s, several times the compile itself.

TRITON_INTERPRET must be unset: under it ``@triton.jit`` yields interpreter objects that cannot be
compiled.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastpref.kernels.triton import divergence, logprobs, pairwise

ARCHS = (80, 90)
# Integer arguments that carry the row layout: the JIT marks them 16-divisible for aligned shapes, and
# that is what lets it prove 16-byte alignment of each row and emit 128-bit accesses. (B, the pairwise
# kernel's length: a 16-divisible B makes its mask constant over each thread's 8 pairs.)
_ALIGNED_INTS = ("V", "stride_x", "stride_out", "stride_xr", "stride_out_x", "stride_out_xr", "B")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTX_MEM_OP = re.compile(r"\b((?:ld|st)\.global(?:\.\w+)*)")
_SASS_MEM_OP = re.compile(r"\b((?:LDG|STG)\.E(?:\.\w+)*)")


def _attrs(fn, signature):
    return {(fn.arg_names.index(name), ): [["tt.divisibility", 16]]
            for name, ty in signature.items() if ty.startswith("*") or name in _ALIGNED_INTS}


def _divergence_sample(configs):
    """The divergence variants compiled unless ``--all``.

    DIV, the HAS_* flags and BLOCK_V shape the kernel body; a pointer's dtype changes only that pointer's
    loads or stores and their conversions (a few registers either way, far from a spill). So: every
    (kernel, constexprs, num_warps) shape with fp32 data pointers, and per group of shapes that differ only
    in DIV, one all-bf16, one all-fp16 and one mixed variant, each on its own divergence (rotating through
    them), so every dtype is compiled in every pointer position.
    """
    shapes = collections.defaultdict(list)
    for config in configs:
        fn, signature, constexprs, num_warps = config
        shapes[(fn.__name__, json.dumps(constexprs, sort_keys=True), num_warps)].append(config)
    groups = collections.defaultdict(list)
    for (name, constexprs, num_warps), variants in shapes.items():
        rest = {k: v for k, v in json.loads(constexprs).items() if k != "DIV"}
        groups[(name, json.dumps(rest, sort_keys=True), num_warps)].append(variants)
    picked = []
    for group_index, group in enumerate(groups.values()):
        for shape_index, variants in enumerate(group):
            data = [name for name in variants[0][1] if len({sig[name] for _, sig, _, _ in variants}) > 1]
            dtypes = [{sig[name] for name in data} for _, sig, _, _ in variants]
            picked.append(next(v for v, d in zip(variants, dtypes) if d == {"*fp32"}))
            # Mixed: the variant closest to data pointer i taking dtype (i + group_index) mod 3, so the groups
            # pair different dtypes (an absent output shares its input's dtype, hence "closest").
            target = {name: ("*fp32", "*bf16", "*fp16")[(i + group_index) % 3] for i, name in enumerate(data)}
            mixed = max((v for v, d in zip(variants, dtypes) if len(d) > 1),
                        key=lambda v: sum(v[1][name] == target[name] for name in data))
            turn = (shape_index - group_index) % len(group)
            if turn == 0:
                picked.append(next(v for v, d in zip(variants, dtypes) if d == {"*bf16"}))
            elif turn == 1:
                picked.append(next(v for v, d in zip(variants, dtypes) if d == {"*fp16"}))
            elif turn == 2:
                picked.append(mixed)
    return picked


def _pairwise_sample(configs):
    """The pairwise variants compiled unless ``--all``: every loss type (and bt's margin flag) on the first
    divergence it takes, and each other divergence score once, on the score types in turn; the k-th picked
    shape takes its k-th (policy, reference) dtype pair, so every dtype reaches every pointer.

    The kernel is straight-line code (no loop, at most ~80 registers): its loss-type and score branches are
    independent pieces, so a combination cannot fail or spill where its parts compile.
    """
    shapes = collections.defaultdict(list)
    for config in configs:
        shapes[json.dumps(config[2], sort_keys=True)].append(config)
    picked, divs, with_extra, first = [], set(), set(), {}
    for variants in shapes.values():
        loss, div = variants[0][2]["LOSS"], variants[0][2]["DIV"]
        if first.setdefault(loss, div) != div:
            if div in divs or loss in with_extra:
                continue
            with_extra.add(loss)
        divs.add(div)
        picked.append(variants[len(picked) % len(variants)])
    return picked


def launch_configs(all_variants=False):
    """The variants to compile, in a fixed order (the worker processes index into it)."""
    div, pair = divergence.launch_configs(), pairwise.launch_configs()
    if not all_variants:
        div, pair = _divergence_sample(div), _pairwise_sample(pair)
    return logprobs.launch_configs() + div + pair


def _check(job, sass=False, all_variants=False):
    index, arch = job
    fn, signature, constexprs, num_warps = launch_configs(all_variants)[index]
    row = {"kernel": fn.__name__, "arch": f"sm_{arch}", "num_warps": num_warps,
           "signature": {k: v for k, v in signature.items() if v != "constexpr"}, "constexprs": constexprs}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_attrs(fn, signature))
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as exc:  # any compiler error is a finding to report, not a reason to stop
        return dict(row, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
        if sass:
            listing = subprocess.run([cuobjdump, "-sass", f.name], check=True, capture_output=True, text=True).stdout
            row["sass_mem_ops"] = dict(sorted(collections.Counter(_SASS_MEM_OP.findall(listing)).items()))
    found = _RESOURCE.search(usage)
    if found is None:
        return dict(row, ok=False, error=f"unparsed cuobjdump resource usage: {usage!r}"[:2000])
    regs, stack, shared, local = map(int, found.groups())
    mem_ops = collections.Counter(_PTX_MEM_OP.findall(kernel.asm["ptx"]))
    # cuobjdump sees only static shared memory; Triton's reduction scratch is dynamic, sized at launch.
    return dict(row, ok=local == 0, registers=regs, local_bytes=local, stack_bytes=stack, static_shared_bytes=shared,
                dynamic_shared_bytes=kernel.metadata.shared,
                load128=mem_ops["ld.global.v4.b32"] > 0, store128=mem_ops["st.global.v4.b32"] > 0,
                ptx_mem_ops=dict(sorted(mem_ops.items())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.kernels.triton._aot", description=__doc__.split("\n")[0])
    parser.add_argument("--sass", action="store_true", help="also count LDG/STG widths in the disassembled SASS")
    parser.add_argument("--all", action="store_true", dest="all_variants",
                        help="compile every divergence variant, not only the covering sample")
    args = parser.parse_args(argv)
    configs = launch_configs(args.all_variants)
    if not all(isinstance(fn, triton.runtime.JITFunction) for fn, *_ in configs):
        print("TRITON_INTERPRET is set: the kernels were built for the interpreter; unset it", file=sys.stderr)
        return 2
    for tool in ("ptxas", "cuobjdump"):
        if getattr(knobs.nvidia, tool) is None:
            print(f"no usable {tool} (Triton's nvidia backend binaries are missing)", file=sys.stderr)
            return 2
    jobs = [(i, arch) for i in range(len(configs)) for arch in ARCHS]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        rows = list(pool.map(functools.partial(_check, sass=args.sass, all_variants=args.all_variants), jobs,
                             chunksize=4))
    failed = [r for r in rows if not r["ok"]]
    report = {"triton": triton.__version__, "ptxas": knobs.nvidia.ptxas.version, "archs": [f"sm_{a}" for a in ARCHS],
              "num_configs": len(configs),
              "num_launchable": sum(len(m.launch_configs()) for m in (logprobs, divergence, pairwise)),
              "num_compiled": sum("registers" in r for r in rows),
              "num_failed": len(failed), "results": rows}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

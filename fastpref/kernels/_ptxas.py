"""ptxas' resource report (``nvcc -Xptxas -v``) as data, for the CUDA kernels' spill check
(tests/test_cuda_kernels.py) and benchmarks/cuda_variants.py."""
from __future__ import annotations

import re


def ptxas_report(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled kernel, arch): {"registers", "stack", "spill_stores", "spill_loads"}} from ``-Xptxas -v`` output."""
    rows, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            rows[current] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            rows[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            rows[current]["registers"] = int(m.group(1))
    return rows

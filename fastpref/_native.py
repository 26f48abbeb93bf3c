"""The optional compiled extension ``fastpref._C`` (native CPU kernels).

``ext`` is the module, or None when it is unavailable; ``error`` then says why (None otherwise).
"""
from __future__ import annotations

import importlib.util

try:
    from fastpref import _C as ext
except ImportError as exc:
    ext = None
    if importlib.util.find_spec("fastpref._C") is None:
        error = ("fastpref was installed without its compiled extension fastpref._C (see the build log; "
                 "reinstall with `pip install -v .` to show it)")
    else:
        error = f"fastpref._C failed to load: {exc}"
else:
    error = None

"""Loads the compiled extension dash_kernels._C once, at import.

`HAS_C` says whether it is there; `require_c()` raises with the exact reinstall command when it is not. Importing
_C registers the `torch.ops.dash.*` ops (store_kv, copy_pages) as a side effect.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension's shared library)

try:
    from dash_kernels import _C  # type: ignore[attr-defined]

    HAS_C = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # a pure-Python checkout, or a build for another torch
    _C = None
    HAS_C = False
    _IMPORT_ERROR = exc

REINSTALL_HINT = "pip install -e . --no-build-isolation   (or: make install)"


def require_c():
    """Returns the _C module, or raises ImportError naming the fix."""
    if _C is None:
        raise ImportError(
            f"dash_kernels._C is not built or does not load ({_IMPORT_ERROR}). Rebuild it with: {REINSTALL_HINT}"
        )
    return _C

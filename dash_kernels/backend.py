"""Which implementation the public ops run: "triton" (CUDA), "torch" (chunked, streaming, any device) or "reference".

Chosen once at import: `DASH_KERNELS_BACKEND=triton|torch|reference` if set, else "triton" when CUDA and Triton are
both usable, else "torch". Tests switch paths on the same inputs by setting `dash_kernels.backend.override` (or with
the `use_backend(...)` context manager). With the automatic choice, CPU tensors always take the torch path; forcing
"triton" on CPU tensors only works under `TRITON_INTERPRET=1` (the Triton interpreter), and is refused otherwise.
"""

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("triton", "torch", "reference")

HAS_TRITON = importlib.util.find_spec("triton") is not None  # the torch backend does not need it


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _default_backend() -> str:
    env = os.environ.get("DASH_KERNELS_BACKEND", "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"DASH_KERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
        return env
    return "triton" if HAS_TRITON and torch.cuda.is_available() else "torch"


DEFAULT_BACKEND = _default_backend()
FORCED = bool(os.environ.get("DASH_KERNELS_BACKEND", "").strip())
override: str | None = None
"""Set to one of BACKENDS to force a path (tests); None means DEFAULT_BACKEND."""


def resolve(device: torch.device) -> str:
    """The backend for tensors on `device`, after the override and the environment."""
    name = override or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"dash_kernels.backend.override must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and device.type != "cuda" and not _interpreting():
        if override is None and not FORCED:
            return "torch"  # automatic choice: Triton is for CUDA tensors
        if not HAS_TRITON:
            raise ValueError("backend 'triton' was forced but triton is not installed (pip install triton)")
        raise ValueError(f"backend 'triton' was forced for {device.type} tensors; that needs a CUDA device or "
                         "TRITON_INTERPRET=1 set before triton is imported")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("backend 'triton' was forced but triton is not installed (pip install triton)")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Temporarily force a backend: `with use_backend("reference"): ...`."""
    global override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, override = override, name
    try:
        yield
    finally:
        override = previous

"""Loads the compiled extension dash_kernels._C once, at import.

`HAS_C` says whether it is there; `require_c()` raises with the exact reinstall command when it is not;
`use_cpu_kernel(...)` says whether the fp32 CPU kernels apply to some tensors; `on_tensor_device` wraps every Triton
launcher. Importing _C registers every `torch.ops.dash.*` op as a side effect (store_kv, copy_pages, rms_norm,
add_rms_norm_, rotary_, sample_rows, paged_attention, pack_linear, pack_gate_up, linear_packed, linear_packed_into_,
gate_up_silu_packed, decoder_layer_); each op's fake kernel is registered beside its public function. _C's own
Python attributes are only what is not a tensor op: PageAllocator, has_avx512() and WITH_CUDA.
Before loading it, the build record setup.py wrote next to it is compared with the running torch (build_compat): a
_C built for another torch raises ImportError naming both versions and the rebuild command.
"""

import contextlib
import functools
import os

import torch  # libtorch must be loaded before the extension's shared library

from dash_kernels import backend, build_compat

# The torch.ops.dash ops that a CUDA build of _C gives CUDA kernels (csrc/*_cuda.cpp); every other dash op is CPU only.
# .ci/cuda_build_check.sh asserts the dispatcher of a real CUDA build agrees, op by op (dispatch_table).
CUDA_KERNEL_OPS = ("store_kv", "copy_pages")

# A _C compiled against another torch fails here with both versions and the fix, not an undefined-symbol trace.
build_compat.check_record(os.path.join(os.path.dirname(__file__), build_compat.RECORD_NAME), torch.__version__,
                          torch.version.cuda)

try:
    from dash_kernels import _C  # type: ignore[attr-defined]

    HAS_C = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # a pure-Python checkout, or a build for another torch
    _C = None
    HAS_C = False
    _IMPORT_ERROR = exc

REINSTALL_HINT = build_compat.REBUILD_COMMAND


def dispatch_table() -> dict[str, tuple[bool, bool]]:
    """{op name without "dash::": (has a CPU kernel, has a CUDA kernel)} for every registered torch.ops.dash op, as
    the dispatcher sees it (empty when _C is not loaded: the ops register when its library loads)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dash::"))
    return {n.removeprefix("dash::"): (has(n, "CPU"), has(n, "CUDA")) for n in names}


def require_c():
    """Returns the _C module, or raises ImportError naming the fix."""
    if _C is None:
        raise ImportError(
            f"dash_kernels._C is not built or does not load ({_IMPORT_ERROR}). Rebuild it with: {REINSTALL_HINT}"
        )
    return _C


def _no_grad(tensors) -> bool:
    return not any(t.requires_grad and torch.is_grad_enabled() for t in tensors)


def use_cpu_kernel(*tensors) -> bool:
    """Whether an fp32 CPU C++ inference kernel (no backward) applies to `tensors`: _C is built, the backend for CPU
    resolves to "torch" (DASH_KERNELS_BACKEND / backend.override = "reference" forces the torch references), and
    every tensor is fp32 on CPU and needs no gradient."""
    return (HAS_C and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _no_grad(tensors)
            and backend.resolve(tensors[0].device) == "torch")


def as_int32(t: torch.Tensor | None) -> torch.Tensor | None:
    """Index metadata as the C++ kernels read it: contiguous int32 (None passes through; already so: no copy)."""
    if t is None or (t.dtype == torch.int32 and t.is_contiguous()):
        return t
    return t.to(torch.int32).contiguous()


def use_triton_kernel(*tensors) -> bool:
    """Whether a Triton inference kernel (no backward) applies to `tensors`: the backend for their device resolves to
    "triton" (CUDA, or the interpreter when forced) and no tensor needs a gradient."""
    return backend.resolve(tensors[0].device) == "triton" and _no_grad(tensors)


def on_tensor_device(launcher):
    """Decorator for Triton launchers: run with the CUDA device of the first tensor argument current. Triton launches
    on the current device and its current stream, not the tensors' (torch's and our C++ ops guard themselves), so a
    model on cuda:1 with cuda:0 current would read foreign addresses. A no-op for CPU tensors (interpreter, tests)."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    return launch

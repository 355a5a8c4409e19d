"""The oldest torch this project runs on, checked when dash_kernels is imported (dash.model and dash.rl.fsdp do).

Three torch features the code calls set the floor; each is probed on the installed torch by
tests/kernels/test_torch_floor.py, and pyproject.toml's `torch>=` must equal the newest of them:

    torch.mm(a, b, out_dtype=torch.float32)        2.8   dash/model.py: the fp32 logits of a bf16 model on CUDA
    F.scaled_dot_product_attention(enable_gqa=)     2.5   dash/attention.py, dash_kernels/paged_attention.py
    torch.distributed.fsdp.fully_shard (public)     2.6   dash/rl/fsdp.py, imported by every training step

Why a floor rather than fallbacks: a fallback per feature would be code that no test here runs (the suite runs one
torch), and the fp32-logits fallback (upcasting the [V, H] lm_head) spends the memory the out_dtype GEMM exists to
save. An older torch used to fail late (a bf16 run at its first sampling step, on torch 2.4-2.7); now it fails at
import with the version found and the fix.
"""

import re

import torch

__all__ = ["FEATURE_VERSIONS", "MIN_TORCH", "check_torch_version", "parse_version"]

FEATURE_VERSIONS: dict[str, tuple[int, int]] = {
    "torch.mm(..., out_dtype=)": (2, 8),
    "F.scaled_dot_product_attention(..., enable_gqa=)": (2, 5),
    "torch.distributed.fsdp.fully_shard": (2, 6),
}
MIN_TORCH: tuple[int, int] = max(FEATURE_VERSIONS.values())


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: "2.13.0+cu130" -> (2, 13); pre-releases count as their release."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: str | None = None) -> None:
    """Raises ImportError naming the found version, the floor and the features behind it when torch is too old.
    `version` defaults to the running torch's."""
    found = torch.__version__ if version is None else version
    if parse_version(found) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        missing = ", ".join(f"{name} ({a}.{b})" for name, (a, b) in FEATURE_VERSIONS.items()
                            if (a, b) > parse_version(found))
        raise ImportError(f"dash-rl needs torch >= {need}, found torch {found}: it calls {missing}. "
                          f"Upgrade with: pip install 'torch>={need}'")

"""Input validation shared by the public ops: bad input is a ValueError naming the argument and its shape.

A kernel fed a target >= V would read out of bounds (a device assert on CUDA, garbage on CPU), so the range check is
done here, in torch, before any kernel runs. It costs one small reduction (and one host sync on CUDA).
"""

import math

import torch


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim=None, floating=None, integer=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004 (API: ValueError)
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got {_desc(t)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {_desc(t)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {_desc(t)}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    base_name, base = items[0]
    for name, t in items[1:]:
        if t.device != base.device:
            raise ValueError(f"{name} is on {t.device} but {base_name} is on {base.device} ({name}: {_desc(t)})")


def check_shape(name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {_desc(t)}")


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, vocab) or equals ignore_index."""
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(f"targets (shape {tuple(targets.shape)}) has values outside [0, {vocab}) that are not "
                         f"ignore_index={ignore_index}, e.g. {first}")


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_linear(hidden, weight, targets, bias, ignore_index) -> None:
    """hidden [..., H], weight [V, H], targets [...], bias [V] or None."""
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, ndim=2, floating=True)
    check_tensor("targets", targets, integer=True)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got {_desc(hidden)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree on H: hidden {_desc(hidden)}, "
                         f"weight {_desc(weight)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype} "
                         f"(hidden: {_desc(hidden)}, weight: {_desc(weight)}); cast one of them")
    check_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        check_shape("bias", bias, (weight.shape[0],), "[V]")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_targets(targets, weight.shape[0], ignore_index)

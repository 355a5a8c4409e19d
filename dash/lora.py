"""LoRA adapters on `dash.model.CausalLM`, saved and read in the folder layout `peft` uses.

Why: fine-tuning a model too large for full AdamW state. Each targeted projection y = x W^T + b becomes

    y = x W^T + b + scaling * (dropout(x) A^T) B^T,    A: [r, in], B: [out, r], scaling = alpha / r

with A drawn as nn.Linear's default (kaiming-uniform, as peft) and B zero, so a fresh adapter changes nothing. The
base layer's `weight` / `bias` are the very Parameters of the loaded model (never copied), frozen (requires_grad
False), so the optimizer (dash/rl/optim.py keeps only trainable parameters) holds the adapters and their state only.
`LoRALinear` is an nn.Linear subclass keeping the base's names, so `model.layers.0.self_attn.q_proj.weight` is still
an HF name and the adapters add `...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`.

On disk (peft's layout, read by `peft.PeftModel.from_pretrained(hf_model, folder)`):
  adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, ...
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in] / lora_B.weight [out, r]
`load_adapter` reads such a folder (ours or one peft saved) and refuses, naming the file and the key, a config with
peft features dash does not run (DoRA, rsLoRA, per-module ranks, biases, modules_to_save ...), or tensors that do not
fit the model (an adapter trained for another base model).

Departures from peft: only the decoder projections may be targets (config.LORA_MODULES): the fused loss reads the
lm_head weight directly, so an adapter there would be skipped by it. The sampler (dash/engine/runner.py) applies the
adapters without a merged model: `layer_adapters` lists them per layer for `DecoderLayer.paged_state`.
Tests: `.venv/bin/python -m pytest tests/model/test_lora.py -q`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dash.config import LORA_MODULES, LoRAConfig
from dash.model_parts import merged_weight  # noqa: F401 - the one definition; dash.rl.export imports it from here
from dash_kernels.decoder_layer import LAYER_WEIGHTS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> LoraModel -> the HF model
# peft config keys whose non-default values change the maths (dash runs plain LoRA only): key -> its default.
_UNSUPPORTED_PEFT = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
                     "lora_bias": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                     "layers_to_transform": None, "layer_replication": None, "target_parameters": None,
                     "trainable_token_indices": None}
# LAYER_WEIGHTS slot (dash_kernels.decoder_layer) of each projection, for the sampler's per-layer adapter list.
_SLOT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}


class LoRALinear(nn.Linear):
    """An nn.Linear sharing `base`'s weight and bias Parameters, plus a rank-r adapter (see module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)  # [r, in], kaiming-uniform (peft's init)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)  # [out, r]
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.adapter_on = True  # off: the base layer alone (the KL reference, `adapters_disabled`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # [..., out]
        if not self.adapter_on:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # peft's order of operations


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name (HF's, e.g. `model.layers.0.self_attn.q_proj`) -> its LoRALinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: nn.Module, cfg: LoRAConfig, targets: list[str] | None = None) -> list[str]:
    """Freezes every base parameter and wraps the targeted projections in place; returns the wrapped module names.

    `targets`: full module names to wrap (load_adapter's); None: every projection named by cfg.target_names().
    """
    if has_adapters(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    names = set(cfg.target_names())
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in LORA_MODULES}
    chosen = sorted(targets if targets is not None else [n for n in linears if n.rsplit(".", 1)[-1] in names])
    missing = [n for n in chosen if n not in linears]
    if missing or not chosen:
        shown = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"model.lora.target_modules: {missing[0] if missing else sorted(names)} matches no module "
                         f"of the model (available: {', '.join(shown)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, LoRALinear(linears[name], cfg.rank, cfg.alpha, cfg.dropout))
    return chosen


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's key -> tensor for every adapter weight (the Parameters themselves, not copies)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    return out


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors (peft's layout) into `folder`; returns it."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    first = next(iter(mods.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}), "inference_mode": True,
        "init_lora_weights": True, "revision": None, "layers_pattern": None, **_UNSUPPORTED_PEFT,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    """adapter_config.json -> LoRAConfig (enabled); ValueError naming the file and key for what dash cannot run."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (not a peft LoRA adapter folder)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={d.get('peft_type') if isinstance(d, dict) else d!r} is not LORA")
    for key, default in _UNSUPPORTED_PEFT.items():
        value = d.get(key, default)
        if value != default and (value or default):  # None, {}, [] and False all mean "not used"
            raise ValueError(f"{path}: {key}={d[key]!r} is not supported by dash (plain LoRA only)")
    r, alpha = d.get("r"), d.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{path}: r={r!r} must be an int >= 1 and lora_alpha={alpha!r} a number > 0")
    return LoRAConfig(enabled=True, rank=r, alpha=float(alpha), dropout=float(d.get("lora_dropout") or 0.0),
                      target_modules=list(LORA_MODULES))


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Reads a peft LoRA folder into `model`: wraps the modules its tensors name (when the model has no adapters
    yet) and copies the weights in. ValueError naming the file and key when it does not fit this model."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a peft adapter folder holds {ADAPTER_WEIGHTS})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    targets = set()
    for key in tensors:
        body = key.removeprefix(PEFT_PREFIX)
        module, _, leaf = body.rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or leaf not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA weight ({PEFT_PREFIX}<module>.lora_A/B.weight)")
        targets.add(module)
    modules = dict(model.named_modules())
    unknown = sorted(t for t in targets if t not in modules)
    if unknown:
        raise ValueError(f"{path}: module {unknown[0]!r} is not in this model (an adapter for another base model?)")
    if not has_adapters(model):
        apply_lora(model, cfg, targets=sorted(targets))
    ours = adapter_state_dict(model)
    if set(ours) != set(tensors):
        diff = sorted(set(ours) ^ set(tensors))
        raise ValueError(f"{path}: its adapters differ from the model's ({len(diff)} tensors, e.g. {diff[0]!r})")
    with torch.no_grad():
        for key, t in tensors.items():
            if list(t.shape) != list(ours[key].shape):
                raise ValueError(f"{path}: {key} has shape {list(t.shape)}, the model needs {list(ours[key].shape)} "
                                 "(an adapter for another base model, or another rank?)")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: {key} holds NaN or inf")
            ours[key].copy_(t)
    return sorted(targets)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Runs the base model alone inside the block (the initial policy: the KL reference, with no copy)."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.adapter_on = False
    try:
        yield model
    finally:
        for m in mods:
            m.adapter_on = True


class BaseModelView:
    """The frozen base of a LoRA model as the trainer's KL reference: `forward_packed` with adapters off."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward_packed(self, *args, **kwargs) -> torch.Tensor:
        with adapters_disabled(self.model):
            return self.model.forward_packed(*args, **kwargs)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head_weight


def layer_adapters(layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float] | None] | None:
    """A decoder layer's adapters in dash_kernels LAYER_WEIGHTS order, (A [r, in], B [out, r], scaling) or None per
    slot; None when the layer has none (the sampler's plain path)."""
    found = {_SLOT[n.rsplit(".", 1)[-1]]: (m.lora_A.weight, m.lora_B.weight, m.scaling)
             for n, m in layer.named_modules() if isinstance(m, LoRALinear) and m.adapter_on}
    return [found.get(slot) for slot in LAYER_WEIGHTS] if found else None


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (printed at set-up: a LoRA run trains ~1% or less)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


"""Training memory of LoRA (model.lora) against full fine-tuning on the same model: the numbers in the README.

Each mode runs in its own fresh process (so one mode's freed memory cannot lower another's peak): build a random
Qwen2-style model (no download), optionally wrap it with LoRA (dash/lora.py), build the trainer's optimizer
(dash/rl/optim.py: AdamW; fp32 master weights for bf16), and take OPT_STEPS optimizer steps of the trainer's loss
path (packed forward, dash_kernels.fused_policy_loss on the lm_head, backward). Reported per mode:

- state MiB: bytes of parameters + gradients + optimizer state (AdamW moments, and master weights / their fp32
  gradients for bf16), counted tensor by tensor at the end of backward, before the optimizer frees the gradients.
  Exact and machine-independent: the memory a run holds for the whole of training.
- peak RSS MiB: the process's peak resident set (getrusage) minus its RSS before the model was built, so activations
  and allocator slack are included; noisier (allocator, thread pools).

    .venv/bin/python benchmarks/lora_memory.py                    # default model: 8 layers, hidden 512, ~27M params
    .venv/bin/python benchmarks/lora_memory.py --layers 2 --hidden 128 --tokens 64   # smoke size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from common import emit, result

MODES = ("full-float32", "lora-float32", "full-bfloat16", "lora-bfloat16")
OPT_STEPS = 2  # the second step has AdamW state allocated: what a run holds from then on
MIB = 2**20


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_mode(mode: str, args) -> dict:
    """One mode, in this process: returns its counts."""
    from dash.config import LoRAConfig
    from dash.lora import apply_lora
    from dash.model import CausalLM, ModelConfig
    from dash.rl.optim import MasterWeightAdamW, make_adamw
    from dash_kernels import fused_policy_loss

    base_rss = _rss_now()
    kind, dtype = mode.split("-")
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    model = CausalLM(cfg).to(getattr(torch, dtype)).train()
    if kind == "lora":
        apply_lora(model, LoRAConfig(enabled=True, rank=args.rank, alpha=2.0 * args.rank))
    opt = make_adamw(model.parameters(), lr=1e-4, weight_decay=0.0)
    B, L = 4, args.tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (B * L,), generator=g)
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32)
    pos = torch.arange(L).repeat(B)
    state = 0
    for _ in range(OPT_STEPS):
        hidden = model.forward_packed(ids, cu, pos).view(B, L, -1)  # [B, L, H]
        targets = torch.roll(ids.view(B, L), -1, dims=1)  # [B, L]
        loss, _ = fused_policy_loss(hidden, model.lm_head_weight, targets, torch.randn(B, generator=g),
                                    torch.ones(B, L), loss_type="dr_grpo", normalizer=float(B * L))
        loss.backward()
        params = list(model.parameters())
        grads = [p.grad for p in params]
        opt_tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        if isinstance(opt, MasterWeightAdamW):
            opt_tensors += opt.masters + [m.grad for m in opt.masters]
        state = _tensor_bytes(params) + _tensor_bytes(grads) + _tensor_bytes(opt_tensors)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"mode": mode, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "state_mib": state / MIB, "peak_rss_rise_mib": (peak - base_rss) / MIB}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence (4 sequences per step)")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # internal: run one mode, print its JSON
    ap.add_argument("--out", help="also write <out>.md and <out>.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.one, args)))
        return
    passed = [a for a in sys.argv[1:] if not a.startswith("--out")]
    rows = []
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, *passed, "--one", mode], capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full = {r["mode"].split("-")[1]: r for r in rows if r["mode"].startswith("full")}
    lines = [f"{'mode':<15}{'params M':>10}{'trainable M':>13}{'state MiB':>11}{'vs full':>9}{'peak RSS rise MiB':>19}"]
    for r in rows:
        ratio = r["state_mib"] / full[r["mode"].split("-")[1]]["state_mib"]
        lines.append(f"{r['mode']:<15}{r['params_m']:>10.2f}{r['trainable_m']:>13.3f}{r['state_mib']:>11.1f}"
                     f"{ratio:>9.3f}{r['peak_rss_rise_mib']:>19.1f}")
    record = result("lora_memory", "cpu", layers=args.layers, hidden=args.hidden, vocab=args.vocab, rank=args.rank,
                    tokens_per_step=4 * args.tokens, rows=rows)
    emit("\n".join(lines), record, args.out)


if __name__ == "__main__":
    main()

"""Token sampling from logits, one call per decode step: `sample_rows(logits, temperature, u, stop_ids, stop_active)`.

Row b: its stop tokens are masked to -inf while `stop_active[b]` (min_new_tokens not reached), then
logp = log_softmax(logits / t); t = temperature[b] > 0 draws by inverse CDF at the uniform u[b] (the first token whose
cumulative probability exceeds u * total), t = 0 is greedy (first argmax, processed at t = 1). Returns the tokens and
their processed log-probs (the loss's old_logp). Top-k / top-p are not in this op: the sampler runs batches that use
them through `dash.engine.sampling.process_logits` and `sample_from_logp`.

Layers: the references `mask_stop_tokens`, `sample_from_logp` and `sample_rows_ref` (pure torch), the C++ kernel
`torch.ops.dash.sample_rows` (csrc/sample_cpu.cpp: one pass per row in a thread-local buffer, fp32 CPU), and the
public `sample_rows`, which picks the kernel for fp32 CPU inputs (`use_cpu_kernel`; DASH_KERNELS_BACKEND=reference
forces the reference) and the reference otherwise. The two agree on log-probs to float rounding; a sampled token can
differ only when u * total lies within a few ulp of a cumulative boundary (the kernel sums in blocks, torch's cumsum
in sequence). Both depend on a row alone, never on the batch it shares.

Tests: `.venv/bin/python -m pytest tests/kernels/test_sample.py -q`.
"""

import torch

from dash_kernels._ext import HAS_C, use_cpu_kernel

__all__ = ["sample_rows", "sample_rows_ref", "sample_from_logp", "mask_stop_tokens"]


def mask_stop_tokens(logits: torch.Tensor, stop_ids: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Set logits[b, stop_ids[b]] = -inf where active[b] (min_new_tokens not reached). stop_ids: [B, S], -1 padded."""
    if not bool(active.any()):
        return logits
    rows = active.nonzero().flatten()  # [R]
    ids = stop_ids[rows]  # [R, S]
    cols = torch.where(ids >= 0, ids, logits.shape[1])  # padding -> an extra scratch column
    padded = torch.nn.functional.pad(logits[rows], (0, 1))  # [R, V+1]
    padded.scatter_(1, cols, float("-inf"))
    logits = logits.clone()
    logits[rows] = padded[:, :-1]
    return logits


def sample_from_logp(logp: torch.Tensor, greedy: torch.Tensor | None, u: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Draw one token per row of processed log-probs logp [B, V] by inverse CDF at u [B] in (0, 1) (argmax where
    greedy [B] bool; None: no greedy row). Returns (tokens [B] long, logp [B] fp32)."""
    cdf = logp.exp().cumsum(dim=1)  # [B, V]
    total = cdf[:, -1:]
    # Keep the target strictly below the last cdf value: then the first bin with cdf > target has positive mass.
    target = torch.minimum((u[:, None] * total.double()).float(), torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [B]
    if greedy is not None:
        tokens = torch.where(greedy, logp.argmax(dim=1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def sample_rows_ref(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor, stop_ids: torch.Tensor,
                    stop_active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of `sample_rows` (same arguments and results)."""
    logits = mask_stop_tokens(logits, stop_ids, stop_active)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = (logits / t[:, None]).log_softmax(dim=1)  # [B, V]
    return sample_from_logp(logp, greedy if bool(greedy.any()) else None, u)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor, stop_ids: torch.Tensor | None = None,
                stop_active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: (B, V) fp32 raw logits.
        temperature: (B,) fp32; 0 = greedy.
        u: (B,) float64 uniforms in (0, 1), one per row (dash.engine.sampling.uniforms_at).
        stop_ids: (B, S) int64 stop tokens, -1 padded; None = no stop mask.
        stop_active: (B,) bool, mask row b's stop tokens; None = no row.
    Returns:
        (tokens (B,) int64, logp (B,) fp32 under the processed distribution).
    """
    B = logits.shape[0]
    if stop_ids is None or stop_active is None:
        stop_ids = torch.empty(B, 0, dtype=torch.long, device=logits.device)
        stop_active = torch.zeros(B, dtype=torch.bool, device=logits.device)
    if use_cpu_kernel(logits, temperature):
        return torch.ops.dash.sample_rows(logits.contiguous(), temperature.contiguous(), u.double().contiguous(),
                                          stop_ids.contiguous(), stop_active.contiguous())
    return sample_rows_ref(logits, temperature, u.to(logits.device), stop_ids, stop_active.to(logits.device))


if HAS_C:
    @torch.library.register_fake("dash::sample_rows")
    def _sample_rows_fake(logits, temperature, u, stop_ids, stop_active):
        B = logits.shape[0]
        return logits.new_empty(B, dtype=torch.long), logits.new_empty(B)

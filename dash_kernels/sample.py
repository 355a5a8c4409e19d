"""Token sampling from logits, one call per decode step: `sample_rows(logits, temperature, u, stop_ids, stop_active)`.

Row b: its stop tokens are masked to -inf while `stop_active[b]` (min_new_tokens not reached), then
logp = log_softmax(logits / t); t = temperature[b] > 0 draws by inverse CDF at the uniform u[b] (the first token whose
cumulative probability exceeds u * total), t = 0 is greedy (first argmax, processed at t = 1). Returns the tokens and
their processed log-probs (the loss's old_logp). Top-k / top-p are not in this op: the sampler runs batches that use
them through `dash.engine.sampling.process_logits` and `sample_from_logp`.

Layers: the references `mask_stop_tokens`, `sample_from_logp` and `sample_rows_ref` (pure torch), two kernels, the
C++ `torch.ops.dash.sample_rows` (csrc/sample_cpu.cpp: one pass per row in a thread-local buffer, fp32 CPU) and the
Triton `_sample_rows_kernel` with its launcher `sample_rows_fwd` (one program per row, three streaming passes over
the row's logits: max / sum / argmax, the total mass, then the inverse-CDF walk; nothing of size [B, V] is written,
where the reference materialises ~6 such tensors), and the public `sample_rows`, which picks Triton for CUDA tensors
(or under TRITON_INTERPRET=1 when the triton backend is forced), C++ for fp32 CPU inputs, and the reference otherwise
(DASH_KERNELS_BACKEND=reference forces it). The kernels agree with the reference on log-probs to float rounding; a
sampled token can differ only when u * total lies within a few ulp of a cumulative boundary (they sum in blocks,
torch's cumsum in sequence). All depend on a row alone, never on the batch it shares. No autograd (inference only).
AOT-compiled for sm_80 / sm_90 by `python -m dash_kernels.aot` (`aot_specs` below).

Tests: `.venv/bin/python -m pytest tests/kernels/test_sample.py -q` (C++); the Triton kernel in
tests/kernels/interp_cases.py (interpreter, run by test_triton_interpreter.py) and end to end in the engine
(test_paged_attention.py's interpreter run).
"""

import torch

from dash_kernels._ext import HAS_C, on_tensor_device, use_cpu_kernel, use_triton_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and C++ paths need only torch
    triton = None

__all__ = ["sample_rows", "sample_rows_ref", "sample_from_logp", "mask_stop_tokens", "sample_rows_fwd"]

BLOCK_V = 1024  # vocabulary entries per step of a pass: 3 passes of ~150 steps over a 152k vocabulary
NUM_WARPS = 4
NUM_STAGES = 3  # Triton's default, what the launcher always ran; launcher and `python -m dash_kernels.aot` read it

if triton is not None:

    @triton.jit
    def _masked_block(Logits_row, Stop_row, v0, V, S, inv_t, active, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
        """Block [v0, v0 + BLOCK_V) of a row: logits / t, -inf past V and on the row's stop tokens when active."""
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(Logits_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        offs_s = tl.arange(0, BLOCK_S)
        stop = tl.load(Stop_row + offs_s, mask=offs_s < tl.where(active, S, 0), other=-1)  # [BLOCK_S]
        is_stop = tl.sum((offs[:, None] == stop[None, :]).to(tl.int32), axis=1) > 0
        return offs, tl.where(is_stop, float("-inf"), x)

    @triton.jit
    def _sample_rows_kernel(Logits, Temperature, U, Stop_ids, Stop_active, Tokens, Logp, stride_l, stride_s, V, S,
                            BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        t = tl.load(Temperature + b)
        greedy = t <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
        active = tl.load(Stop_active + b) != 0
        row = Logits + b * stride_l
        stop_row = Stop_ids + b * stride_s
        # Pass 1: running max (online softmax), its rescaled sum, and the first argmax.
        m = float("-inf")
        total = 0.0
        arg = 0
        for v0 in range(0, V, BLOCK_V):
            offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, BLOCK_V, BLOCK_S)
            bm = tl.max(x, axis=0)
            barg = tl.min(tl.where(x == bm, offs, V), axis=0)  # first index of the block maximum
            arg = tl.where(bm > m, barg, arg)  # strictly greater: an earlier block keeps a tie
            m_new = tl.maximum(m, bm)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked block must not give NaN
            total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        lse = m + tl.log(total)
        token = arg
        if not greedy:
            # Pass 2: the mass of the processed distribution as the walk below will add it (same blocks, same order),
            # so the walk's running sum ends exactly at `mass` and a target below it is always crossed.
            mass = 0.0
            for v0 in range(0, V, BLOCK_V):
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, BLOCK_V, BLOCK_S)
                mass += tl.sum(tl.exp(x - lse), axis=0)
            target = (tl.load(U + b) * mass).to(tl.float32)
            # Pass 3: the first token whose cumulative mass exceeds target; `last` (the last token with mass seen)
            # covers a target that rounding pushed up to the total.
            cum = 0.0
            found = 0  # int flag: 1 once a block crossed target
            last = arg
            for v0 in range(0, V, BLOCK_V):
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, BLOCK_V, BLOCK_S)
                p = tl.exp(x - lse)
                block_mass = tl.sum(p, axis=0)
                crossing = (found == 0) & (cum + block_mass > target)
                first = tl.min(tl.where((cum + tl.cumsum(p, axis=0) > target) & (p > 0), offs, V), axis=0)
                block_last = tl.max(tl.where(p > 0, offs, -1), axis=0)  # the in-block cumsum may round under target
                token = tl.where(crossing, tl.where(first < V, first, block_last), token)
                found = tl.maximum(found, crossing.to(tl.int32))
                last = tl.where(found == 1, last, tl.maximum(last, block_last))
                cum += block_mass
            token = tl.where(found == 1, token, last)
        x_tok = tl.load(row + token).to(tl.float32) * inv_t
        tl.store(Tokens + b, token.to(tl.int64))
        tl.store(Logp + b, x_tok - lse)


def _block_s(S: int) -> int:
    return max(2, triton.next_power_of_2(max(S, 1)))


@on_tensor_device
def sample_rows_fwd(logits, temperature, u, stop_ids, stop_active):
    """Triton launcher; arguments as in `sample_rows` (stop_ids [B, S] int64, stop_active [B] bool, all given)."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    logp = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logp
    S = stop_ids.shape[1]
    if S == 0:
        stop_ids = torch.full((B, 1), -1, dtype=torch.long, device=logits.device)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    stop_ids = stop_ids if stop_ids.stride(1) == 1 else stop_ids.contiguous()
    active = stop_active.to(torch.int8).contiguous()  # bytes, not i1: the kernel compares them with 0
    _sample_rows_kernel[(B,)](logits, temperature.float().contiguous(), u.double().contiguous(), stop_ids, active,
                              tokens, logp, logits.stride(0), stop_ids.stride(0), V, S,
                              BLOCK_V=BLOCK_V, BLOCK_S=_block_s(S), num_warps=NUM_WARPS,
                              num_stages=NUM_STAGES)
    return tokens, logp


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`: up to 2 stop ids per row
    (Qwen2.5-Instruct's <|im_end|> and <|endoftext|>) and up to 4."""
    specs = []
    for dt in ("fp32", "bf16"):
        sig = {"Logits": f"*{dt}", "Temperature": "*fp32", "U": "*fp64", "Stop_ids": "*i64", "Stop_active": "*i8",
               "Tokens": "*i64", "Logp": "*fp32", "stride_l": "i32", "stride_s": "i32", "V": "i32", "S": "i32",
               "BLOCK_V": "constexpr", "BLOCK_S": "constexpr"}
        for stops in (2, 4):
            specs.append((f"sample_rows[{dt},s{_block_s(stops)}]", _sample_rows_kernel, sig,
                          {"BLOCK_V": BLOCK_V, "BLOCK_S": _block_s(stops)},
                          {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}))
    return specs


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
    B, dev = logits.shape[0], logits.device
    if stop_ids is None or stop_active is None:
        stop_ids = torch.empty(B, 0, dtype=torch.long, device=dev)
        stop_active = torch.zeros(B, dtype=torch.bool, device=dev)
    # The per-row inputs follow the logits (no-ops when the caller already built them there, as the engine does).
    temperature, u, stop_ids, stop_active = (t.to(dev) for t in (temperature, u, stop_ids, stop_active))
    if use_triton_kernel(logits):
        return sample_rows_fwd(logits, temperature, u, stop_ids, stop_active)
    if use_cpu_kernel(logits, temperature):
        return torch.ops.dash.sample_rows(logits.contiguous(), temperature.contiguous(), u.double().contiguous(),
                                          stop_ids.contiguous(), stop_active.contiguous())
    return sample_rows_ref(logits, temperature, u, stop_ids, stop_active)


if HAS_C:
    @torch.library.register_fake("dash::sample_rows")
    def _sample_rows_fake(logits, temperature, u, stop_ids, stop_active):
        B = logits.shape[0]
        return logits.new_empty(B, dtype=torch.long), logits.new_empty(B)

"""Token sampling from logits, one call per decode step:
`sample_rows(logits, temperature, u, stop_ids, stop_active, top_k, top_p)`.

Row b, in HF `generate` / vLLM order: its stop tokens are masked to -inf while `stop_active[b]` (min_new_tokens not
reached); x = logits / t (t = temperature[b], or 1 for a greedy row); then top-k and top-p become one threshold tau:
the row keeps the tokens with x >= tau and logp = log_softmax of x over them. tau = max(tau_k, tau_p):
- tau_k, top-k: the k-th largest x (top_k[b] = k > 0; -inf when off). Ties at it are kept, as HF's TopKLogitsWarper
  does: the kept set then depends only on the values, never on how a sort or topk orders equal ones.
- tau_p, top-p (top_p[b] < 1): with p the softmax of the top-k-kept x and tokens taken largest first, the smallest x
  whose mass before it (sum of p over strictly larger x) is < top_p. A token of a tied group is kept with its group.
A sampled row (t > 0) draws by inverse CDF at u[b] (the first token, in vocabulary order, whose cumulative
probability exceeds u * total); a greedy row (t = 0) takes the first argmax and reports its log-prob under the same
processing at t = 1. Returns the tokens and their processed log-probs (the loss's old_logp, what
`dash.engine.logits_processing.completion_logprobs` recomputes).

Why: the unfused path sorts the [B, V] logits every step (with a 152k vocabulary, about the cost of the forward).
Here nothing of size [B, V] is sorted or written: the C++ kernel finds tau_k per row with nth_element and sorts only
the k kept values when top-p needs them; the Triton kernel keeps a running top-BLOCK_K of the row in registers.

Layers: the references `mask_stop_tokens`, `filter_threshold_ref`, `sample_from_logp` and `sample_rows_ref` (pure
torch); two kernels, the C++ `torch.ops.dash.sample_rows` (csrc/sample_rows_cpu.cpp, fp32 CPU) and the Triton
`_sample_rows_kernel` with its launcher `sample_rows_fwd`; and the public `sample_rows`, which picks Triton for CUDA
tensors (or under TRITON_INTERPRET=1 when the triton backend is forced), C++ for fp32 CPU inputs, and the reference
otherwise (DASH_KERNELS_BACKEND=reference forces it). Every setting (top-k of any size, top-p with or without top-k,
stop masks) stays in the kernels.
Triton kernel: one program per row, streaming over the row in BLOCK_V blocks. A filter variant (BLOCK_K > 0) first
merges the top BLOCK_K values of each FILTER_BLOCK_V block into a running top BLOCK_K (`tl.topk`; a block whose
maximum is not above the running minimum is skipped), reads tau_k at position k - 1 and tau_p from a cumulative sum
over those sorted values. A row whose k exceeds BLOCK_K (or top-p without top-k) finds the threshold by bisection
over the order-preserving integer image of fp32 instead (33 streaming passes, each a count or a mass above a pivot):
exact, slower, and never taken with the presets' top_k = 50 (BLOCK_K = 64). Then three passes as without filters:
max / sum / argmax, the total mass, the inverse-CDF walk. GPU speed: compiled, not run (no GPU here).
Agreement: the kernels equal the reference on log-probs to float rounding; a sampled token can differ only when
u * total lies within a few ulp of a cumulative boundary, and the kept set only when a top-p mass lies within a few
ulp of top_p (sums in other orders). All depend on a row alone, never on the batch it shares. No autograd.
AOT-compiled for sm_80 / sm_90 by `python -m dash_kernels.aot` (`aot_specs` below).

Tests: `.venv/bin/python -m pytest tests/kernels/test_sample.py -q` (C++ and reference); the Triton kernel in
tests/kernels/interp_sample_cases.py and interp_cases.py (interpreter, run by test_triton_interpreter.py).
"""

import torch

from dash_kernels._ext import HAS_C, on_tensor_device, use_cpu_kernel, use_triton_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and C++ paths need only torch
    triton = None

__all__ = ["sample_rows", "sample_rows_ref", "sample_from_logp", "mask_stop_tokens", "filter_threshold_ref",
           "sample_rows_fwd"]

BLOCK_V = 1024  # vocabulary entries per step of a pass: 3 passes of ~150 steps over a 152k vocabulary
NUM_WARPS = 4
# Warps of the filter variant per BLOCK_S (stop ids per row): the ones that compile without register spills on
# sm_80 and sm_90 (ptxas -v through `python -m dash_kernels.aot`; 4 warps spill at BLOCK_S 2, 8 at BLOCK_S 4).
FILTER_NUM_WARPS = {2: 8, 4: 4}
NUM_STAGES = 3  # Triton's default, what the launcher always ran; launcher and `python -m dash_kernels.aot` read it
# Running top-k buffer size of the Triton filter variant: 64 holds the presets' top_k = 50; a larger k bisects.
TOP_K_BLOCKS = (64,)
FILTER_BLOCK_V = 256  # entries per step of the top-k pass: tl.topk's sorting network over 1024 spilled registers

if triton is not None:
    _BISECT_STEPS = tl.constexpr(33)  # the interval between the integer images of -inf and a finite max is < 2**33
    _NEG_INF_KEY = tl.constexpr(-2139095041)  # the order-preserving integer image of -inf (0xFF800000 ^ 0x7FFFFFFF)
    _FILTER_BLOCK_V = tl.constexpr(FILTER_BLOCK_V)

    @triton.jit
    def _masked_block(Logits_row, Stop_row, v0, V, S, inv_t, active, thr, BLOCK_V: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        """Block [v0, v0 + BLOCK_V) of a row: logits / t; -inf past V, on the row's stop tokens when active, and below
        the filter threshold thr (-inf: no filter)."""
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(Logits_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        offs_s = tl.arange(0, BLOCK_S)
        stop = tl.load(Stop_row + offs_s, mask=offs_s < tl.where(active, S, 0), other=-1)  # [BLOCK_S]
        is_stop = tl.sum((offs[:, None] == stop[None, :]).to(tl.int32), axis=1) > 0
        x = tl.where(is_stop | (x < thr), float("-inf"), x)
        return offs, x + 0.0  # + 0.0 turns -0.0 into +0.0: the bisection's integer image must see them equal

    @triton.jit
    def _key_to_float(key):
        """Inverse of the order-preserving map fp32 -> int (negative floats: all bits but the sign flipped)."""
        bits = key.to(tl.int32)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)

    @triton.jit
    def _float_key(x):
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    @triton.jit
    def _bisect_top_k(row, stop_row, V, S, inv_t, active, m, k, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
        """The k-th largest x of the row (k <= V): the largest pivot with at least k values >= it."""
        lo = tl.full([], _NEG_INF_KEY, tl.int64)  # every value is >= -inf
        hi = _float_key(m) + 1  # no value is >= anything above the max
        for _ in range(_BISECT_STEPS):
            mid = lo + (hi - lo) // 2
            pivot = _key_to_float(mid)
            count = 0
            for v0 in range(0, V, BLOCK_V):
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, float("-inf"), BLOCK_V, BLOCK_S)
                count += tl.sum((x >= pivot).to(tl.int32), axis=0)
            ok = count >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        return _key_to_float(lo)

    @triton.jit
    def _bisect_top_p(row, stop_row, V, S, inv_t, active, m, z, tau_k, top_p, BLOCK_V: tl.constexpr,
                      BLOCK_S: tl.constexpr):
        """The smallest pivot whose mass above it (p = e^(x - m) / z over x >= tau_k) is < top_p."""
        lo = tl.full([], _NEG_INF_KEY, tl.int64)  # the mass above -inf is all of it: >= top_p < 1
        hi = _float_key(m)  # nothing lies above the max
        for _ in range(_BISECT_STEPS):
            mid = lo + (hi - lo) // 2
            pivot = _key_to_float(mid)
            mass = 0.0
            for v0 in range(0, V, BLOCK_V):
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, tau_k, BLOCK_V, BLOCK_S)
                mass += tl.sum(tl.where(x > pivot, tl.exp(x - m) / z, 0.0), axis=0)
            ok = mass < top_p
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        return _key_to_float(hi)

    @triton.jit
    def _filter_threshold(row, stop_row, V, S, inv_t, active, k, top_p, BLOCK_V: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        """tau = max(tau_k, tau_p) of the module docstring (-inf when the row has neither filter)."""
        use_buffer = (k > 0) & (k <= BLOCK_K)
        # Pass A: the row max and, for a k the buffer holds, the running top BLOCK_K values (sorted, largest first).
        top = tl.full([BLOCK_K], float("-inf"), tl.float32)
        m = float("-inf")
        for v0 in range(0, V, _FILTER_BLOCK_V):
            offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, float("-inf"), _FILTER_BLOCK_V, BLOCK_S)
            bm = tl.max(x, axis=0)
            m = tl.maximum(m, bm)
            if use_buffer & (bm > tl.min(top, axis=0)):
                top = tl.topk(tl.cat(top, tl.topk(x, BLOCK_K)), BLOCK_K)
        idx = tl.arange(0, BLOCK_K)
        tau_k = tl.full([], float("-inf"), tl.float32)
        if use_buffer:
            tau_k = tl.max(tl.where(idx == k - 1, top, float("-inf")), axis=0)
        elif k > 0:
            tau_k = _bisect_top_k(row, stop_row, V, S, inv_t, active, m, tl.minimum(k, V), BLOCK_V, BLOCK_S)
        tau = tau_k
        if top_p < 1.0:
            # z: the softmax denominator over x >= tau_k (ties past the buffer included).
            z = 0.0
            for v0 in range(0, V, BLOCK_V):
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, tau_k, BLOCK_V, BLOCK_S)
                z += tl.sum(tl.exp(x - m), axis=0)
            if use_buffer:
                # Sorted values: mass before position i = cumsum - p; a tied group starts where that mass is the sum
                # of strictly larger values, and the threshold keeps the whole group.
                p = tl.where(top >= tau_k, tl.exp(top - m) / z, 0.0)
                before = tl.cumsum(p, axis=0) - p
                tau_p = tl.min(tl.where((top >= tau_k) & (before < top_p), top, float("inf")), axis=0)
            else:
                tau_p = _bisect_top_p(row, stop_row, V, S, inv_t, active, m, z, tau_k, top_p, BLOCK_V, BLOCK_S)
            tau = tl.maximum(tau_k, tau_p)
        return tau

    @triton.jit
    def _sample_rows_kernel(Logits, Temperature, U, Stop_ids, Stop_active, Top_k, Top_p, Tokens, Logp, stride_l,
                            stride_s, V, S, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        t = tl.load(Temperature + b)
        greedy = t <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, t)
        active = tl.load(Stop_active + b) != 0
        row = Logits + b * stride_l
        stop_row = Stop_ids + b * stride_s
        thr = float("-inf")
        if BLOCK_K > 0:  # filter variant: Top_k / Top_p are read only here
            thr = _filter_threshold(row, stop_row, V, S, inv_t, active, tl.load(Top_k + b), tl.load(Top_p + b),
                                    BLOCK_V, BLOCK_S, BLOCK_K)
        # Pass 1: running max (online softmax), its rescaled sum, and the first argmax.
        m = float("-inf")
        total = 0.0
        arg = 0
        for v0 in range(0, V, BLOCK_V):
            offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, thr, BLOCK_V, BLOCK_S)
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
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, thr, BLOCK_V, BLOCK_S)
                mass += tl.sum(tl.exp(x - lse), axis=0)
            target = (tl.load(U + b) * mass).to(tl.float32)
            # Pass 3: the first token whose cumulative mass exceeds target; `last` (the last token with mass seen)
            # covers a target that rounding pushed up to the total.
            cum = 0.0
            found = 0  # int flag: 1 once a block crossed target
            last = arg
            for v0 in range(0, V, BLOCK_V):
                offs, x = _masked_block(row, stop_row, v0, V, S, inv_t, active, thr, BLOCK_V, BLOCK_S)
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


def _num_warps(filtered: bool, block_s: int) -> int:
    return FILTER_NUM_WARPS.get(block_s, NUM_WARPS) if filtered else NUM_WARPS


def block_k(max_top_k: int | None) -> int:
    """The Triton filter variant's buffer size for a batch whose largest top_k is max_top_k (None: unknown, the
    smallest buffer; rows above it bisect). Host-side: the caller knows its rows' settings without a device read."""
    fits = [b for b in TOP_K_BLOCKS if max_top_k is not None and max_top_k <= b]
    return fits[0] if fits else TOP_K_BLOCKS[0]


@on_tensor_device
def sample_rows_fwd(logits, temperature, u, stop_ids, stop_active, top_k=None, top_p=None, max_top_k=None):
    """Triton launcher; arguments as in `sample_rows` (stop_ids [B, S] int64, stop_active [B] bool, all given;
    top_k / top_p both given for the filter variant, or both None)."""
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
    filtered = top_k is not None
    if filtered:
        top_k, top_p = top_k.to(torch.int32).contiguous(), top_p.float().contiguous()
    else:  # unread by the BLOCK_K = 0 variant
        top_k, top_p = tokens, logp
    _sample_rows_kernel[(B,)](logits, temperature.float().contiguous(), u.double().contiguous(), stop_ids, active,
                              top_k, top_p, tokens, logp, logits.stride(0), stop_ids.stride(0), V, S,
                              BLOCK_V=BLOCK_V, BLOCK_S=_block_s(S), BLOCK_K=block_k(max_top_k) if filtered else 0,
                              num_warps=_num_warps(filtered, _block_s(S)), num_stages=NUM_STAGES)
    return tokens, logp


def aot_specs():
    """(name, kernel, signature, constexprs, options) for `python -m dash_kernels.aot`: up to 2 stop ids per row
    (Qwen2.5-Instruct's <|im_end|> and <|endoftext|>) and up to 4; without filters and with each TOP_K_BLOCKS
    buffer. Sampler logits are fp32; bf16 logits only without filters."""
    specs = []
    for dt in ("fp32", "bf16"):
        for k_block in (0, *TOP_K_BLOCKS) if dt == "fp32" else (0,):
            sig = {"Logits": f"*{dt}", "Temperature": "*fp32", "U": "*fp64", "Stop_ids": "*i64",
                   "Stop_active": "*i8", "Top_k": "*i32" if k_block else "*i64",
                   "Top_p": "*fp32", "Tokens": "*i64", "Logp": "*fp32", "stride_l": "i32", "stride_s": "i32",
                   "V": "i32", "S": "i32", "BLOCK_V": "constexpr", "BLOCK_S": "constexpr", "BLOCK_K": "constexpr"}
            for stops in (2, 4):
                tag = f",k{k_block}" if k_block else ""
                specs.append((f"sample_rows[{dt},s{_block_s(stops)}{tag}]", _sample_rows_kernel, sig,
                              {"BLOCK_V": BLOCK_V, "BLOCK_S": _block_s(stops), "BLOCK_K": k_block},
                              {"num_warps": _num_warps(k_block > 0, _block_s(stops)), "num_stages": NUM_STAGES}))
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


def filter_threshold_ref(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The reference of the top-k / top-p threshold (module docstring): the row keeps x >= tau.

    Args:
        x: (B, V) fp32 logits / temperature, stop tokens already -inf.
        top_k: (B,) long, 0 = off; top_p: (B,) fp32 in (0, 1], 1 = off.
    Returns:
        (B,) fp32 tau (-inf: keeps every token).
    """
    B, V = x.shape
    neg_inf = torch.full((B,), float("-inf"), device=x.device)
    if B == 0:
        return neg_inf
    k = torch.where(top_k > 0, top_k.clamp(max=V), 0)  # [B]
    use_p = top_p < 1
    # The sorted prefix any row reads: its k values, or the whole row for top-p without top-k.
    width = V if bool((use_p & (k == 0)).any()) else max(int(k.max()), 1)
    ranked = x.topk(width, dim=1).values  # [B, width] largest first
    tau_k = torch.where(k > 0, ranked.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1), neg_inf)  # [B]
    if not bool(use_p.any()):
        return tau_k
    m = ranked[:, :1]  # [B, 1] row max
    z = torch.where(x >= tau_k[:, None], (x - m).exp(), 0.0).sum(dim=1, keepdim=True)  # [B, 1] over all ties too
    kept = ranked >= tau_k[:, None]  # [B, width]
    probs = torch.where(kept, (ranked - m).exp() / z, 0.0)
    before = probs.cumsum(dim=1) - probs  # the top token always has 0 < top_p before it
    tau_p = ranked.masked_fill(~(kept & (before < top_p[:, None])), float("inf")).amin(dim=1)  # [B]
    return torch.where(use_p, torch.maximum(tau_k, tau_p), tau_k)


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


def processed_logp_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                       top_p: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) fp32 processed log-probs (-inf on removed tokens) of stop-masked logits (B, V): temperature (0 ->
    processed at 1), then the top-k / top-p threshold. What the sampler draws from and the trainer recomputes."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    x = logits / t[:, None]  # [B, V]
    if top_k is not None:
        x = x.masked_fill(x < filter_threshold_ref(x, top_k, top_p)[:, None], float("-inf"))
    return x.log_softmax(dim=1)


def sample_rows_ref(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor, stop_ids: torch.Tensor,
                    stop_active: torch.Tensor, top_k: torch.Tensor | None = None,
                    top_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of `sample_rows` (same arguments and results)."""
    logits = mask_stop_tokens(logits, stop_ids, stop_active)
    greedy = temperature <= 0
    logp = processed_logp_ref(logits, temperature, top_k, top_p)  # [B, V]
    return sample_from_logp(logp, greedy if bool(greedy.any()) else None, u)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor, stop_ids: torch.Tensor | None = None,
                stop_active: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
                top_p: torch.Tensor | None = None, max_top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: (B, V) fp32 raw logits.
        temperature: (B,) fp32; 0 = greedy.
        u: (B,) float64 uniforms in (0, 1), one per row (dash.engine.logits_processing.uniforms_at).
        stop_ids: (B, S) int64 stop tokens, -1 padded; None = no stop mask.
        stop_active: (B,) bool, mask row b's stop tokens; None = no row.
        top_k: (B,) int64, 0 = off; top_p: (B,) fp32 in (0, 1], 1 = off; None (both) = no filter.
        max_top_k: a host-side bound on top_k (picks the Triton kernel's buffer; None: the smallest, rows above it
            bisect). Never read from the device: the decode step stays free of host syncs.
    Returns:
        (tokens (B,) int64, logp (B,) fp32 under the processed distribution).
    """
    B, dev = logits.shape[0], logits.device
    if stop_ids is None or stop_active is None:
        stop_ids = torch.empty(B, 0, dtype=torch.long, device=dev)
        stop_active = torch.zeros(B, dtype=torch.bool, device=dev)
    if (top_k is None) != (top_p is None):
        raise ValueError("sample_rows: give top_k and top_p together (top_k 0 / top_p 1 turn one off), or neither")
    # The per-row inputs follow the logits (no-ops when the caller already built them there, as the engine does).
    temperature, u, stop_ids, stop_active = (t.to(dev) for t in (temperature, u, stop_ids, stop_active))
    if top_k is not None:
        top_k, top_p = top_k.to(dev), top_p.to(dev)
    if use_triton_kernel(logits):
        return sample_rows_fwd(logits, temperature, u, stop_ids, stop_active, top_k, top_p, max_top_k)
    if use_cpu_kernel(logits, temperature):
        filters = () if top_k is None else (top_k.contiguous(), top_p.float().contiguous())
        return torch.ops.dash.sample_rows(logits.contiguous(), temperature.contiguous(), u.double().contiguous(),
                                          stop_ids.contiguous(), stop_active.contiguous(), *filters)
    return sample_rows_ref(logits, temperature, u, stop_ids, stop_active, top_k, top_p)


if HAS_C:
    @torch.library.register_fake("dash::sample_rows")
    def _sample_rows_fake(logits, temperature, u, stop_ids, stop_active, top_k=None, top_p=None):
        B = logits.shape[0]
        return logits.new_empty(B, dtype=torch.long), logits.new_empty(B)

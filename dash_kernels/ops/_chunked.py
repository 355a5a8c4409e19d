"""The chunked pure-torch backend: the streaming algorithm of the Triton kernels, written with torch ops.

This is what CPU users (and the DASH CPU trainer) run. One function, `sweep`, walks the selected rows in chunks of R
rows. For each chunk it forms the fp32 logits tile `z = (h W^T + b) / tau` ([R, V], the only large buffer; R is chosen
so that it stays under _CHUNK_BYTES) and then works on it in place:

    z <- log p = log_softmax(z)           logp = log p[y],  lse = z[y] - logp,  H = -sum_j p_j log p_j

and, when a gradient is wanted, overwrites the tile with the logits gradient

    dz_j = [c (1[j = y] - p_j) - cH p_j (log p_j + H)] / tau          (c = dL/dlogp, cH = dL/dH)

before the two GEMMs dH[rows] = dz W and dW += dz^T h (fp32 accumulation). Three GEMMs per chunk in total (6NHV FLOPs,
as many as the naive path), because the per-row coefficients c, cH are asked for (via `coef_fn`) as soon as the
chunk's log-probs are known. When they are not known until later (the plain `token_logprobs` op), the backward calls
`sweep` again with the saved entropy and recomputes the tile (8NHV).

The entropy (a metric of the loss) needs p and log p at once. When the dH GEMM runs anyway it is read off that GEMM's
output instead (row i of dz W is c (w_y - sum_v p_v w_v), so sum_v p_v z_v = h . sum_v p_v w_v costs an [R, H] dot),
which keeps the forward+backward sweep at one tile and no extra pass. Otherwise (no gradient, or an entropy gradient)
it goes through a smaller scratch tile (_SCRATCH_BYTES).

Why whole-chunk torch ops rather than cache-sized row groups: on a shared 2-core machine every parallel torch op pays
a thread wake-up cost of milliseconds when the cores are busy, so a few large ops beat many small ones; and ATen's
fused log_softmax kernel (max, sum of exp and the write in one op) is about 3x faster than max / sub / exp / sum.
Why one tile rather than two (z and log p): the memory budget then buys twice the rows per GEMM, and all three GEMMs
are noticeably faster at R = 256 than at 128 (the naive path runs them at M = N).

Rows that carry no gradient are simply not passed in `rows`: they cost nothing, forward or backward. Indexing uses
per-row slices and `gather`, never a flattened N*V offset, so it is int64-safe by construction.
"""

import torch

_CHUNK_BYTES = 128 * 2**20
"""Budget for the [R, V] fp32 tile: R = this / (4 V), 216 rows at V = 151936, the only large buffer of the
forward+backward sweep. Bounds peak memory (the naive path holds ~3 GiB of N x V buffers at N = 2048 there) while
keeping each GEMM at R > 200 rows: at R = 160 the three GEMMs ran 9% slower than at 256 on this CPU, enough to lose
to the naive path's M = 2048 GEMMs."""
_SCRATCH_BYTES = 16 * 2**20
"""Scratch tile for the passes that need p and log p together (entropy without a gradient, entropy gradient):
27 rows at V = 151936. Byte-sized, not row-sized, so that a small vocabulary does not turn into hundreds of ops."""
_MIN_ROWS = 16
"""Never fewer rows per GEMM than this: below it the dW GEMM (inner size R) loses most of its efficiency."""
_WEIGHT_BLOCK = 8192
"""Non-fp32 weights are upcast to fp32 this many vocab rows at a time, never as a whole [V, H] copy."""


def chunk_rows(n_rows: int, vocab: int, budget: int = _CHUNK_BYTES) -> int:
    """Rows per GEMM chunk: one fp32 [R, V] tile fits `budget` bytes; a multiple of 8, at least _MIN_ROWS."""
    rows = max(_MIN_ROWS, (budget // (4 * max(vocab, 1))) // 8 * 8)
    return max(1, min(rows, n_rows))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight_blocks(weight: torch.Tensor):
    """(start, stop, block in the accumulation dtype) over the vocab: fp32/fp64 weights in one piece, 16-bit
    weights upcast block by block."""
    V, acc = weight.shape[0], acc_dtype(weight.dtype)
    if weight.dtype == acc:
        yield 0, V, weight
        return
    for start in range(0, V, _WEIGHT_BLOCK):
        stop = min(V, start + _WEIGHT_BLOCK)
        yield start, stop, weight[start:stop].to(acc)


def _logits_tile(z, h32, weight, bias, inv_temp):
    """z[R, V] <- (h32 @ weight^T + bias) * inv_temp, in place (the scale rides on the GEMM's alpha for free)."""
    for start, stop, w32 in _weight_blocks(weight):
        zb = z[:, start:stop]  # [R, Vb]
        if bias is None:
            zb.addmm_(h32, w32.t(), beta=0.0, alpha=inv_temp)  # beta=0: the old contents are ignored, even NaN
        else:
            zb.copy_(bias[start:stop].expand_as(zb))
            zb.addmm_(h32, w32.t(), beta=inv_temp, alpha=inv_temp)


def _dh_tile(dz, weight, out=None):
    """dz [R, V] @ W -> [R, H] in dz's dtype (into `out` when given and the dtypes allow it)."""
    if weight.dtype == dz.dtype and out is not None and out.dtype == dz.dtype:
        return torch.mm(dz, weight, out=out)
    acc = torch.zeros(dz.shape[0], weight.shape[1], dtype=dz.dtype, device=dz.device)  # [R, H]
    for start, stop, w32 in _weight_blocks(weight):
        acc.addmm_(dz[:, start:stop], w32)
    return acc


def _dw_db(dz, h32, weight, dw, db, first, keep=None):
    """dW += dz^T h and db += sum_rows dz (rows where `keep` is False left out), fp32 accumulation.
    `first`: dw and db are still uninitialised (saves a 4 V H-byte memset: the first GEMM overwrites them)."""
    if keep is not None:
        h32 = h32 * keep.unsqueeze(1)  # a copy: h32 may be a view of the caller's hidden
    if dw is not None:
        V = dw.shape[0]
        step = V if weight.dtype == dz.dtype else _WEIGHT_BLOCK
        for start in range(0, V, step):
            dw[start:start + step].addmm_(dz[:, start:start + step].t(), h32, beta=0.0 if first else 1.0)
    if db is not None:
        col = dz.sum(0) if keep is None else torch.mv(dz.t(), keep)
        if first:
            db.copy_(col)
        else:
            db += col


def _inplace_log_softmax_works() -> bool:
    """ATen's row-wise log_softmax reads each row before writing it, so out= may alias the input. Checked once,
    since that is an implementation property rather than a documented guarantee."""
    try:
        x = torch.linspace(-3.0, 5.0, 2 * 1000).reshape(2, 1000)
        expected = torch.log_softmax(x, 1)
        torch.ops.aten._log_softmax.out(x, 1, False, out=x)
        return bool(torch.allclose(x, expected, atol=1e-6))
    except Exception:  # noqa: BLE001 (any failure means: use the copying path)
        return False


_INPLACE_LOG_SOFTMAX = _inplace_log_softmax_works()


def _log_softmax_(z):
    """z <- log_softmax(z, dim=1), in place when ATen allows it (no [R, V] temporary)."""
    if _INPLACE_LOG_SOFTMAX:
        torch.ops.aten._log_softmax.out(z, 1, False, out=z)
    else:
        z.copy_(torch.log_softmax(z, 1))


def _entropy_pass(log_p, scratch, leave_p=False):
    """Per row of log_p [r, V]: S = sum p and H' = -sum (p / S) log p, with p = exp(log p), via the scratch tile.

    ATen's fused log_softmax sums the V exponentials in vector lanes, so at V ~ 1.5e5 its normaliser is off by ~1e-5:
    a common shift of every log p, which S measures (log p - log S is the better log-prob, H' + log S the better
    entropy) and which cancels in the gradient as long as it uses p / S and log p + H' from the same pass. torch's
    sum is pairwise (a bmm row-dot was 7x less accurate). With leave_p, log_p is overwritten by p on the way (saves
    the exp pass of a gradient that needs no log p afterwards)."""
    r, sub = log_p.shape[0], scratch.shape[0]
    S = torch.empty(r, dtype=log_p.dtype, device=log_p.device)
    plp = torch.empty_like(S)
    for s0 in range(0, r, sub):
        lp = log_p[s0:s0 + sub]
        p = torch.exp(lp, out=scratch[: lp.shape[0]])
        S[s0:s0 + sub] = p.sum(1)
        if leave_p:
            plp[s0:s0 + sub] = lp.mul_(p).sum(1)
            lp.copy_(p)
        else:
            plp[s0:s0 + sub] = p.mul_(lp).sum(1)
    return S, -plp / S


def sweep(hidden, weight, bias, targets, rows, inv_temp, *, coef_fn=None, saved=None, want_entropy=True,
          entropy_grad=True, need_dh=False, need_dw=False, need_db=False):
    """Streams over `rows` of hidden @ weight^T; returns per-row statistics and, with `coef_fn`, the gradients.

    Args:
        hidden: [N, H]. weight: [V, H]. bias: [V] or None. targets: [N] int64 (valid on the selected rows).
        rows: [n] int64 row ids to process, or None for all N rows (then no gather/scatter copies are made).
        inv_temp: 1 / temperature.
        coef_fn: None (forward only) or f(lo, hi, logp [r]) -> (c [r], cH [r] or None): dL/dlogp and dL/dentropy
            for the selected rows lo:hi, called once per chunk as soon as their logp is known (the entropy is not
            needed for them: a loss that contains the entropy adds that term afterwards, from the returned entropy).
        saved: None, or entropy [n] from an earlier forward: recompute mode (backward of token_logprobs).
        want_entropy: compute the entropy (forward mode).
        entropy_grad: whether coef_fn may return an entropy gradient cH; False lets the sweep leave p in the tile
            while it computes the entropy, saving a pass.
        need_dh, need_dw, need_db: which gradients to accumulate (only with coef_fn).
    Returns:
        logp [n], lse [n], entropy [n] (for the selected rows; entropy is 0 unless computed), dh [N, H] (hidden's
        dtype, zero on rows not selected) or None, dw [V, H] or None, db [V] or None; all but dh in fp32 (fp64
        for fp64 inputs).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    n = N if rows is None else rows.numel()
    acc = acc_dtype(hidden.dtype)
    logp = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    entropy = torch.zeros(n, dtype=acc, device=dev)
    grad = coef_fn is not None
    want_entropy = want_entropy and saved is None
    entropy_grad = entropy_grad and grad
    # dw/db are overwritten by the first chunk's GEMM (beta = 0), dh by its rows when every row is processed.
    alloc_w = torch.empty if n else torch.zeros
    alloc_h = torch.empty if rows is None else torch.zeros
    dh = alloc_h(N, H, dtype=hidden.dtype, device=dev) if grad and need_dh else None
    dw = alloc_w(V, H, dtype=acc, device=dev) if grad and need_dw else None
    db = alloc_w(V, dtype=acc, device=dev) if grad and need_db else None
    if n == 0:
        return logp, lse, entropy, dh, dw, db

    R = chunk_rows(n, V)
    R = -(-n // -(-n // R))  # same rows per chunk (a short last chunk would run its GEMMs inefficiently)
    sub_rows = max(1, min(R, _SCRATCH_BYTES // (4 * V)))
    z_buf = torch.empty(R, V, dtype=acc, device=dev)  # logits -> log p -> logits gradient
    scratch = None  # [sub_rows, V], only when the entropy or its gradient is needed
    for lo in range(0, n, R):
        hi = min(n, lo + R)
        sl = slice(lo, hi)
        rows_chunk = None if rows is None else rows[sl]  # [r]
        h = hidden[sl] if rows is None else hidden.index_select(0, rows_chunk)  # [r, H]
        h32 = h.to(acc)
        y = (targets[sl] if rows is None else targets.index_select(0, rows_chunk)).unsqueeze(1)  # [r, 1]
        z = z_buf[: hi - lo]  # [r, V]
        _logits_tile(z, h32, weight, bias, inv_temp)
        z_y = z.gather(1, y).squeeze(1)  # [r]
        # z <- log p. Both modes redo the log_softmax rather than use z - lse: lse ~ 15 carries a rounding error of
        # ~1e-6 that z - lse would pass to every p (and to 1 - p of a confident token).
        _log_softmax_(z)
        logp[sl] = z.gather(1, y).squeeze(1)
        S = neg_plp = None  # [r]: sum p and H' = -sum (p / S) log p, when a pass computed them
        p_in_z = False
        derive = grad and want_entropy and not entropy_grad and dh is not None
        if (want_entropy and not derive) or entropy_grad:
            scratch = scratch if scratch is not None else torch.empty(sub_rows, V, dtype=acc, device=dev)
            p_in_z = grad and not entropy_grad  # the gradient will need p but not log p: leave p in z
            S, neg_plp = _entropy_pass(z, scratch, leave_p=p_in_z)
            if saved is None:
                log_s = S.log()
                logp[sl] -= log_s
                entropy[sl] = neg_plp + log_s
        elif derive:
            z.exp_()  # p (up to the factor S)
            p_in_z = True
            S = z.sum(1)
            logp[sl] -= S.log()
        if saved is not None:
            entropy[sl] = saved[sl]
        lse[sl] = z_y - logp[sl]
        if not grad:
            continue
        c, cH = coef_fn(lo, hi, logp[sl])
        c = c * inv_temp  # [r]; dL/d(h W^T + b) = dL/dz / tau
        fake = None
        if derive:
            # The entropy comes out of the dH GEMM below (no extra pass over the tile): row i of dz W is
            # c (w_y - sum_v p_v w_v / S), hence sum p z / S. Rows with c = 0 (e.g. clipped) get c = 1 for that GEMM
            # and are then left out of dH, dW and db.
            fake = c == 0
            c = torch.where(fake, torch.ones_like(c), c)
            pb = torch.mv(z, bias.to(acc)) / S if bias is not None else None  # sum_v p_v b_v / S
        c = c.unsqueeze(1)  # [r, 1]
        if cH is None:
            if not p_in_z:
                z.exp_()  # p (up to the factor S)
            if S is None:
                S = z.sum(1)
            z.mul_(-c / S.unsqueeze(1))  # -c p / S
        else:
            # -(p / S) (c + cH (log p + H')): p and log p both needed, so sub-tile through the scratch.
            assert not p_in_z, "coef_fn returned an entropy gradient after entropy_grad=False"
            cH = (cH * inv_temp).unsqueeze(1)
            scale = (-1.0 / S).unsqueeze(1)
            for s0 in range(0, hi - lo, sub_rows):
                s1 = min(hi - lo, s0 + sub_rows)
                lp = z[s0:s1]
                p = torch.exp(lp, out=scratch[: s1 - s0])
                lp.add_(neg_plp[s0:s1].unsqueeze(1)).mul_(cH[s0:s1]).add_(c[s0:s1]).mul_(p)
                lp.mul_(scale[s0:s1])
        z.scatter_add_(1, y, c)
        if dh is not None:
            direct = rows_chunk is None and dh.dtype == acc
            dh_rows = _dh_tile(z, weight, dh[sl] if direct else None)  # [r, H]
            if derive:
                # sum_v p_v z_v / S = inv_temp * (h . (w_y - dH_row / c) + sum_v p_v b_v / S); H = lse - that.
                w_y = weight.index_select(0, y.squeeze(1)).to(acc)  # [r, H]
                pz = torch.linalg.vecdot(h32, w_y - dh_rows / c) + (pb if pb is not None else 0.0)
                entropy[sl] = lse[sl] - inv_temp * pz
            if fake is not None and bool(fake.any()):
                dh_rows[fake] = 0.0
            else:
                fake = None
            if not direct:
                if rows_chunk is None:
                    dh[sl] = dh_rows
                else:
                    dh.index_copy_(0, rows_chunk, dh_rows.to(dh.dtype))
        keep = None if fake is None else (~fake).to(acc)
        _dw_db(z, h32, weight, dw, db, first=lo == 0, keep=keep)
    return logp, lse, entropy, dh, dw, db

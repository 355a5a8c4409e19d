"""Shared test helpers for dash_kernels: the error-relative criterion, input builders, gradient runners.

Criterion (CCE / flash-attn style): for every output and every gradient,
    max |ours - fp64_ref| <= FACTOR * max |torch_fp32_naive - fp64_ref| + atol
with NaN and +-inf in exactly the same places as the fp64 reference.

"torch_fp32_naive" is the materialised-logits fp32 path computed two ways, the reference itself and the same math
with the logits GEMM laid out transposed (W h^T)^T; the naive error is the larger of the two. On small tensors the
plain naive error is sometimes lucky (a handful of values that happen to round well), while a different but equally
valid GEMM blocking (ours runs on row subsets) costs an ulp of a logit, which the conditioning of the loss then
magnifies (1 - exp(ref - logp) when ref ~ logp). The second layout measures that, and no fp32 algorithm beats it.
"""

import math

import torch

from dash_kernels.reference import (
    fused_policy_loss_ref,
    policy_loss,
    token_logprobs_from_logits_ref,
    token_logprobs_ref,
)

FACTOR = 2.0
ATOL_REL = 2e-6  # atol = ATOL_REL * max|ref|: a floor for outputs the naive path happens to get exactly right


def naive_alt_logprobs(hidden, weight, targets, temperature=1.0, bias=None, return_entropy=False,
                       ignore_index=-100, dtype=torch.float32):
    """token_logprobs_ref with the logits GEMM transposed, (W h^T)^T: the second fp32 naive layout."""
    H = hidden.shape[-1]
    logits = torch.mm(weight.to(dtype), hidden.reshape(-1, H).to(dtype).t()).t()  # [N, V]
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits.reshape(*hidden.shape[:-1], weight.shape[0])
    return token_logprobs_from_logits_ref(logits, targets, temperature, return_entropy, ignore_index, dtype)


def naive_alt_loss(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None, *, bias=None,
                   temperature=1.0, ignore_index=-100, dtype=torch.float32, **loss_kwargs):
    """fused_policy_loss_ref on naive_alt_logprobs."""
    logp, entropy = naive_alt_logprobs(hidden, weight, targets, temperature, bias, True, ignore_index, dtype)
    mask = (mask != 0) & (targets != ignore_index)
    return policy_loss(logp, old_logp, advantages, mask, ref_logp, entropy, **loss_kwargs)


def assert_close_to_ref(name, ours, naive, ref, factor=FACTOR, atol=None):
    """Verbose check of the criterion above; the message names the worst indices and values. `naive` may be a
    list of fp32 results (the error is the largest of theirs)."""
    naives = naive if isinstance(naive, (list, tuple)) else [naive]
    dev = ref.device  # compared where the reference lives: a GPU test's [V, H] gradients stay on the GPU
    ours64, ref64 = (t.detach().to(device=dev, dtype=torch.float64) for t in (ours, ref))
    naive64 = naives[0].detach().to(device=dev, dtype=torch.float64)
    assert ours64.shape == ref64.shape, f"{name}: shape {tuple(ours64.shape)} != reference {tuple(ref64.shape)}"
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = test(ours64), test(ref64)
        if not torch.equal(a, b):
            where = (a != b).nonzero()[:5].tolist()
            raise AssertionError(f"{name}: {kind} parity differs from the fp64 reference at {where} "
                                 f"(ours {ours64[a != b][:5].tolist()}, ref {ref64[a != b][:5].tolist()})")
    finite = torch.isfinite(ref64)
    zero = torch.zeros_like(ref64)
    err = torch.where(finite, (ours64 - ref64).abs(), zero)
    err_naive = torch.stack([torch.where(finite, (n.detach().to(device=dev, dtype=torch.float64) - ref64).abs(), zero)
                             for n in naives]).amax(0)
    scale = torch.where(finite, ref64.abs(), zero).max().item() if ref64.numel() else 0.0
    atol = ATOL_REL * scale + 1e-12 if atol is None else atol
    bound = factor * (err_naive.max().item() if err.numel() else 0.0) + atol
    worst = err.max().item() if err.numel() else 0.0
    if worst > bound:
        flat = err.flatten().topk(min(5, err.numel())).indices
        idx = [tuple(int(i) for i in torch.unravel_index(f, err.shape)) for f in flat]
        detail = ", ".join(f"{i}: ours {ours64[i].item():.8g} ref {ref64[i].item():.8g} naive {naive64[i].item():.8g}"
                           for i in idx)
        raise AssertionError(f"{name}: max|ours - ref| = {worst:.3e} > {factor} * max|naive - ref| "
                             f"({err_naive.max().item():.3e}) + atol ({atol:.1e}); worst at {detail}")


def assert_finite(name, t):
    assert torch.isfinite(t).all(), f"{name} has non-finite values at {(~torch.isfinite(t)).nonzero()[:5].tolist()}"


def run_with_grads(fn, leaves, upstream=None):
    """Calls fn(*leaves) on fresh leaf copies; reduces the outputs with `upstream` weights (or sums a scalar) and
    backpropagates. Returns (outputs, grads) with grads[i] None for leaves that are None or not differentiable."""
    copies = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    outs = fn(*copies)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = 0
    for i, out in enumerate(outs):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            w = upstream[i] if upstream is not None else torch.ones_like(out)
            total = total + (out * w.to(out.dtype)).sum()
    if isinstance(total, torch.Tensor):
        total.backward()
    grads = [None if c is None or not c.requires_grad else c.grad for c in copies]
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], grads


def logprob_runner(hidden, weight, targets, bias, temperature, entropy, upstream):
    """`run(fn, dtype=None) -> (outputs, grads)` for a token_logprobs-shaped `fn` on these inputs: hidden, weight and
    bias cast to `dtype` (and `dtype=` passed on) when given, outputs weighted by `upstream` and back-propagated."""
    def run(fn, dtype=None):
        def f(h, w, bb):
            extra = {} if dtype is None else {"dtype": dtype}
            cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
            out = fn(cast(h), cast(w), targets, temperature, cast(bb), entropy, **extra)
            return out if entropy else (out,)
        return run_with_grads(f, [hidden, weight, bias], upstream)
    return run


def linear_inputs(N, H, V, seed=0, bias=False, ignore_frac=0.0, dtype=torch.float32, logit_scale=3.0):
    """hidden [N, H], weight [V, H], targets [N] (some = -100), bias [V] or None. Logits have std ~logit_scale,
    so the softmax is peaked like a trained LM's, and targets are drawn from it (realistic log-probs)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (logit_scale / math.sqrt(H))
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    logits = hidden @ weight.t() + (b if b is not None else 0)
    targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1) if N else \
        torch.zeros(0, dtype=torch.long)
    if ignore_frac:
        targets[torch.rand(N, generator=g) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), targets, cast(b)


def loss_inputs(B, L, H, V, seed=0, bias=False, per_token_adv=False, zero_adv_frac=0.25, mask_frac=0.2,
                dtype=torch.float32):
    """A GRPO-like micro-batch: hidden [B, L, H], weight, targets [B, L], advantages, mask, old and ref log-probs
    near the current ones (so ratios straddle the clip range), bias."""
    hidden, weight, targets, b = linear_inputs(B * L, H, V, seed, bias, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    hidden, targets = hidden.reshape(B, L, H), targets.reshape(B, L)
    with torch.no_grad():
        logp = token_logprobs_ref(hidden, weight, targets, bias=b, dtype=torch.float64)
    old = (logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)).to(dtype)
    ref = (logp + 0.2 * torch.randn(B, L, generator=g, dtype=torch.float64)).to(dtype)
    adv_shape = (B, L) if per_token_adv else (B,)
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    adv[torch.rand(adv_shape, generator=g) < zero_adv_frac] = 0.0
    adv[torch.rand(adv_shape, generator=g) < 0.15] *= 0.05  # some |A| below a 0.1 threshold, but not zero
    mask = torch.rand(B, L, generator=g) >= mask_frac
    if L > 1:
        mask[:, 0] = True  # every sequence has at least one completion token...
    if B > 2:
        mask[1] = False  # ...except one, fully masked
    return {"hidden": hidden, "weight": weight, "targets": targets, "advantages": adv.to(dtype), "mask": mask,
                "old_logp": old, "ref_logp": ref, "bias": b}


def check_loss_against_ref(ours_fn, inp, **kw):
    """Runs ours / fp32 naive / fp64 reference of the fused loss on the same inputs and applies the criterion to
    the loss, every gradient and the metrics. ours_fn has fused_policy_loss's signature."""
    def call(fn, dtype=None):
        extra = {} if dtype is None else {"dtype": dtype}

        def f(hidden, weight, bias):
            cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
            loss, metrics = fn(cast(hidden), cast(weight), inp["targets"], cast(inp["advantages"]), inp["mask"],
                               cast(inp["old_logp"]), cast(inp["ref_logp"]), bias=cast(bias), **extra, **kw)
            call.metrics = metrics
            return loss

        outs, grads = run_with_grads(f, [inp["hidden"], inp["weight"], inp["bias"]])
        return outs[0], grads, call.metrics

    ours, g_ours, m_ours = call(ours_fn)
    naive, g_naive, _ = call(fused_policy_loss_ref, torch.float32)
    naive_p, g_naive_p, _ = call(naive_alt_loss, torch.float32)
    ref, g_ref, m_ref = call(fused_policy_loss_ref, torch.float64)
    assert ours.dtype == torch.float32
    assert_close_to_ref("loss", ours, [naive, naive_p], ref)
    for name, a, b, bp, c in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_naive, g_naive_p, g_ref):
        if c is not None:
            assert a is not None, f"{name} missing"
            assert_close_to_ref(name, a, [b, bp], c)
    for key, val in m_ref.items():
        assert abs(float(m_ours[key]) - float(val)) <= 1e-5 * (1 + abs(float(val))), \
            f"metric {key}: ours {float(m_ours[key])} ref {float(val)}"
    return ours, g_ours, m_ours

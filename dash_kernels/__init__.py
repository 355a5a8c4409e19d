"""dash_kernels: standalone fused kernels for RL fine-tuning (usable in any trainer).

Imports flow one way: csrc (compiled into dash_kernels._C) <- dash_kernels <- dash.
This package imports only torch, triton and its own _C; never dash or transformers.

Log-prob / policy-loss API (tensors and plain scalars only; see each docstring for shapes):
    token_logprobs(hidden, weight, targets, temperature=1.0, bias=None, return_entropy=False, ignore_index=-100)
    token_logprobs_from_logits(logits, targets, temperature=1.0, return_entropy=False, ignore_index=-100)
    fused_policy_loss(hidden, weight, targets, advantages, mask, old_logp=None, ref_logp=None, *, loss_type=...)
    policy_loss(logp, old_logp, advantages, mask, ref_logp=None, entropy=None, *, loss_type=...)   (reference math)
Backend: dash_kernels.backend (DASH_KERNELS_BACKEND=triton|torch|reference).

Sampler (inference-only) ops, one module each: dash_kernels.kv (store_kv, copy_pages), dash_kernels.paged_attention,
dash_kernels.rms_norm (rms_norm, add_rms_norm_), dash_kernels.rotary (rotary_), dash_kernels.sample_rows (sample_rows),
dash_kernels.silu_mul (silu_mul_): C++ for fp32 CPU (not silu_mul_: torch's ops are as fast there), Triton kernels on
CUDA, the torch references elsewhere (and whenever a gradient is needed); dash_kernels.linear (pack_linear,
linear_packed, pack_gate_up, gate_up_silu_packed): AVX-512 GEMMs on packed weights, fp32 CPU only;
dash_kernels.decoder_layer (decoder_layer_, pack_layer): one C++ call per layer on fp32 CPU.
"""

from dash_kernels.torch_floor import check_torch_version

check_torch_version()  # an older torch fails here, naming the version and the fix (not at its first bf16 step)

from dash_kernels._ext import HAS_C, require_c  # noqa: E402 (after the version check)
from dash_kernels.ops.logprobs_from_logits import token_logprobs_from_logits  # noqa: E402
from dash_kernels.ops.policy_loss import fused_policy_loss  # noqa: E402
from dash_kernels.ops.token_logprobs import token_logprobs  # noqa: E402
from dash_kernels.reference import LOSS_TYPES, policy_loss  # noqa: E402

# The sampler ops' modules register the fake kernels of the torch.ops.dash ops that _C registered on import, so that
# torch.compile / opcheck can trace every op once the package is imported (decoder_layer imports the other op modules).
from dash_kernels import decoder_layer, sample_rows  # noqa: E402, F401

__all__ = [
    "HAS_C",
    "LOSS_TYPES",
    "fused_policy_loss",
    "policy_loss",
    "require_c",
    "token_logprobs",
    "token_logprobs_from_logits",
]

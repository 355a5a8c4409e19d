"""TRL adapter: run `GRPOTrainer`'s policy loss through `dash_kernels.fused_policy_loss` (optional extra: trl).

    from dash_kernels.integrations.trl import DashGRPOTrainer      # a GRPOTrainer subclass, same arguments
    trainer = DashGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

    # or, on a trainer you already built:
    from dash_kernels.integrations.trl import use_dash_loss
    use_dash_loss(trainer)

What changes: the loss step takes the backbone's last hidden states and the lm_head weight, and computes the
log-probs, the PPO-clip / KL loss and its gradient in one streaming pass (no [B, L, V] logits, rows with zero
advantage skipped when beta == 0). What stays: generation, rewards, advantages, reference log-probs, logging,
optimizer. The loss value and gradients equal TRL's own `_compute_loss` (tests/kernels/test_trl_adapter.py checks
them on CPU); the normaliser TRL uses for each loss type is passed as `normalizer`:

    grpo     TRL: mean over sequences / grad-accum steps        -> normalizer = B * accum
    bnpo     TRL: sum / max(1, mask tokens) / grad-accum steps   -> normalizer = max(1, mask tokens) * accum
    dr_grpo  TRL: sum / (B * max_completion_length) / accum      -> normalizer = B * max_completion_length * accum
    dapo     TRL: sum / (num_items_in_batch / processes * accum / steps_per_generation)

Configurations outside that (other loss types, sequence-level importance sampling, off-policy masks, entropy
quantile masks or bonus, vLLM importance-sampling correction, MoE aux loss, logit scaling or
softcapping, multimodal inputs, sharded DTensor heads) fall back to TRL's own loss, with a one-time warning naming
the reason. A `peft` model (GRPOTrainer's `peft_config`, or a PeftModel passed in) runs its backbone with the
adapters in it; the lm_head weight is read as is (TRL itself refuses an adapter on the lm_head for the same reason).
This module imports trl only when a trainer is built or patched.
"""

import types
import warnings

import torch

from dash_kernels.ops.policy_loss import fused_policy_loss

_SUPPORTED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def unsupported_reason(trainer, inputs=None):
    """Why this trainer (and batch) cannot use the fused loss, or None when it can."""
    text_config = trainer.model.config.get_text_config()
    checks = [
        (trainer.loss_type not in _SUPPORTED_LOSSES, f"loss_type={trainer.loss_type!r}"),
        (trainer.importance_sampling_level != "token", "importance_sampling_level='sequence'"),
        (trainer.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
        (trainer.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
        (trainer._entropy_bonus_enabled, "entropy bonus (its normaliser differs per loss type)"),
        (trainer.use_vllm and trainer.vllm_importance_sampling_correction, "vLLM importance-sampling correction"),
        (trainer.aux_loss_enabled, "MoE router aux loss"),
        (getattr(text_config, "final_logit_softcapping", None) is not None, "final_logit_softcapping"),
        (any(getattr(text_config, k, None) not in (None, 1.0) for k in ("logit_scale", "output_multiplier",
                                                                        "lm_head_multiplier", "logits_scaling")),
         "scaled logits"),
    ]
    if inputs is not None:
        checks.append((any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS), "multimodal inputs"))
    return next((why for bad, why in checks if bad), None)


def _backbone(model):
    """The decoder stack whose output has `last_hidden_state`: HF's `base_model`. Under peft, `model.base_model` is
    peft's LoraModel, whose forward runs the whole LM (logits, no hidden states): take the wrapped HF model's own
    backbone instead, which holds the injected LoRA layers, so the adapters still run and train."""
    get_base_model = getattr(model, "get_base_model", None)  # peft.PeftModel
    return (get_base_model() if callable(get_base_model) else model).base_model


def _normalizer(trainer, inputs, mask, training):
    """TRL's denominator for its loss type, as the step normaliser of fused_policy_loss."""
    accum = trainer.current_gradient_accumulation_steps if training else 1.0
    B = mask.shape[0]
    if trainer.loss_type == "grpo":
        return float(B * accum)
    if trainer.loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * accum
    if trainer.loss_type == "dr_grpo":
        return float(B * trainer.max_completion_length * accum)
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes  # dapo
    if training:
        normalizer = normalizer * accum / trainer.args.steps_per_generation
    return normalizer


def dash_compute_loss(trainer, model, inputs):
    """Drop-in for `GRPOTrainer._compute_loss(model, inputs)`; falls back to TRL's when unsupported."""
    reason = unsupported_reason(trainer, inputs)
    if reason is None and trainer.accelerator.unwrap_model(model) is not model:
        # DDP / DeepSpeed / FSDP1 wrappers: running the backbone outside the wrapper's forward would skip its
        # gradient synchronisation (and a ZeRO-3 lm_head is an empty partition outside that forward).
        reason = f"a wrapped model ({type(model).__name__})"
    lm_head = model.get_output_embeddings() if reason is None else None
    if reason is None and type(lm_head.weight).__name__ == "DTensor":
        reason = "sharded (DTensor) lm_head"
    if reason is None and (getattr(lm_head.weight, "ds_id", None) is not None or lm_head.weight.numel() == 0):
        reason = "partitioned (DeepSpeed ZeRO-3) lm_head"
    if reason is not None:
        if not getattr(trainer, "_dash_fallback_warned", False):
            warnings.warn(f"dash_kernels: falling back to TRL's loss ({reason} is not supported by the fused path)")
            trainer._dash_fallback_warned = True
        return trainer._trl_compute_loss(model, inputs)

    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    K = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    training = trainer.model.training
    with trainer.accelerator.autocast():
        hidden = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state  # [B, P + K, H]
    hidden = hidden[:, -K - 1:-1].to(lm_head.weight.device)  # the positions that predict the completion tokens
    weight = lm_head.weight
    hidden = hidden.to(weight.dtype)
    loss, metrics = fused_policy_loss(
        hidden, weight, completion_ids, inputs["advantages"], mask, inputs.get("old_per_token_logps"),
        inputs.get("ref_per_token_logps") if trainer.beta != 0.0 else None, bias=lm_head.bias,
        loss_type=trainer.loss_type, eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high,
        delta=trainer.args.delta, beta=trainer.beta,
        kl_bias_correction=bool(getattr(trainer.args, "use_bias_correction_kl", False)),
        temperature=trainer.temperature,
        normalizer=_normalizer(trainer, inputs, mask, training))
    mode = "train" if training else "eval"
    gather = trainer.accelerator.gather
    trainer._metrics[mode]["entropy"].append(gather(metrics["loss/entropy"].reshape(1)).nanmean().item())
    trainer._metrics[mode]["clip_ratio/region_mean"].append(gather(metrics["loss/clip_frac"].reshape(1))
                                                            .nanmean().item())
    if trainer.beta != 0.0:
        trainer._metrics[mode]["kl"].append(gather(metrics["loss/kl"].reshape(1)).nanmean().item())
    return loss


def use_dash_loss(trainer):
    """Patches one GRPOTrainer instance in place to use the fused loss; returns it."""
    trainer._trl_compute_loss = types.MethodType(type(trainer)._compute_loss, trainer)  # the fallback
    trainer._compute_loss = types.MethodType(dash_compute_loss, trainer)
    return trainer


def __getattr__(name):
    # DashGRPOTrainer is built on first access so that importing this module does not import trl.
    if name == "DashGRPOTrainer":
        from trl import GRPOTrainer  # optional dependency (extra `trl`): only this class needs it

        class DashGRPOTrainer(GRPOTrainer):
            """GRPOTrainer whose policy loss runs through dash_kernels.fused_policy_loss (see module docstring)."""

            def _trl_compute_loss(self, model, inputs):
                return GRPOTrainer._compute_loss(self, model, inputs)

            def _compute_loss(self, model, inputs):
                return dash_compute_loss(self, model, inputs)

        globals()["DashGRPOTrainer"] = DashGRPOTrainer
        return DashGRPOTrainer
    raise AttributeError(name)

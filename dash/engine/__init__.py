"""The paged-KV sampler: `generate(model, tokenizer, prompts, n, params)` (see dash/engine/generation.py)."""

from dash.engine.generation import generate
from dash.engine.sequence import Completion, RequestOutput, SamplingParams

__all__ = ["generate", "SamplingParams", "Completion", "RequestOutput"]

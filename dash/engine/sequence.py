"""Request and sequence state of one `generate` call: sampling parameters, the per-sequence table, the outputs.

All sequences of a call are known up front (prompts x n), so their state lives in one `SequenceTable` of [N] / [N, M]
tensors indexed by sequence id, not in N Python objects: a decode step reads and writes it with a handful of tensor
ops whatever the batch size. Python-level work per step is limited to sequences that finish (and to requests with
stop strings, which need text).

Sequence ids: request r, sample g -> seq_id = r * n + g. The sampling stream of a sequence is keyed by (request seed,
g), so a sample does not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dash.engine.logits_processing import stream_keys

_SEED_RANGE = 2**31  # per-request seeds drawn from torch's global RNG when a request gives none


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to sample one request's completions (vLLM / HF meanings)."""

    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: keep the most likely tokens whose mass before them is < top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    min_new_tokens: int = 0
    """Stop tokens are masked out until this many tokens were generated."""
    max_new_tokens: int = 64
    """Completion length limit (also capped by the model's context)."""
    stop_token_ids: list[int] | None = None
    """Tokens that end a completion (kept in the output); None -> the tokenizer's / model's EOS."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion; the text is cut before the match, the token ids keep the matching token."""
    seed: int | None = None
    """Seed of this request's sampling streams; None draws one from torch's global generator."""

    def check(self, where: str) -> None:
        """ValueError naming the request (`where`) and the limit."""
        if self.temperature < 0:
            raise ValueError(f"{where}: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{where}: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"{where}: top_k must be >= 0, got {self.top_k}")
        if self.min_new_tokens < 0 or self.max_new_tokens < 1:
            raise ValueError(f"{where}: need min_new_tokens >= 0 and max_new_tokens >= 1, got "
                             f"{self.min_new_tokens} and {self.max_new_tokens}")
        if isinstance(self.stop, (str, bytes)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"{where}: stop must be a list of non-empty strings (e.g. [\"\\n\\n\"]), got "
                             f"{self.stop!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"{where}: seed must be in [0, 2**63), got {self.seed}")


@dataclass(slots=True)
class Completion:
    """One sampled completion.

    Attributes:
        prompt_index: which prompt of the call; sample_index: which of its n samples.
        token_ids: generated tokens (a final stop token included).
        text: decoded completion (special tokens kept; cut before a matched stop string).
        finish_reason: "stop" (stop token or string) or "length" (max_new_tokens or the model's context).
        logprobs: [len(token_ids)] log-prob of each token under the processed distribution it was drawn from
            (temperature, top-k, top-p, min-tokens mask; temperature 0 -> the top-k/top-p-filtered softmax).
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]


@dataclass(slots=True)
class RequestOutput:
    """The n completions of one prompt; indexable and iterable like the list `completions`."""

    prompt_index: int
    prompt_token_ids: list[int]
    completions: list[Completion]

    def __getitem__(self, i: int) -> Completion:
        return self.completions[i]

    def __len__(self) -> int:
        return len(self.completions)

    def __iter__(self):
        return iter(self.completions)


@dataclass(slots=True)
class BatchRows:
    """Per-row parameters of one batch, gathered once: the scheduler hands out the same seq_ids tensor for every
    decode step in which no sequence joins or leaves, so sampling and `record` reuse these instead of ~10 gathers (and
    device copies) per step.

    Attributes:
        seq_ids: (R,) long, the batch these rows belong to (compared by identity).
        max_new: (R,) long; stop_ids: (R, S) long, -1 padded; both on the CPU (for `record`).
        temperature, top_p: (R,) fp32; top_k: (R,) long; device_stop_ids: stop_ids; all on the sampling device.
        min_new: (R,) long on the CPU, or None when no row has min_new_tokens (no stop-token mask to apply).
        keys: (R,) uint64 sampling-stream keys (`sampling.stream_keys`).
        greedy: (R,) bool on the device, or None when no row has temperature 0.
    """

    seq_ids: torch.Tensor
    max_new: torch.Tensor
    stop_ids: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    device_stop_ids: torch.Tensor
    min_new: torch.Tensor | None
    keys: np.ndarray
    greedy: torch.Tensor | None


class SequenceTable:
    """Per-sequence state as tensors, row = seq_id (see module docstring). `device`: where sampling runs."""

    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], n: int, max_model_len: int,
                 default_stop_ids: list[int], device: torch.device | str = "cpu") -> None:
        self.n, self.prompts, self.device = n, prompts, torch.device(device)
        N = len(prompts) * n
        self.num_seqs = N
        req = torch.arange(N) // n  # [N] request of each sequence
        self.request = req
        self.prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)[req]  # [N]
        # The context caps the completion: position prompt_len + max_new - 1 must exist.
        max_new = [min(p.max_new_tokens, max_model_len - len(ids)) for p, ids in zip(params, prompts)]
        self.max_new = torch.tensor(max_new, dtype=torch.long)[req]  # [N]
        self.min_new = torch.tensor([p.min_new_tokens for p in params], dtype=torch.long)[req]
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)[req]
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)[req]
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)[req]
        self.any_filter = bool((self.top_k > 0).any() or (self.top_p < 1).any())
        self.max_top_k = int(self.top_k.max()) if N else 0  # host-side: sizes the Triton sampler's top-k buffer
        seeds = [p.seed if p.seed is not None else int(torch.randint(_SEED_RANGE, ())) for p in params]
        self.seed = torch.tensor(seeds, dtype=torch.long)[req]  # [N]
        self.sample = torch.arange(N) % n  # [N]
        stops = [p.stop_token_ids if p.stop_token_ids is not None else default_stop_ids for p in params]
        width = max(1, max(len(s) for s in stops))
        table = torch.tensor([list(s) + [-1] * (width - len(s)) for s in stops], dtype=torch.long)  # [R, S]
        self.stop_ids = table[req]  # [N, S] padded with -1
        self.has_stop_ids = bool((table >= 0).any())
        self.stop_strings = [p.stop for p in params]
        self.has_stop_strings = any(self.stop_strings)
        M = int(self.max_new.max())
        self.num_gen = torch.zeros(N, dtype=torch.long)  # [N] tokens generated so far
        self.tokens = torch.zeros(N, M, dtype=torch.long)  # [N, M] generated tokens
        self.logprobs = torch.zeros(N, M, dtype=torch.float32)  # [N, M]
        self.finish_reason: list[str | None] = [None] * N
        self.stop_text_cut: dict[int, int] = {}  # seq_id -> text length to keep (stop string matched)
        self._rows: BatchRows | None = None  # of the last batch (see `rows`)

    def full_tokens(self, seq_id: int) -> list[int]:
        """Prompt + generated tokens (what an evicted sequence recomputes). Read-only: may be the prompt itself."""
        prompt, k = self.prompts[seq_id // self.n], int(self.num_gen[seq_id])
        return prompt + self.tokens[seq_id, :k].tolist() if k else prompt

    def rows(self, seq_ids: torch.Tensor) -> BatchRows:
        """The per-row parameters of a batch, gathered once per distinct seq_ids tensor (see BatchRows)."""
        if self._rows is None or self._rows.seq_ids is not seq_ids:
            dev, stop = self.device, self.stop_ids[seq_ids]  # [B, S]
            temp, min_new = self.temperature[seq_ids], self.min_new[seq_ids]
            greedy = temp == 0
            self._rows = BatchRows(seq_ids, self.max_new[seq_ids], stop, temp.to(dev), self.top_k[seq_ids].to(dev),
                                   self.top_p[seq_ids].to(dev), stop.to(dev), min_new if bool(min_new.any()) else None,
                                   stream_keys(self.seed[seq_ids], self.sample[seq_ids]),
                                   greedy.to(dev) if bool(greedy.any()) else None)
        return self._rows

    def record(self, seq_ids: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Append one sampled token per sequence; returns the [B] bool mask of sequences that just finished."""
        rows = self.rows(seq_ids)
        step = self.num_gen[seq_ids]  # [B]
        self.tokens[seq_ids, step] = tokens
        self.logprobs[seq_ids, step] = logprobs
        step = step + 1
        self.num_gen[seq_ids] = step
        done = step >= rows.max_new  # [B]
        is_stop = None
        if self.has_stop_ids:
            is_stop = (tokens[:, None] == rows.stop_ids).any(1)  # [B]
            done |= is_stop
        finished = done.nonzero().flatten().tolist()  # usually empty: Python work only for sequences that finish
        if finished:
            ids, stops = seq_ids.tolist(), (is_stop.tolist() if is_stop is not None else [False] * len(done))
            for i in finished:
                self.finish_reason[ids[i]] = "stop" if stops[i] else "length"
        return done

    def outputs(self, tokenizer) -> list[RequestOutput]:
        """Per prompt, its n completions in sample order."""
        out = [RequestOutput(r, list(p), []) for r, p in enumerate(self.prompts)]
        # Whole tables to lists once: per-row tensor slicing costs ~5 us a row (1+ ms at 256 sequences).
        num_gen, tokens, logprobs = self.num_gen.tolist(), self.tokens.tolist(), self.logprobs.tolist()
        for s in range(self.num_seqs):
            k = num_gen[s]
            ids = tokens[s][:k]
            text = tokenizer.decode(ids) if tokenizer is not None else ""
            if s in self.stop_text_cut:
                text = text[: self.stop_text_cut[s]]
            reason = self.finish_reason[s] or "length"
            out[s // self.n].completions.append(Completion(s // self.n, s % self.n, ids, text, reason, logprobs[s][:k]))
        return out

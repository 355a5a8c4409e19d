"""`benchmarks/rl_transfer.py`'s per-digit diagnostic on hand-made greedy answers (no model)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]


def test_digit_accuracy_counts_positions_among_right_length_answers():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rl_transfer import digit_accuracy

    from dash.tokenizer import EOS_TOKEN

    answers = ["1234", "1234", "1234", "56"]
    texts = ["1234" + EOS_TOKEN, "1294" + EOS_TOKEN, "123" + EOS_TOKEN, "57" + EOS_TOKEN]

    class Sampler:
        def generate(self, prompts, n, seeds, temperature):
            assert temperature == 0.0 and n == 1 and len(prompts) == len(texts)
            return [SimpleNamespace(completions=[SimpleNamespace(text=t)]) for t in texts]

    trainer = SimpleNamespace(sampler=Sampler(), test_examples=[SimpleNamespace(prompt=f"p{i}", answer=a)
                                                                 for i, a in enumerate(answers)])
    stats = digit_accuracy(trainer)
    # 4-digit: 1 of 3 exact; "123" has the wrong length, so digits are over the 2 right-length answers
    assert stats[4] == {"n": 3, "acc": 1 / 3, "digits": [1.0, 1.0, 0.5, 1.0]}
    assert stats[2] == {"n": 1, "acc": 0.0, "digits": [1.0, 0.0]}

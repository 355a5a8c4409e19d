"""Stand-in for "your own data": jsonl files of prompt, solution and answer for two-digit addition.

    python examples/walkthrough/make_data.py --out runs/walkthrough/data

writes train.jsonl (SFT solutions and RL prompts) and test.jsonl (held out). Each row:
{"prompt": "12+34=", "solution": "46", "answer": "46"}. `solution` is what SFT imitates, `answer` what the reward
checks; in a real data set the solution would be a worked derivation ending in the answer.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TRAIN_ROWS = 2000
TEST_ROWS = 200


def rows(rng: random.Random, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append({"prompt": f"{a}+{b}=", "solution": str(a + b), "answer": str(a + b)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for name, count in (("train.jsonl", TRAIN_ROWS), ("test.jsonl", TEST_ROWS)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows(rng, count)))
    print(f"wrote {TRAIN_ROWS} train and {TEST_ROWS} test rows to {out}")


if __name__ == "__main__":
    main()

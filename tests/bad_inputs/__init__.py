"""The bad-input matrix (issue 19, sections 4 and 5), grouped by kind: config, data, model and tokenizer, rewards, CLI.

Every case is an input a careless user (or a hostile completion) can give a run. Each either fails before any work
with an error that names the key, file or limit, or is handled (skipped, scored 0) and counted while the run goes on.
The code sandbox's attacks (tests/rewards/) and the run folder / checkpoint cases (tests/rl/) are tested apart.

Run: .venv/bin/python -m pytest -q tests/bad_inputs
"""

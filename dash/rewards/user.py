"""Reward functions from the user's own code: `--data.reward=path/to/file.py:function` or `package.module:function`.

Purpose: a TRL or verl user brings a reward function in a Python file; it should work here unchanged, next to the
built-in names and in sums with them (`math+my_rewards.py:brevity`). Loading runs the user's code (the file is
imported, top-level statements and all): that is expected, the file is part of the user's own config, but never point
`data.reward` at a file you would not run.

Two forms, told apart once at start-up from `inspect.signature`:
- TRL form, `fn(prompts, completions, **columns) -> list[float | None]`, called once per batch with keyword arguments,
  as TRL's GRPOTrainer calls it: `prompts` (the rendered prompts, one per completion), `completions` (texts),
  `completion_ids` (token ids) and the dataset row's other fields as lists, one entry per completion. A function is in
  this form when it has a parameter named `completions`, or takes only keywords (`**kwargs`, no required positional).
  Its parameters without a default (other than prompts / completions / completion_ids) name dataset columns that every
  row must carry, checked when the data loads (`check_columns`). `None` in the list means "no reward for this sample"
  (TRL's meaning): it scores 0 and is counted in `RewardStats.no_reward`, not as a failure.
- Per-sample form, `fn(completion, answer) -> float`, the form of the built-in rewards: any other function that can be
  called with two positional arguments. `answer` is the row's gold answer after the reward's answer parser.

Design limits: a file is loaded as a standalone module (its folder is not put on sys.path: use the
`package.module:function` form for code that imports its neighbours); `+` separates the terms of a sum, so a path cannot
contain `+`; TRL's `trainer_state` argument is not provided (a function that requires it is refused at start).

Run the tests: `python -m pytest tests/rewards/test_user_reward.py -q`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

# Keyword arguments a TRL-form call passes itself; dataset columns of these names are not passed (as in TRL).
CALL_ARGS = ("prompts", "completions", "completion_ids")
# Row fields TRL keeps out of the columns it passes ("prompt" arrives as `prompts`).
EXCLUDED_COLUMNS = ("prompt", "completion", "completion_ids", *CALL_ARGS)
_MODULE_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # package.module
_NAME_RE = re.compile(r"[A-Za-z_]\w*")
_MAX_NAMES_SHOWN = 12  # in "no such function" errors: enough to spot a typo, short enough for one line


class RewardSpecError(ValueError):
    """A `data.reward` term cannot be used; the message names the file or module, the function and the problem."""


@dataclass(frozen=True, slots=True)
class LoadedReward:
    """One reward function and how to call it.

    Attributes:
        fn: the function.
        form: "batch" (TRL form) or "sample" (`fn(completion, answer)`).
        where: "file /abs/path.py, function f" or "module pkg.mod, function f", for messages.
        required: dataset columns the batch form needs (parameters without a default).
        accepts: keyword names a batch-form call may pass; None when it takes `**kwargs` (everything).
    """

    fn: Callable
    form: Literal["batch", "sample"]
    where: str
    required: tuple[str, ...] = ()
    accepts: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "reward")


def is_user_term(term: str) -> bool:
    """True for `file.py:function` and `package.module:function` terms (built-in names have no colon)."""
    return ":" in term


def describe(fn: Callable, where: str) -> LoadedReward:
    """Tell the form of `fn` from its signature (module docstring); RewardSpecError if it is neither."""
    if not callable(fn):
        raise RewardSpecError(f"{where}: is a {type(fn).__name__}, not callable")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise RewardSpecError(f"{where}: its signature cannot be read ({exc})") from None
    kinds = inspect.Parameter
    var_kw = any(p.kind is kinds.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    required_positional = [p for p in params if p.default is p.empty
                           and p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if any(p.name == "completions" for p in named) or (var_kw and not required_positional):
        positional_only = [p.name for p in params if p.kind is kinds.POSITIONAL_ONLY and p.default is p.empty]
        if positional_only:  # TRL passes everything by keyword
            raise RewardSpecError(f"{where}: TRL-form rewards are called with keyword arguments only, but "
                                  f"{positional_only} are positional-only")
        required = tuple(p.name for p in named if p.default is p.empty and p.name not in CALL_ARGS)
        if "trainer_state" in required:
            raise RewardSpecError(f"{where}: requires `trainer_state` (TRL's TrainerState), which dash does not "
                                  "provide; give it a default (trainer_state=None)")
        return LoadedReward(fn, "batch", where, required, None if var_kw else tuple(p.name for p in named))
    try:
        inspect.signature(fn).bind("completion", "answer")
    except TypeError:
        signature = f"{getattr(fn, '__name__', 'fn')}{inspect.signature(fn)}"
        raise RewardSpecError(
            f"{where}: wrong signature {signature}: expected TRL's fn(prompts, completions, **columns) -> "
            "list[float | None] (a parameter named `completions`) or the per-sample fn(completion, answer) -> float"
        ) from None
    return LoadedReward(fn, "sample", where)


_FILE_CACHE: dict[tuple[str, int], Any] = {}  # (resolved path, mtime_ns) -> module: load each file once


def _load_file(path_text: str, func: str) -> tuple[Any, str]:
    path = Path(path_text).expanduser()
    where = f"file {path}, function {func}"
    if not path.is_file():
        raise RewardSpecError(f"{where}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    path = path.resolve()
    where = f"file {path}, function {func}"
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _FILE_CACHE:
        # A name of its own per file, registered in sys.modules while it runs (dataclasses and pickle look it up).
        name = f"_dash_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise RewardSpecError(f"{where}: Python cannot load this file (is it a .py file?)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- any failure of user code: one line naming it
            sys.modules.pop(name, None)
            raise RewardSpecError(f"{where}: importing the file failed: {type(exc).__name__}: {exc}") from None
        _FILE_CACHE[key] = module
    return _FILE_CACHE[key], where


def _load_module(module_name: str, func: str) -> tuple[Any, str]:
    where = f"module {module_name}, function {func}"
    try:
        return importlib.import_module(module_name), where
    except ModuleNotFoundError as exc:
        ours = exc.name is not None and (module_name + ".").startswith(exc.name + ".")  # not one it imports
        missing = f"no such module {exc.name!r}" if ours else f"ModuleNotFoundError: {exc}"
        raise RewardSpecError(f"{where}: importing the module failed: {missing}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- any failure of user code: one line naming it
        raise RewardSpecError(f"{where}: importing the module failed: {type(exc).__name__}: {exc}") from None


def load_user_reward(term: str) -> LoadedReward:
    """`path/to/file.py:function` or `package.module:function` -> the function and its form (RewardSpecError)."""
    target, _, func = term.strip().rpartition(":")
    if not target or not _NAME_RE.fullmatch(func):
        raise RewardSpecError(f"{term!r}: expected path/to/file.py:function or package.module:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module, where = _load_file(target, func)
    elif _MODULE_RE.fullmatch(target):
        module, where = _load_module(target, func)
    else:
        raise RewardSpecError(f"{term!r}: {target!r} is neither a .py file nor a package.module name")
    if not hasattr(module, func):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        shown = ", ".join(public[:_MAX_NAMES_SHOWN]) + (", ..." if len(public) > _MAX_NAMES_SHOWN else "")
        raise RewardSpecError(f"{where}: no such function (callables there: {shown or 'none'})")
    return describe(getattr(module, func), where)


def example_columns(example: Any) -> Mapping[str, Any]:
    """The dataset fields of one example: a file row's fields (`Example.columns`), or a built-in example's dataclass
    fields; the prompt is not among them (it is passed as `prompts`)."""
    columns = getattr(example, "columns", None)
    if columns is not None:
        return columns
    if is_dataclass(example):
        return {f.name: getattr(example, f.name) for f in fields(example) if f.name not in ("prompt", "row", "columns")}
    return {"answer": example.answer}


def check_columns(rewards: Sequence[LoadedReward], examples: Sequence[Any], source: str) -> None:
    """RewardSpecError naming the function, the column and the first row without it, if a batch-form reward needs a
    column some row of `source` lacks."""
    for reward in rewards:
        for column in reward.required:
            for example in examples:
                columns = example_columns(example)
                if column in EXCLUDED_COLUMNS or column not in columns:
                    row = getattr(example, "row", None)
                    at = f"row {row}" if row is not None else "an example"
                    why = (f"{column!r} is passed as `prompts`, not as a column" if column in EXCLUDED_COLUMNS
                           else f"{at} has no field {column!r}; its fields: {sorted(columns)}")
                    raise RewardSpecError(f"{reward.where}: needs the dataset column {column!r} (a parameter without "
                                          f"a default), but in {source} {why}")

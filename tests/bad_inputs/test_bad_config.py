"""Config: every bad `--section.key=value` override and YAML file is a ConfigError naming the key (or file:line) and
the limit, raised by `load_config` before any work; text fields take the override's text as given."""

from __future__ import annotations

import typing

import pytest

from dash.config import ConfigError, DataConfig, load_config

# (override or tuple of overrides, regex the message must match). Grouped by section; each names the key and, where
# there is one, the limit.
BAD_OVERRIDES = [
    # log
    ("--log.eval_every=-1", r"log\.eval_every must be >= 0, got -1"),
    ("--log.ckpt_every=-5", r"log\.ckpt_every must be >= 0, got -5"),
    ("--log.eval_pass_k=-1", r"log\.eval_pass_k must be >= 0, got -1"),
    ("--log.samples_shown=-2", r"log\.samples_shown must be >= 0, got -2"),
    ("--log.log_every=-1", r"log\.log_every must be >= 0, got -1"),
    ("--log.out_dir=", r"log\.out_dir must not be empty"),
    ("--log.tensorboard=maybe", r"log\.tensorboard: expected bool"),
    ("--log.eval_every=1.5", r"log\.eval_every: expected int"),
    # sampling
    (("--sampling.min_new_tokens=9", "--sampling.max_new_tokens=8"),
     r"sampling\.min_new_tokens=9 must be < sampling\.max_new_tokens=8: no completion could stop with EOS"),
    (("--sampling.min_new_tokens=8", "--sampling.max_new_tokens=8"), r"sampling\.min_new_tokens=8 must be < "),
    ("--sampling.temperature=-0.1", r"sampling\.temperature must be >= 0"),
    ("--sampling.temperature=nan", r"sampling\.temperature: must be a finite number"),
    ("--sampling.temperature=.inf", r"sampling\.temperature: must be a finite number"),
    ("--sampling.top_p=0", r"sampling\.top_p must be in \(0, 1\]"),
    ("--sampling.top_p=1.5", r"sampling\.top_p must be in \(0, 1\], got 1\.5"),
    ("--sampling.top_k=-1", r"sampling\.top_k.* must be >= 0"),
    ("--sampling.min_new_tokens=-1", r"sampling\.min_new_tokens.* must be >= 0"),
    ("--sampling.num_pages=-1", r"sampling\.num_pages must be >= 0"),
    ("--sampling.page_size=0", r"sampling\.page_size must be >= 1, got 0"),
    ("--sampling.max_new_tokens=0", r"sampling\.max_new_tokens must be >= 1, got 0"),
    # data
    ("--data.prompt_template={unclosed", r"data\.prompt_template '\{unclosed' is invalid"),
    ("--data.prompt_template=Solve it.", r"data\.prompt_template 'Solve it\.' is invalid: it names no field"),
    ("--data.prompt_template={0}", r"data\.prompt_template '\{0\}' is invalid"),
    ("--data.prompt_template={prompt.nope}", r"data\.prompt_template .* is invalid: .*'nope'"),
    ("--data.reward=nope", r"data\.reward: 'nope' is not one of"),
    ("--data.reward=math+", r"data\.reward: '' is not one of"),
    ("--data.reward_timeout_s=0", r"data\.reward_timeout_s must be in \(0, 1e\+06\]"),
    ("--data.reward_timeout_s=1e12", r"data\.reward_timeout_s must be in \(0, 1e\+06\]"),
    ("--data.max_prompt_tokens=-3", r"data\.max_prompt_tokens must be >= 0"),
    ("--data.test_size=0", r"data\.test_size must be >= 1"),
    ("--data.arith_digits=9", r"data\.arith_digits must be in \[1, 4\]"),
    ("--data.arith_form=a-b", r"data\.arith_form: 'a-b' is not one of"),
    ("--data.chat_template=maybe", r"data\.chat_template: 'maybe' is not one of"),
    ("--data.task=csv", r"data\.task: 'csv' is not one of"),
    ("--data.task=jsonl", r"data\.train_path is required when data\.task='jsonl'"),
    ("--data.task=parquet", r"data\.train_path is required when data\.task='parquet'"),
    ("--data.strict=2", r"data\.strict: expected bool"),
    # train
    ("--train.steps=0", r"train\.steps must be >= 1, got 0"),
    ("--train.steps=1e3", r"train\.steps: expected int, got str"),
    ("--train.steps=[1]", r"train\.steps: expected int, got list"),
    ("--train.lr=0", r"train\.lr must be > 0"),
    ("--train.lr=abc", r"train\.lr: expected float, got str 'abc'"),
    ("--train.lr=[", r"--train\.lr=\[: not a value"),
    ("--train.lr='", r"--train\.lr=': not a value"),
    ("--train.lr=nan", r"train\.lr: must be a finite number"),
    ("--train.group_size=1", r"train\.group_size must be >= 2"),
    ("--train.micro_batch_size=6", r"train\.micro_batch_size \(6\) must be a multiple of train\.group_size \(4\)"),
    ("--train.ppo_minibatches=1000", r"train\.ppo_minibatches=1000 must be <= the step's samples .* = 256"),
    ("--train.ppo_epochs=0", r"train\.ppo_epochs must be >= 1"),
    ("--train.prompts_per_step=0", r"train\.prompts_per_step must be >= 1"),
    ("--train.algorithm=ppo", r"train\.algorithm: 'ppo' is not one of"),
    ("--train.parallel=zero3", r"train\.parallel: 'zero3' is not one of"),
    ("--train.old_logp=foo", r"train\.old_logp: 'foo' is not one of"),
    ("--train.weight_decay=-1", r"train\.weight_decay.* must be >= 0"),
    ("--train.grad_clip=-1", r"grad_clip.* must be >= 0"),
    ("--train.token_budget=-1", r"token_budget must be >= 0"),
    # loss
    ("--loss.adv_threshold=1.5", r"loss\.adv_threshold=1\.5 must be below 1\.5, the largest \|advantage\| a group "
                                 r"of train\.group_size=4"),
    (("--loss.adv_threshold=0.8", "--train.group_size=2"), r"loss\.adv_threshold=0\.8 must be below 0\.7071"),
    ("--loss.eps_low=-0.1", r"loss\.eps_low.* must be >= 0"),
    ("--loss.beta=1e400", r"loss\.beta: must be a finite number"),
    ("--loss.loss_type=ppo", r"loss\.loss_type: 'ppo' is not one of"),
    ("--loss.normalizer=local", r"loss\.normalizer: 'local' is not one of"),
    # model, sft, and settings that only clash together
    ("--model.dtype=float64", r"model\.dtype: 'float64' is not one of"),
    ("--model.dtype=float16", r"model\.dtype=float16 is not supported"),
    ("--model.device=tpu", r"model\.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("--model.device=cuda:abc", r"model\.device: 'cuda:abc' is not one of"),
    ("--model.path=", r"model\.path must not be empty"),
    ("--sft.steps=0", r"sft\.steps must be >= 1"),
    ("--sft.lr=0", r"sft\.lr must be > 0"),
    ("--sft.batch_size=0", r"sft\.batch_size must be >= 1"),
    (("--train.parallel=fsdp", "--model.dtype=bfloat16"), r"train\.parallel=fsdp needs model\.dtype=float32"),
    # the override's own shape
    ("--train.lrr=1", r"unknown config key train\.lrr"),
    ("--trian.lr=1", r"unknown config key trian"),
    ("train.lr", r"must look like --section\.key=value"),
    ("--train.lr", r"must look like --section\.key=value"),
    ("--train=3", r"must look like --section\.key=value"),
    ("--train.lr.x=1", r"train\.lr: expected float, got dict"),
    ("--model.path.x=1", r"model\.path: expected str, got dict"),
]


def _listed(overrides: str | tuple) -> list[str]:
    return [overrides] if isinstance(overrides, str) else list(overrides)


@pytest.mark.parametrize("overrides,match", BAD_OVERRIDES, ids=[" ".join(_listed(o)) for o, _ in BAD_OVERRIDES])
def test_bad_override_names_the_key_and_limit(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, _listed(overrides))


# (override, dotted key, value it must give): text fields take the text as given, others read it as YAML.
GOOD_OVERRIDES = [
    ("--data.prompt_template={prompt}", "data.prompt_template", "{prompt}"),  # the documented default
    ("--data.prompt_template=[{level}] {prompt}\nAnswer:", "data.prompt_template", "[{level}] {prompt}\nAnswer:"),
    ("--data.prompt_template={prompt}: true", "data.prompt_template", "{prompt}: true"),
    ("--log.out_dir=runs/a: b", "log.out_dir", "runs/a: b"),
    ("--model.path=yes", "model.path", "yes"),  # YAML would read a boolean
    ("--data.prompt_field=123", "data.prompt_field", "123"),
    ("--data.train_path=null", "data.train_path", None),
    ("--data.train_path=~/train.jsonl", "data.train_path", "~/train.jsonl"),
    ("--data.reward=math+format", "data.reward", "math+format"),
    ("--train.lr=1e-5", "train.lr", 1e-5),
    ("--sampling.temperature=1", "sampling.temperature", 1.0),
    ("--log.tensorboard=true", "log.tensorboard", True),
    ("--sampling.temperature=0", "sampling.temperature", 0.0),  # `dash sample` / eval may sample greedily
    ("--sampling.min_new_tokens=7", "sampling.min_new_tokens", 7),  # below max_new_tokens=8: the last may be EOS
]


@pytest.mark.parametrize("override,key,value", GOOD_OVERRIDES, ids=[o for o, _, _ in GOOD_OVERRIDES])
def test_good_override_is_read_by_the_fields_type(override, key, value):
    section, name = key.split(".")
    got = getattr(getattr(load_config(None, [override]), section), name)
    assert got == value and type(got) is type(value)


# (YAML file content, regex): the message names the file, and the line where the parser knows it.
BAD_FILES = [
    (b"train:\n  steps: [1\n", r"bad\.yaml:\d+:\d+: YAML error"),
    (b"train:\n\tsteps: 3\n", r"bad\.yaml:2:1: YAML error: found character '\\t'"),
    (b"train:\n  lr: 1.0\n  steps: 3\n  lr: 2.0\n", r"bad\.yaml:4:3: YAML error: key 'lr' given twice \(first on "
                                                     r"line 2\)"),
    (b"train:\n  steps: 3\ntrain:\n  lr: 1.0\n", r"bad\.yaml:3:1: YAML error: key 'train' given twice"),
    (b"train:\n  steps: \xff\n", r"bad\.yaml: not UTF-8 text"),
    (b"- train\n- data\n", r"bad\.yaml: top level must be a mapping of sections"),
    (b"train: 3\n", r"train must be a mapping of keys"),
    (b"data:\n  prompt_template: {prompt}\n", r"data\.prompt_template: expected str, got dict .*quote text"),
    (b"train:\n  steps: '10'\n", r"train\.steps: expected int, got str '10'"),
    (b"trainer:\n  steps: 3\n", r"unknown config key trainer"),
]


@pytest.mark.parametrize("content,match", BAD_FILES, ids=[str(i) for i in range(len(BAD_FILES))])
def test_bad_yaml_file_names_the_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)  # one line, no parser trace


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_config_path_that_is_no_file(tmp_path, kind):
    path = tmp_path / "c.yaml"
    if kind == "folder":
        path.mkdir()
    with pytest.raises(ConfigError, match="does not exist" if kind == "missing" else "is not a file"):
        load_config(path)


def test_empty_and_quoted_yaml_files_load(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == load_config(None)
    (tmp_path / "q.yaml").write_text('data:\n  prompt_template: "{prompt}"\n')
    assert load_config(tmp_path / "q.yaml").data.prompt_template == "{prompt}"


@pytest.mark.parametrize("override,key", [("--sampling.temperature=0", "sampling.temperature=0"),
                                          ("--sampling.top_k=1", "sampling.top_k=1")])
def test_greedy_sampling_is_refused_for_training_only(override, key):
    cfg = load_config(None, [override])  # loads: sampling and evaluation may be greedy
    with pytest.raises(ConfigError, match=rf"{key} samples greedily: .* completions of a prompt would be identical"):
        cfg.check_for_training()
    load_config(None, ["--sampling.temperature=0.7"]).check_for_training()


def test_arith_forms_in_the_config_are_the_tasks():
    from dash.tasks.arith import FORMS

    assert set(typing.get_args(typing.get_type_hints(DataConfig)["arith_form"])) == set(FORMS)

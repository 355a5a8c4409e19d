"""Data paths beyond one file: globs of jsonl/parquet shards and folders written by `datasets`' save_to_disk, read by
dash.data (and so by the RL trainer's data loader), with clear errors for a path that cannot be used."""

import json
import sys
from pathlib import Path

import pytest

from dash.config import ConfigError, DashConfig, DataConfig
from dash.data import DatasetConfig, load_examples, read_records
from dash.data_sources import resolve_source
from dash.rl.task_data import load_task
from dash.rl.trainer import check_before_loading
from dash.runtime import resolve_model_path



def _datasets():
    return pytest.importorskip("datasets", reason="datasets not installed: save_to_disk folders untested here "
                                                  "(pip install datasets, or the `data` extra)")


ROWS = [{"prompt": f"{a}+{a}=", "answer": str(2 * a), "level": a % 3} for a in range(10)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: parquet shards untested here")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _pairs(examples) -> list[tuple[str, str]]:
    return [(e.prompt, e.answer) for e in examples]


def _cfg(path, **kw) -> DatasetConfig:
    return DatasetConfig(path=str(path), **kw)


def test_jsonl_shards_glob_reads_every_shard_in_sorted_order(tmp_path):
    # written out of order: the glob's sorted order, not the file system's, decides the row order
    _write_jsonl(tmp_path / "train-00001.jsonl", ROWS[4:])
    _write_jsonl(tmp_path / "train-00000.jsonl", ROWS[:4])
    _write_jsonl(tmp_path / "other.jsonl", [{"prompt": "not", "answer": "me"}])  # outside the pattern
    examples, stats = load_examples(_cfg(tmp_path / "train-*.jsonl"))
    assert _pairs(examples) == [(r["prompt"], r["answer"]) for r in ROWS]
    assert [e.row for e in examples] == list(range(len(ROWS)))  # 0-based across shards
    assert stats.unit == "row" and stats.rows == len(ROWS) and stats.kept == len(ROWS)
    assert examples[0].columns["level"] == 0  # the rows' other fields reach TRL-form rewards


def test_parquet_shards_glob_equals_the_single_file(tmp_path):
    _write_parquet(tmp_path / "part-0.parquet", ROWS[:3])
    _write_parquet(tmp_path / "part-1.parquet", ROWS[3:])
    whole = _write_jsonl(tmp_path / "all.jsonl", ROWS)
    sharded, stats = load_examples(_cfg(tmp_path / "part-*.parquet"))
    assert _pairs(sharded) == _pairs(load_examples(_cfg(whole))[0]) and stats.kept == len(ROWS)


def test_bad_row_in_a_shard_is_counted_and_strict_names_the_shard_and_line(tmp_path):
    _write_jsonl(tmp_path / "s-0.jsonl", ROWS[:2])
    (tmp_path / "s-1.jsonl").write_text(json.dumps(ROWS[2]) + "\n" + json.dumps({"prompt": "1+1="}) + "\n")
    examples, stats = load_examples(_cfg(tmp_path / "s-*.jsonl"))
    assert len(examples) == 3 and stats.first_rows == {"missing_answer": [3]}  # row 3 across shards
    with pytest.raises(ValueError, match=r"s-1\.jsonl: line 2: missing_answer"):
        load_examples(_cfg(tmp_path / "s-*.jsonl", strict=True))


def test_saved_dataset_folder_reads_like_the_jsonl_file(tmp_path):
    datasets = _datasets()
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    examples, stats = load_examples(_cfg(tmp_path / "saved"))
    assert _pairs(examples) == _pairs(load_examples(_cfg(_write_jsonl(tmp_path / "rows.jsonl", ROWS)))[0])
    assert stats.unit == "row" and [e.row for e in examples] == list(range(len(ROWS)))


def test_saved_dataset_dict_reads_the_configured_split(tmp_path):
    datasets = _datasets()
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:7]),
                          "test": datasets.Dataset.from_list(ROWS[7:])}).save_to_disk(str(folder))
    assert _pairs(load_examples(_cfg(folder))[0]) == [(r["prompt"], r["answer"]) for r in ROWS[:7]]  # default train
    assert _pairs(load_examples(_cfg(folder, split="test"))[0]) == [(r["prompt"], r["answer"]) for r in ROWS[7:]]
    with pytest.raises(ValueError, match=r"data\.split='validation': the DatasetDict in .*dd has the splits "
                                         r"\['train', 'test'\]"):
        resolve_source(folder, split="validation", key="data.train_path", split_key="data.split")


def test_read_records_is_the_public_reader_of_any_source(tmp_path):
    """SFT and eval read their files through read_records / load_examples: every form gives the same records."""
    datasets = _datasets()
    _write_jsonl(tmp_path / "a-0.jsonl", ROWS[:5])
    _write_jsonl(tmp_path / "a-1.jsonl", ROWS[5:])
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    one = [r for _, r in read_records(_write_jsonl(tmp_path / "one.jsonl", ROWS))]
    assert [r for _, r in read_records(str(tmp_path / "a-*.jsonl"))] == one == ROWS
    assert [r for _, r in read_records(tmp_path / "saved")] == ROWS


@pytest.mark.parametrize("case,match", [
    ("no_match", r"data\.train_path: the pattern '.*train-\*\.parquet' matches no file"),
    ("only_folders", r"data\.train_path: the pattern '.*sub\*' matches no file \(only 1 folder\(s\)\)"),
    ("mixed", r"data\.train_path: the pattern '.*shard-\*' matches shards of mixed formats \(.*shard-0\.jsonl is "
              r"read as JSON lines, .*shard-1\.parquet as parquet\)"),
    ("plain_folder", r"data\.train_path: the folder .*plain is not a dataset written by datasets' save_to_disk \(it "
                     r"has no dataset_dict\.json, nor state\.json \+ dataset_info\.json\); for a folder of shards "
                     r"give a glob such as .*plain/\*\.parquet"),
    ("missing", r"data\.train_path: no such file .*nope\.jsonl"),
])
def test_unusable_paths_are_errors_naming_the_key(tmp_path, case, match):
    path = {"no_match": tmp_path / "train-*.parquet", "only_folders": tmp_path / "sub*",
            "mixed": tmp_path / "shard-*", "plain_folder": tmp_path / "plain",
            "missing": tmp_path / "nope.jsonl"}[case]
    (tmp_path / "sub1").mkdir()
    (tmp_path / "plain").mkdir()
    _write_jsonl(tmp_path / "plain" / "rows.jsonl", ROWS)  # shards in a folder: still not a saved dataset
    if case == "mixed":
        _write_jsonl(tmp_path / "shard-0.jsonl", ROWS)
        _write_parquet(tmp_path / "shard-1.parquet", ROWS)
    with pytest.raises(ValueError, match=match):
        resolve_source(path, key="data.train_path")


def test_forced_parquet_format_reads_shards_whatever_their_suffix(tmp_path):
    """data.task=parquet forces the format, so a glob over oddly named parquet shards is not "mixed"."""
    _write_parquet(tmp_path / "shard-0.bin", ROWS[:5])
    _write_parquet(tmp_path / "shard-1.parquet", ROWS[5:])
    source = resolve_source(tmp_path / "shard-*", fmt="parquet", key="data.train_path")
    assert source.kind == "parquet" and [f.name for f in source.files] == ["shard-0.bin", "shard-1.parquet"]


def test_saved_folder_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    datasets = _datasets()
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"data\.train_path: .*saved is a folder written by datasets' save_to_disk; "
                                          r"reading it needs the datasets package: pip install datasets"):
        load_examples(_cfg(tmp_path / "saved"), key="data.train_path")


def test_rl_data_loader_takes_a_glob_and_a_dataset_dict_split(tmp_path):
    """The trainer's loader: train from shards, hold out a saved DatasetDict's `heldout` split via data.test_split."""
    datasets = _datasets()
    _write_jsonl(tmp_path / "train-0.jsonl", ROWS[:5])
    _write_jsonl(tmp_path / "train-1.jsonl", ROWS[5:])
    datasets.DatasetDict({"heldout": datasets.Dataset.from_list(ROWS[:3])}).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(task="jsonl", train_path=str(tmp_path / "train-*.jsonl"), test_path=str(tmp_path / "dd"),
                     test_split="heldout", test_size=3)
    stream, test = load_task(cfg, tokenizer=None)
    assert sorted(_pairs(stream.next_batch(len(ROWS)))) == sorted((r["prompt"], r["answer"]) for r in ROWS)
    assert _pairs(test) == [(r["prompt"], r["answer"]) for r in ROWS[:3]]
    with pytest.raises(ConfigError, match=r"data\.test_split='test': the DatasetDict in .*dd has the splits "
                                          r"\['heldout'\]"):
        load_task(DataConfig(**{**_fields(cfg), "test_split": "test"}), tokenizer=None)


def _fields(cfg: DataConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__slots__}


@pytest.mark.parametrize("key", ["train_path", "test_path"])
def test_trainer_checks_globs_and_folders_before_loading(tmp_path, key):
    _write_jsonl(tmp_path / "train-0.jsonl", ROWS)
    model = resolve_model_path("builtin:tiny-sft")
    good = DataConfig(task="jsonl", train_path=str(tmp_path / "train-*.jsonl"), test_size=2)
    check_before_loading(DashConfig(data=good), model)  # a glob that matches passes
    bad = DataConfig(**{**_fields(good), key: str(tmp_path / "val-*.jsonl")})
    with pytest.raises(ConfigError, match=rf"data\.{key}: the pattern '.*val-\*\.jsonl' matches no file"):
        check_before_loading(DashConfig(data=bad), model)

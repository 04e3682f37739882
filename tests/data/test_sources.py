"""Sources: JSONL, ArrayRecord and TFDS read back what was written; bad input is located."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from array_record.python import array_record_module

from data.sources import (
    ArrayRecordSource,
    JsonlSource,
    TfdsSource,
    iter_records,
    open_source,
    write_array_record,
)
from data.tfds_export import write_tfds_dataset
from tests.data.conftest import code_records, write_jsonl

RECORDS = [
    {"text": "def f():\n\treturn '😀'  \n", "path": "a.py", "repo": "r", "lang": "python"},
    {"text": "", "path": "empty.py"},
    {"text": "x = '\u2581'\r\n"},
]


def test_jsonl_reads_records_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]) + "\n\n  \n" + json.dumps(RECORDS[2]))
    source = JsonlSource([path])
    assert list(iter_records(source)) == RECORDS


def test_extra_fields_pass_through(tmp_path: Path) -> None:
    """Curated repository documents carry "tokens" (spliced separators) the pipeline must keep."""
    record = {"text": "<|repo_name|>r", "paths": ["a.py", "b.py"], "tokens": [8, 5, 6], "repo": "r"}
    write_array_record(tmp_path / "repo.array_record", [record])
    assert ArrayRecordSource([tmp_path / "repo.array_record"])[0] == record
    source = JsonlSource([write_jsonl(tmp_path / "c.jsonl", [{"content": "x", "lang": None, "n": 1}])], "content")
    assert source[0] == {"text": "x", "n": 1}


def test_jsonl_source_pickles_for_worker_processes(tmp_path: Path) -> None:
    source = JsonlSource([write_jsonl(tmp_path / "docs.jsonl", RECORDS)])
    assert source[2] == RECORDS[2]
    clone = pickle.loads(pickle.dumps(source))
    assert list(iter_records(clone)) == RECORDS


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"bad\.jsonl:3: malformed JSON"),
        ('["text"]', r"bad\.jsonl:3: record must be a JSON object"),
        ('{"body": "x"}', r"bad\.jsonl:3: record has no 'text' field"),
        ('{"text": 3}', r"bad\.jsonl:3: field 'text' must be a string"),
        ('{"text": "x", "path": ["p"]}', r"bad\.jsonl:3: field 'path' must be a string"),
    ],
)
def test_jsonl_bad_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n' + line + "\n")  # the bad record is on line 3
    source = JsonlSource([path])
    assert source[0] == {"text": "a"}
    with pytest.raises(ValueError, match=message):
        source[1]


def test_missing_and_unmatched_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.x\.splits\.train: no file matches .*missing\.jsonl"):
        open_source("jsonl", str(tmp_path / "missing.jsonl"), field="data.sources.x.splits.train")
    with pytest.raises(FileNotFoundError, match=r"no file matches .*\*\.array_record"):
        open_source("arrayrecord", f"{tmp_path}/*.array_record", field="f")
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        JsonlSource([tmp_path / "gone.jsonl"])


def test_empty_source_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"data\.sources\.e\.splits\.train: .*empty\.jsonl.* holds no records"):
        open_source("jsonl", str(tmp_path / "empty.jsonl"), field="data.sources.e.splits.train")


def test_unknown_kind_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.sources\.s\.splits\.train: unknown source kind 'csv'"):
        open_source("csv", "x", field="data.sources.s.splits.train")


def test_array_record_round_trip_across_shards(tmp_path: Path) -> None:
    records = code_records(25, seed=0)
    paths = [tmp_path / "s0.array_record", tmp_path / "s1.array_record"]
    assert write_array_record(paths[0], records[:10]) == 10
    assert write_array_record(paths[1], records[10:]) == 15
    source = open_source("arrayrecord", f"{tmp_path}/s*.array_record", field="f")
    assert isinstance(source, ArrayRecordSource)
    assert list(iter_records(source)) == records


def test_array_record_bad_record_is_named(tmp_path: Path) -> None:
    write_array_record(tmp_path / "a.array_record", RECORDS)
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "b.array_record"), "group_size:1")
    writer.write(json.dumps({"text": "ok"}).encode())
    writer.write(b"\xff not json")
    writer.close()
    source = ArrayRecordSource([tmp_path / "a.array_record", tmp_path / "b.array_record"])
    assert source[3] == {"text": "ok"}
    with pytest.raises(ValueError, match=r"b\.array_record\[record 1\]: malformed JSON"):
        source[4]


def test_not_an_array_record_file_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "oops.array_record", RECORDS)
    with pytest.raises(ValueError, match=r"oops\.array_record: not a readable ArrayRecord file"):
        ArrayRecordSource([path])


def test_tfds_form_reads_back_through_tfds(tmp_path: Path) -> None:
    train = code_records(12, seed=1)
    validation = RECORDS
    write_tfds_dataset(tmp_path, "toy_code", {"train": [train[:5], train[5:]], "validation": [validation]})
    source = open_source("tfds", "train", field="f", tfds_name="toy_code", tfds_data_dir=str(tmp_path))
    assert list(iter_records(source)) == train
    held_out = open_source("tfds", "validation", field="f", tfds_name="toy_code", tfds_data_dir=str(tmp_path))
    # TFDS stores absent metadata as "", which reads back as the empty string.
    assert [r["text"] for r in iter_records(held_out)] == [r["text"] for r in validation]
    sliced = open_source("tfds", "train[:50%]", field="f", tfds_name="toy_code", tfds_data_dir=str(tmp_path))
    assert list(iter_records(sliced)) == train[:6]


def test_tfds_missing_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="'no_such_ds' split 'train'"):
        TfdsSource("no_such_ds", "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.sources\.t\.splits\.train: a tfds source needs a dataset name"):
        open_source("tfds", "train", field="data.sources.t.splits.train")


def test_jsonl_reader_names_file_and_line(tmp_path):
    import gzip

    from data.jsonl import JSONLError, read_jsonl

    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"a": 1}\n\n"str"\n{oops\n')
    lines = read_jsonl(path, objects=False)
    assert [(line.number, line.record) for line in [next(lines), next(lines)]] == [(1, {"a": 1}), (3, "str")]
    with pytest.raises(JSONLError, match=r"x\.jsonl\.gz:4: invalid JSON"):
        next(lines)
    with pytest.raises(JSONLError, match=r"x\.jsonl\.gz:3: expected a JSON object, got str"):
        list(read_jsonl(path))
    with pytest.raises(JSONLError, match=r"missing\.jsonl: cannot read"):
        list(read_jsonl(tmp_path / "missing.jsonl"))

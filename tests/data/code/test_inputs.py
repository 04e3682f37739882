"""Curation input readers (shared by the local driver and the Beam pipeline): Parquet rows, field
mappings, document order and bad input as counted drops."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq
import pytest

from data.code import config as config_lib
from data.code import inputs, preparation


def parquet_bytes(table: pyarrow.Table) -> io.BytesIO:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    buffer.seek(0)
    return buffer


def test_parquet_rows_with_mapped_columns_and_bad_rows() -> None:
    table = pyarrow.table({
        "content": ["a = 1\n", None, "b = 2\n", "c = 3\n"],
        "repo_name": ["r", "r", None, "r"],
        "max_stars_repo_path": ["a.py", "n.py", "b.py", "c.py"],
        "stars": [1, 2, 3, 4],
    })
    fields = inputs.parse_fields("text=content,repo=repo_name,path=max_stars_repo_path")
    rows = list(inputs.parquet_records(parquet_bytes(table), "x.parquet", 3, fields, max_bytes=1000))
    assert [row.doc_id for row in rows] == [inputs.document_id(3, n) for n in (1, 2, 3, 4)]
    assert rows[0].record == {"text": "a = 1\n", "repo": "r", "path": "a.py"} and rows[0].group == "x.parquet\0r"
    assert (rows[1].record, rows[1].drop_reason) == (None, "missing_text")
    assert rows[2].group is None and rows[2].record == {"text": "b = 2\n", "path": "b.py"}
    binary = pyarrow.table({"text": pyarrow.array([b"ok = 1\n", b"\xff\xfe"], pyarrow.binary())})
    rows = list(inputs.parquet_records(parquet_bytes(binary), "y.parquet", 0, inputs.parse_fields(""), max_bytes=1000))
    assert rows[0].record == {"text": "ok = 1\n"} and rows[1].drop_reason == "not_utf8"
    broken = list(inputs.parquet_records(io.BytesIO(b"PAR1 not really"), "z.parquet", 0, inputs.parse_fields(""), 1000))
    assert [row.drop_reason for row in broken] == ["unreadable"]


def test_inputs_expand_in_order_and_parquet_reaches_the_report(tmp_path: Path) -> None:
    for name in ("b.parquet", "a.parquet"):
        pq.write_table(pyarrow.table({"text": [f"# {name}\nx = 1\n", "y = 2\n"], "path": ["x.py", "y.py"]}), tmp_path / name)
    (tmp_path / "c.jsonl").write_text('{"text": "z = 3\\n", "path": "z.py"}\n')
    items = inputs.expand_inputs([str(tmp_path / "*.parquet"), str(tmp_path / "c.jsonl")])
    assert [(Path(i.path).name, i.kind, i.index) for i in items] == [("a.parquet", "parquet", 0), ("b.parquet", "parquet", 1), ("c.jsonl", "jsonl", 2)]
    with pytest.raises(ValueError, match="no file matches"):
        inputs.expand_inputs([str(tmp_path / "*.none")])
    config = config_lib.default_prepare_config()
    config.workers = 0
    report = preparation.prepare([str(tmp_path / "*.parquet"), str(tmp_path / "c.jsonl")], str(tmp_path / "out"), config)
    assert report["stages"]["read"]["documents_out"] == 5 and report["duplicates"]["exact"] == 1  # y.py twice
    with pytest.raises(ValueError, match="bad field mapping"):
        inputs.parse_fields("body=content")

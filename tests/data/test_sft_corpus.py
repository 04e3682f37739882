"""Embedded SFT set: extraction rules on a crafted file, the split by file (nothing of a held-out file in
train), well-formed records, idempotence, and the real standard library build."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from data import corpus, sft_corpus
from tests.data.conftest import HELDOUT_MODULES, TRAIN_MODULES, read_modules

CRAFTED = '''import functools


def documented(a, b=2):
    """Add a and b."""
    total = a + b
    return total


def undocumented(x):
    return x


def stub():
    """Not written yet."""
    raise NotImplementedError("later")


def same_line():
    """Docstring and code share a line."""; return 1


class Box:
    """A box."""

    @functools.cache
    def size(self, scale):
        """The size,
        scaled."""

        return self.n * scale

    async def fetch(self):
        """Fetch it."""
        return await self.get()

    def outer(self):
        """Has a nested function."""
        def inner():
            """Nested: not an example of its own."""
            return 1
        return inner()

    def text(self):
        """A string runs out to the left of the def."""
        return """a
b"""


def long_one(x):
    """Too long."""
''' + "    x += 1\n" * 41 + "    return x\n"

EXPECTED = [
    ("documented", 4, 'def documented(a, b=2):\n    """Add a and b."""\n', "    total = a + b\n    return total\n"),
    ("Box.size", 27, '@functools.cache\ndef size(self, scale):\n    """The size,\n    scaled."""\n',
     "\n    return self.n * scale\n"),
    ("Box.fetch", 33, 'async def fetch(self):\n    """Fetch it."""\n', "    return await self.get()\n"),
    ("Box.outer", 37, 'def outer(self):\n    """Has a nested function."""\n',
     '    def inner():\n        """Nested: not an example of its own."""\n        return 1\n    return inner()\n'),
]


def test_extraction_rules():
    skipped = collections.Counter()
    examples = sft_corpus.extract_examples(CRAFTED, "pkg/crafted.py", skipped)
    assert [(e.name, e.line, e.prompt, e.completion) for e in examples] == EXPECTED
    assert {e.path for e in examples} == {"pkg/crafted.py"}
    assert skipped == {"no_body": 1, "shares_a_line": 1, "irregular_indent": 1, "too_long": 1}
    skipped.clear()
    assert sft_corpus.extract_examples("def broken(:\n", "x.py", skipped) == [] and skipped == {"file_not_parsed": 1}


def _heldout_name() -> str:
    return next(f"held_{i}.py" for i in range(10_000) if corpus.is_heldout(f"pkg/held_{i}.py"))


@pytest.fixture()
def source_dir(tmp_path: Path) -> Path:
    """Real modules in train files, one held-out file that also holds a copy of a train file's function."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    for i, text in enumerate(read_modules(TRAIN_MODULES)):
        (root / "pkg" / f"mod_{i}.py").write_text(text)
    (root / "pkg" / "crafted.py").write_text(CRAFTED)
    shared = CRAFTED[CRAFTED.index("def documented"):CRAFTED.index("def undocumented")]
    (root / "pkg" / _heldout_name()).write_text(read_modules(HELDOUT_MODULES)[0] + "\n\n" + shared)
    (root / "test").mkdir()
    (root / "test" / "test_mod.py").write_text('def test_x():\n    """Excluded directory."""\n    assert 1\n')
    return root


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pairs(examples) -> list[tuple[str, str]]:
    return [(e.prompt, e.completion) for e in examples]


def test_split_by_file(tmp_path: Path, source_dir: Path):
    built = sft_corpus.ensure_sft_corpus(tmp_path / "sft", source_dir=source_dir)
    train = [(r["prompt"], r["completion"]) for r in read_records(built.files["train"])]
    validation = [(r["prompt"], r["completion"]) for r in read_records(built.files["validation"])]
    heldout = sft_corpus.extract_examples((source_dir / "pkg" / _heldout_name()).read_text(), "held")
    assert validation == pairs(heldout) and len(validation) > 5
    assert not set(train) & set(validation)  # the copy of `documented` in the held-out file left train
    expected_train = []
    for path in sorted((source_dir / "pkg").glob("*.py")):
        if path.name != _heldout_name():
            expected_train += pairs(sft_corpus.extract_examples(path.read_text(), path.name))
    assert train == [pair for pair in expected_train if pair not in set(validation)]
    assert len(train) == len(expected_train) - 1 and len(train) > 20
    assert built.stats["records"] == {"train": len(train), "validation": len(validation)}
    assert built.stats["files"] == {"train": len(TRAIN_MODULES) + 1, "validation": 1}  # test/ is excluded
    assert json.loads(built.stats_path.read_text()) == built.stats


def check_records(records: list[dict], split: str) -> None:
    for number, record in enumerate(records, start=1):
        where = f"{split}:{number}"
        assert set(record) == {"prompt", "completion"}, where
        prompt, completion = record["prompt"], record["completion"]
        assert prompt.startswith(("def ", "async def ", "@")), where
        assert prompt.endswith(('"""\n', "'''\n", '"\n', "'\n")), where
        assert completion.endswith("\n") and completion.strip(), where
        assert sum(1 for line in completion.splitlines() if line.strip()) <= sft_corpus.MAX_BODY_LINES, where
        assert len(prompt) + len(completion) <= sft_corpus.MAX_CHARS, where
        compile(prompt + completion, where, "exec")  # a whole function again; parsed, never run


def test_records_are_well_formed(tmp_path: Path, source_dir: Path):
    built = sft_corpus.ensure_sft_corpus(tmp_path / "sft", source_dir=source_dir)
    for split, path in built.files.items():
        check_records(read_records(path), split)


def mtimes(root: Path) -> dict[str, int]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()}


def test_idempotent_and_rebuilt_on_change(tmp_path: Path, source_dir: Path):
    out = tmp_path / "sft"
    first = sft_corpus.ensure_sft_corpus(out, source_dir=source_dir)
    before, contents = mtimes(out), {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = sft_corpus.ensure_sft_corpus(out, source_dir=source_dir)
    assert again == first and mtimes(out) == before

    first.files["validation"].write_text("tampered\n")  # a damaged output is rebuilt
    sft_corpus.ensure_sft_corpus(out, source_dir=source_dir)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == contents

    with open(source_dir / "pkg" / "crafted.py", "a") as f:  # a changed source is re-read
        f.write('\n\ndef added():\n    """New."""\n    return 2\n')
    changed = sft_corpus.ensure_sft_corpus(out, source_dir=source_dir)
    assert changed.stats["records"]["train"] == first.stats["records"]["train"] + 1
    assert changed.stats["fingerprint"] != first.stats["fingerprint"]


def test_standard_library_build(tmp_path: Path):
    built = sft_corpus.ensure_sft_corpus(tmp_path / "sft")
    records = {split: read_records(path) for split, path in built.files.items()}
    assert len(records["train"]) > 2000 and len(records["validation"]) > 50
    assert built.stats["files"]["train"] > 300 and built.stats["files"]["validation"] > 5
    for split, split_records in records.items():
        check_records(split_records, split)
    validation = {(r["prompt"], r["completion"]) for r in records["validation"]}
    assert not any((r["prompt"], r["completion"]) in validation for r in records["train"])

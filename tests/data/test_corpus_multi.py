"""The multi-language embedded corpus: per-language selection (directories and zip archives), the
size cap, held-out split and language tags, one shared tokenizer, idempotent builds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from data import corpus
from data.sources import ArrayRecordSource
from data.tokenizer import SentencePieceTokenizer
from tests.data.conftest import TRAIN_MODULES, read_modules


def _heldout(root: str, prefix: str, suffix: str) -> str:
    """A file name that the held-out rule puts in validation under `root`/src (paths keep the root's name)."""
    return next(f"{prefix}{i}{suffix}" for i in range(10_000) if corpus.is_heldout(f"{root}/src/{prefix}{i}{suffix}"))


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, corpus.LanguageSource]:
    """Python from a directory, "c" from a directory with a minified and a generated file, "java"
    from a zip archive; each with one file that falls in the held-out split."""
    py, c = tmp_path / "py" / "src", tmp_path / "c" / "src"
    py.mkdir(parents=True)
    c.mkdir(parents=True)
    modules = read_modules(TRAIN_MODULES)
    for i, text in enumerate(modules):
        (py / f"mod_{i}.py").write_text(text)
    (py / _heldout("py", "held_", ".py")).write_text(modules[0])
    for i in range(6):
        (c / f"h{i}.h").write_text(f"#ifndef H{i}\n#define H{i}\nint f{i}(int x);\nstatic inline int g{i}(void) {{ return {i}; }}\n#endif\n" * 20)
    (c / _heldout("c", "hh", ".h")).write_text("#define HELD 1\nint held(void);\n" * 30)
    (c / "min.h").write_text("int a;" * 400 + "\n")
    (c / "gen.h").write_text("/* DO NOT EDIT: generated */\n#define X 1\n")
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(6):
            z.writestr(f"src/pkg/C{i}.java", f"package pkg;\npublic class C{i} {{\n  int f() {{ return {i}; }}\n}}\n" * 15)
        z.writestr(f"src/{_heldout('src.zip', 'J', '.java')}", "class Held { void run() {} }\n" * 20)
        z.writestr("src/test/T.java", "class T {}\n")
    return {
        "python": corpus.LanguageSource("python", "py", (tmp_path / "py",), (".py",)),
        "c": corpus.LanguageSource("c", "c", (tmp_path / "c",), (".h",)),
        "java": corpus.LanguageSource("java", "jdk", (archive,), (".java",)),
    }


def test_collect_language_tags_splits_and_skips(sources):
    c = corpus.collect_language(sources["c"])
    assert c.skipped["minified"] == 1 and c.skipped["generated"] == 1
    assert [r["path"] for r in c.by_split["validation"]] == [f"c/src/{_heldout('c', 'hh', '.h')}"]
    assert len(c.by_split["train"]) == 6
    assert {r["lang"] for docs in c.by_split.values() for r in docs} == {"c"}
    java = corpus.collect_language(sources["java"])
    paths = [r["path"] for docs in java.by_split.values() for r in docs]
    assert len(paths) == 7 and all(p.startswith("src.zip/src/") for p in paths)  # test/ sources left out
    assert java.by_split["validation"][0]["text"].startswith("class Held")


def test_the_size_cap_keeps_a_stable_hash_ordered_sample(sources):
    full = corpus.collect_language(sources["c"])
    size = sum(len(r["text"]) for docs in full.by_split.values() for r in docs)
    capped = corpus.collect_language(sources["c"], max_bytes=size - 1)
    kept = [r for docs in capped.by_split.values() for r in docs]
    assert 0 < sum(len(r["text"]) for r in kept) <= size - 1 and len(kept) < 7
    again = corpus.collect_language(sources["c"], max_bytes=size - 1)
    assert again.fingerprint == capped.fingerprint != full.fingerprint


def test_build_writes_one_source_per_language_and_a_shared_tokenizer(tmp_path, sources):
    out = corpus.ensure_multilang_corpus(tmp_path / "out", ("python", "c", "java"), vocab_size=400, sources=sources)
    for lang in ("python", "c", "java"):
        for split in ("train", "validation"):
            shards = sorted(Path(out).glob(f"arrayrecord/{lang}/{split}-*.array_record"))
            assert shards, (lang, split)
            records = [ArrayRecordSource([str(s)])[i] for s in shards for i in range(len(ArrayRecordSource([str(s)])))]
            assert records and {r["lang"] for r in records} == {lang}
    tokenizer = SentencePieceTokenizer(out / "tokenizer.model")
    assert tokenizer.vocab_size == 400
    for text in ("def f(x):\n    return x\n", "#define H 1\n", "public class C {}\n"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Idempotent, whatever order the languages are asked in: nothing is rewritten or retrained.
    before = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}
    corpus.ensure_multilang_corpus(tmp_path / "out", ("java", "c", "python"), vocab_size=400, sources=sources)
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()} == before


def test_missing_languages_are_named(tmp_path, sources):
    with pytest.raises(ValueError, match=r"\['rust'\] not on this machine"):
        corpus.ensure_multilang_corpus(tmp_path / "out", ("python", "rust"), sources=sources)


def test_this_machine_holds_python():
    assert "python" in corpus.available_languages()

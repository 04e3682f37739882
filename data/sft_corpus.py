"""The embedded SFT set: documented functions of Python's own standard library, as prompt/completion pairs.

Needs no download. The files are those of the embedded pretraining corpus (`data.corpus`: the running
interpreter's standard library, the same exclusions and the same held-out files), so a function of a
held-out file is never in the train split, and the validation split is code the pretrained model has not
seen either. From each file, every function or method (not one nested in another function) whose body
starts with a docstring becomes one record:

    {"prompt": decorators + `def` line(s) + docstring, "completion": the rest of the body}

both exactly as in the source, dedented to the `def` (so a method reads like a function), each ending
in a newline; a base code model continues the prompt with the body, as in HumanEval. Kept when the
completion has 1..`MAX_BODY_LINES` non-blank lines, prompt and completion together are at most
`MAX_CHARS` characters, and the body is more than `pass`, `...` or `raise NotImplementedError`. Exact
duplicates are dropped, and a train record equal to a validation one is dropped from train.

    python -m data.sft_corpus --out_dir=artifacts/sft

writes `train.jsonl` and `validation.jsonl` (records sorted by file, then line) and `stats.json`
(files, records, skip reasons per split). The build is idempotent: when the recorded fingerprint (source
files and these rules) and the files' hashes match, nothing is rewritten.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from data.corpus import SPLITS, Documents, _locked, _read_stats, _write_json_if_changed, collect_documents, stdlib_dir

DEFAULT_OUT_DIR = "artifacts/sft"
MAX_BODY_LINES = 40
MAX_CHARS = 1500
# Bump when the extraction rules change, so old builds are redone.
LAYOUT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Example:
    """One function: where it is, and its record."""

    path: str  # relative to the library root
    line: int  # of the `def` (1-based)
    name: str  # qualified: Class.method
    prompt: str
    completion: str

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


@dataclasses.dataclass(frozen=True)
class SFTCorpus:
    """Where a built SFT set lives, and its statistics (the content of stats.json)."""

    root: Path
    files: dict[str, Path]  # split -> JSONL of {"prompt", "completion"}
    stats_path: Path
    stats: dict


def _log(message: str) -> None:
    print(f"[sft_corpus] {message}", file=sys.stderr, flush=True)


def _functions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Functions and methods in source order, with qualified names; not those nested in functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")


def _trivial(statements: list[ast.stmt]) -> bool:
    """Only `pass`, `...` and `raise NotImplementedError(...)`: nothing to learn."""
    def filler(node: ast.stmt) -> bool:
        if isinstance(node, ast.Pass):
            return True
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis:
            return True
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
        return False

    return all(filler(node) for node in statements)


def _dedent(lines: list[str], indent: str) -> list[str] | None:
    """`lines` without the `def`'s indentation; None if a non-blank line does not start with it (a string
    literal running out to the left), as the result would not read as the source."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif line.startswith(indent):
            out.append(line[len(indent):])
        else:
            return None
    return out


def extract_examples(text: str, path: str, skipped: collections.Counter | None = None) -> list[Example]:
    """The documented functions of one source file that pass the filters; reasons for the others are
    counted in `skipped` (functions without a docstring are not counted)."""
    skipped = skipped if skipped is not None else collections.Counter()
    text = text.replace("\r\n", "\n")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        skipped["file_not_parsed"] += 1
        return []
    lines = text.split("\n")  # ast counts lines at "\n" (a form feed is whitespace to it, not a line break)
    examples = []
    for name, node in _functions(tree.body):
        if ast.get_docstring(node, clean=False) is None:
            continue
        if len(node.body) < 2 or _trivial(node.body[1:]):
            skipped["no_body"] += 1
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        doc_end = node.body[0].end_lineno
        if node.body[1].lineno <= doc_end or node.body[0].lineno == node.lineno:
            skipped["shares_a_line"] += 1  # `def f(): "doc"` or `"doc"; x = 1`
            continue
        indent = lines[node.lineno - 1][:node.col_offset]
        prompt = _dedent(lines[start - 1:doc_end], indent)
        completion = _dedent(lines[doc_end:node.end_lineno], indent)
        if indent.strip() or prompt is None or completion is None:
            skipped["irregular_indent"] += 1
            continue
        body_lines = sum(1 for line in completion if line)
        prompt_text, completion_text = "\n".join(prompt) + "\n", "\n".join(completion) + "\n"
        if body_lines > MAX_BODY_LINES or len(prompt_text) + len(completion_text) > MAX_CHARS:
            skipped["too_long"] += 1
            continue
        examples.append(Example(path, node.lineno, name, prompt_text, completion_text))
    return examples


@dataclasses.dataclass
class Examples:
    by_split: dict[str, list[Example]]
    files: dict[str, int]  # split -> files read
    skipped_files: dict[str, int]  # reason -> files `data.corpus` leaves out
    skipped: dict[str, int]  # reason -> functions (or unparsable files) left out
    fingerprint: str


def _fingerprint(documents: Documents) -> str:
    """Of the source files (their paths and contents, as `data.corpus` records them) and of these rules."""
    rules = f"sft-layout={LAYOUT_VERSION};max_body_lines={MAX_BODY_LINES};max_chars={MAX_CHARS};"
    return hashlib.sha256((rules + documents.fingerprint).encode()).hexdigest()


def collect_examples(documents: Documents) -> Examples:
    """The examples of the corpus files (`data.corpus.collect_documents`), in the files' splits."""
    skipped: collections.Counter = collections.Counter()
    by_split: dict[str, list[Example]] = {}
    for split in SPLITS:
        examples = []
        for document in documents.by_split[split]:
            examples.extend(extract_examples(document["text"], document["path"], skipped))
        by_split[split] = sorted(examples, key=lambda e: (e.path, e.line))
    validation = {(e.prompt, e.completion) for e in by_split["validation"]}
    for split in SPLITS:
        seen: set[tuple[str, str]] = set()
        kept = []
        for example in by_split[split]:
            pair = (example.prompt, example.completion)
            if pair in seen or (split == "train" and pair in validation):
                skipped["duplicate"] += 1
                continue
            seen.add(pair)
            kept.append(example)
        by_split[split] = kept
    files = {split: len(documents.by_split[split]) for split in SPLITS}
    return Examples(by_split, files, documents.skipped, dict(sorted(skipped.items())), _fingerprint(documents))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.record(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def ensure_sft_corpus(out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR, *,
                      source_dir: str | os.PathLike[str] | None = None) -> SFTCorpus:
    """Builds (or verifies) `{train,validation}.jsonl` and `stats.json` under `out_dir` from the `.py` files
    under `source_dir` (default: the standard library). Returns their paths and statistics; a second call
    with unchanged sources only re-reads the files and rewrites nothing."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_dir = Path(source_dir) if source_dir is not None else stdlib_dir()
    files = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    stats_path = out_dir / "stats.json"
    with _locked(out_dir):
        stats = _read_stats(stats_path)
        documents = collect_documents(source_dir, repo="stdlib")
        fingerprint = _fingerprint(documents)
        if (stats.get("fingerprint") == fingerprint and all(p.is_file() for p in files.values())
                and stats.get("sha256") == {split: _sha256(p) for split, p in files.items()}):
            _log(f"up to date in {out_dir}: {stats['records']} records")
            return SFTCorpus(out_dir, files, stats_path, stats)
        examples = collect_examples(documents)
        for split, path in files.items():
            _write_jsonl(path, examples.by_split[split])
        stats = {
            "fingerprint": examples.fingerprint,
            "source_dir": str(source_dir),
            "files": examples.files,
            "records": {split: len(examples.by_split[split]) for split in SPLITS},
            "chars": {split: sum(len(e.prompt) + len(e.completion) for e in examples.by_split[split])
                      for split in SPLITS},
            "skipped": examples.skipped,
            "skipped_files": examples.skipped_files,
            "rules": {"max_body_lines": MAX_BODY_LINES, "max_chars": MAX_CHARS, "layout": LAYOUT_VERSION},
            "sha256": {split: _sha256(p) for split, p in files.items()},
        }
        _write_json_if_changed(stats_path, stats)
    _log(f"wrote {stats['records']} records to {out_dir} ({time.perf_counter() - started:.1f}s)")
    return SFTCorpus(out_dir, files, stats_path, stats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="output directory")
    parser.add_argument("--source_dir", default=None, help="directory of .py files (default: the stdlib)")
    args = parser.parse_args(argv)
    built = ensure_sft_corpus(args.out_dir, source_dir=args.source_dir)
    print(built.stats_path.read_text(), end="")


if __name__ == "__main__":
    main()

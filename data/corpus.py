"""The embedded default corpus: Python's own standard library, plus its tokenizer.

Needs no download: documents are the `.py` files of the running interpreter's
standard library, minus test suites, third-party packages, empty files,
generated files (codec tables, token lists) and files over `MAX_FILE_BYTES`.
A file goes to the held-out "validation" split when a hash of its relative path
falls in the first `HELDOUT_PERMILLE`/1000, so the split is stable across runs
and machines.

    python -m data.corpus --out_dir=artifacts/corpus [--vocab_size=8192]

writes, under `out_dir`:

    arrayrecord/{train,validation}-0000i-of-0000n.array_record   JSON records
    tfds/codelm_stdlib/1.0.0/...                                   TFDS form
    tokenizer.model                                                 sentencepiece
    stats.json                                                      files/bytes/tokens

The build is idempotent: parts whose recorded fingerprint matches are kept.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from data.sources import Record, write_array_record
from data.tfds_export import TFDS_VERSION, write_tfds_dataset
from data.tokenizer import SentencePieceTokenizer, train_sentencepiece

DEFAULT_OUT_DIR = "artifacts/corpus"
DEFAULT_VOCAB_SIZE = 8192
SPLITS: tuple[str, ...] = ("train", "validation")
TFDS_NAME = "codelm_stdlib"
HELDOUT_PERMILLE = 30
MAX_FILE_BYTES = 512 * 1024
SHARD_BYTES = 4 * 1024 * 1024
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Looked for in a file's first 2 KiB: tool-generated tables are poor training data.
GENERATED_MARKER = re.compile(
    rb"(?i:auto-?generated)|DO NOT EDIT|(?i:generated (?:by|from|with) )[^\n]{0,80}?\.py\b"
)
# Bump when the selection/split/record rules change, so old builds are redone.
LAYOUT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CorpusPaths:
    """Where a built corpus lives."""

    root: Path
    shards: dict[str, tuple[Path, ...]]  # split -> ArrayRecord files of JSON records
    tfds_data_dir: Path  # tfds.data_source(tfds_name, split=..., data_dir=tfds_data_dir)
    tfds_name: str
    tokenizer: Path
    stats: Path


def arrayrecord_pattern(out_dir: str | os.PathLike[str], split: str) -> str:
    """Glob matching a split's ArrayRecord shards (as used in data configs)."""
    return f"{os.fspath(out_dir)}/arrayrecord/{split}-*.array_record"


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _log(message: str) -> None:
    print(f"[corpus] {message}", file=sys.stderr, flush=True)


def is_heldout(relative_path: str) -> bool:
    """Whether a file belongs to the held-out split (stable hash of its path)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PERMILLE


@dataclasses.dataclass
class Documents:
    """Selected source files, split, plus the reasons others were skipped."""

    by_split: dict[str, list[Record]]
    skipped: dict[str, int]
    fingerprint: str


def collect_documents(source_dir: Path, repo: str) -> Documents:
    """Reads the `.py` files under `source_dir` (sorted) into records per split."""
    if not source_dir.is_dir():
        raise FileNotFoundError(f"corpus source directory not found: {source_dir}")
    by_split: dict[str, list[Record]] = {split: [] for split in SPLITS}
    skipped = {"empty": 0, "generated": 0, "too_large": 0, "not_utf8": 0}
    digest = hashlib.sha256(f"layout={LAYOUT_VERSION};heldout={HELDOUT_PERMILLE};repo={repo}".encode())
    for path in _python_files(source_dir):
        data = path.read_bytes()
        reason = _skip_reason(data)
        if reason is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not_utf8"
        if reason is not None:
            skipped[reason] += 1
            continue
        relative = path.relative_to(source_dir).as_posix()
        split = "validation" if is_heldout(relative) else "train"
        by_split[split].append({"text": text, "path": relative, "repo": repo, "lang": "python"})
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    if not any(by_split.values()):
        raise ValueError(f"{source_dir}: no usable .py files (skipped: {skipped})")
    return Documents(by_split, skipped, digest.hexdigest())


def _python_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


def _skip_reason(data: bytes) -> str | None:
    if not data.strip():
        return "empty"
    if len(data) > MAX_FILE_BYTES:
        return "too_large"
    if GENERATED_MARKER.search(data[:2048]):
        return "generated"
    return None


def _shard(records: Sequence[Record], shard_bytes: int) -> list[list[Record]]:
    """Contiguous shards of about `shard_bytes` of text each (at least one)."""
    total = sum(len(r["text"]) for r in records)
    count = max(1, -(-total // shard_bytes))
    bounds = [len(records) * i // count for i in range(count + 1)]
    return [list(records[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]


def _write_shards(out_dir: Path, documents: Documents) -> None:
    """Writes ArrayRecord + TFDS forms into a staging dir, then swaps them in."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        shards_by_split = {split: _shard(documents.by_split[split], SHARD_BYTES) for split in SPLITS}
        (staging / "arrayrecord").mkdir()
        for split, shards in shards_by_split.items():
            for index, shard in enumerate(shards):
                name = f"{split}-{index:05d}-of-{len(shards):05d}.array_record"
                _log(f"writing arrayrecord/{name} ({len(shard)} files)")
                write_array_record(staging / "arrayrecord" / name, shard)
        _log(f"writing TFDS form tfds/{TFDS_NAME}")
        write_tfds_dataset(
            staging / "tfds",
            TFDS_NAME,
            shards_by_split,
            description="Python standard library source files (codelm embedded corpus).",
        )
        for part in ("arrayrecord", "tfds"):
            shutil.rmtree(out_dir / part, ignore_errors=True)
            os.replace(staging / part, out_dir / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def count_tokens(encode: Callable[[str], list[int]], texts: Sequence[str], label: str) -> int:
    """Total tokens of `texts`, encoded on all CPUs, logging progress."""
    total, step = 0, max(1, -(-len(texts) // 10))
    workers = len(os.sched_getaffinity(0))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # sentencepiece releases the GIL
        for done, count in enumerate(pool.map(lambda t: len(encode(t)), texts), start=1):
            total += count
            if done % step == 0 or done == len(texts):
                _log(f"counting {label} tokens: {done}/{len(texts)} files")
    return total


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Serializes builds of one corpus directory across processes."""
    with open(out_dir / ".lock", "a") as lock:  # "a": never touches the file
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _paths(out_dir: Path) -> CorpusPaths:
    return CorpusPaths(
        root=out_dir,
        shards={split: tuple(sorted((out_dir / "arrayrecord").glob(f"{split}-*.array_record"))) for split in SPLITS},
        tfds_data_dir=out_dir / "tfds",
        tfds_name=TFDS_NAME,
        tokenizer=out_dir / "tokenizer.model",
        stats=out_dir / "stats.json",
    )


def _shards_complete(paths: CorpusPaths, corpus_stats: dict) -> bool:
    """Whether every file a previous build recorded is still there."""
    recorded = corpus_stats.get("shards", {})
    present = {split: [p.name for p in shards] for split, shards in paths.shards.items()}
    tfds_info = paths.tfds_data_dir / TFDS_NAME / TFDS_VERSION / "dataset_info.json"
    return bool(recorded) and recorded == present and tfds_info.is_file()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_corpus(
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    source_dir: str | os.PathLike[str] | None = None,
) -> CorpusPaths:
    """Builds (or verifies) the corpus shards, TFDS form and tokenizer.

    Args:
      out_dir: output directory.
      vocab_size: tokenizer vocabulary size.
      source_dir: directory scanned for `.py` files (default: the stdlib).

    Returns:
      The paths of the built corpus. Parts already present whose fingerprints
      (corpus content hash, tokenizer vocab size and file hash) match
      `stats.json` are kept, so a second call does no work beyond re-reading
      the source files.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_dir = Path(source_dir) if source_dir is not None else stdlib_dir()
    repo = f"cpython-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    with _locked(out_dir):
        documents = collect_documents(source_dir, repo)
        files = {split: len(docs) for split, docs in documents.by_split.items()}
        _log(f"selected {files} .py files from {source_dir} (skipped {documents.skipped})")
        paths = _paths(out_dir)
        stats = _read_stats(paths.stats)
        stats["corpus"] = _ensure_shards(paths, documents, stats.get("corpus", {}), source_dir)
        _write_json_if_changed(paths.stats, stats)
        stats["tokenizer"] = _ensure_tokenizer(paths, documents, stats.get("tokenizer", {}), vocab_size)
        _write_json_if_changed(paths.stats, stats)
    _log(f"corpus ready in {out_dir} ({time.perf_counter() - started:.1f}s)")
    return _paths(out_dir)


def _ensure_shards(paths: CorpusPaths, documents: Documents, recorded: dict, source_dir: Path) -> dict:
    """Writes the shards unless the recorded build matches; returns the corpus stats."""
    if recorded.get("fingerprint") == documents.fingerprint and _shards_complete(paths, recorded):
        _log("shards up to date")
        return recorded
    _write_shards(paths.root, documents)
    by_split = documents.by_split
    return {
        "fingerprint": documents.fingerprint,
        "source_dir": str(source_dir),
        "files": {split: len(docs) for split, docs in by_split.items()},
        "bytes": {split: sum(len(r["text"].encode()) for r in docs) for split, docs in by_split.items()},
        "skipped_files": documents.skipped,
        "shards": {split: [p.name for p in shards] for split, shards in _paths(paths.root).shards.items()},
    }


def _ensure_tokenizer(paths: CorpusPaths, documents: Documents, recorded: dict, vocab_size: int) -> dict:
    """Trains the tokenizer unless the recorded one matches; returns the tokenizer stats."""
    if (
        paths.tokenizer.is_file()
        and recorded.get("corpus_fingerprint") == documents.fingerprint
        and recorded.get("vocab_size") == vocab_size
        and recorded.get("sha256") == _sha256_file(paths.tokenizer)
    ):
        _log(f"tokenizer up to date ({paths.tokenizer})")
        return recorded
    train_texts = [r["text"] for r in documents.by_split["train"]]
    _log(f"training sentencepiece BPE, vocab_size={vocab_size}, on {len(train_texts)} train files")
    tick = time.perf_counter()
    train_sentencepiece(train_texts, paths.root / "tokenizer", vocab_size)
    _log(f"trained {paths.tokenizer} in {time.perf_counter() - tick:.1f}s")
    tokenizer = SentencePieceTokenizer(paths.tokenizer)
    texts = {split: [r["text"] for r in docs] for split, docs in documents.by_split.items()}
    tokens = {split: count_tokens(tokenizer.encode, split_texts, split) for split, split_texts in texts.items()}
    return {
        "path": paths.tokenizer.name,
        "vocab_size": vocab_size,
        "sha256": _sha256_file(paths.tokenizer),
        "corpus_fingerprint": documents.fingerprint,
        "tokens": tokens,
        "bytes_per_token": {
            split: round(sum(len(t.encode()) for t in texts[split]) / max(1, n), 3) for split, n in tokens.items()
        },
    }


def _write_json_if_changed(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the multi-language corpus -------------------------------------------------------------------
# Python plus the other languages this machine holds, one ArrayRecord source per language (tagged
# "lang"), a shared tokenizer, and the same held-out rule by path. The default corpus above is
# untouched: the quickstart never reads this one.

MULTI_OUT_DIR = "artifacts/corpus_multi"
MULTI_VOCAB_SIZE = 4096  # smaller than the default's: the scaling sweep's models are tiny
MULTI_MAX_BYTES = 3 * 1024 * 1024  # per language, so no language dominates the tokenizer
MULTI_LAYOUT_VERSION = 1
# Lines this long mark minified or generated code (bundled JavaScript, embedded tables).
MAX_LINE_CHARS = 1000


@dataclasses.dataclass(frozen=True)
class LanguageSource:
    """Where one language's files come from: directories scanned for `suffixes`, or zip archives."""

    lang: str
    repo: str
    roots: tuple[Path, ...]
    suffixes: tuple[str, ...]


def _jdk_source_zips() -> tuple[Path, ...]:
    found = {p.resolve() for p in Path("/usr/lib/jvm").glob("*/lib/src.zip") if p.resolve().is_file()}
    return tuple(sorted(found))[-1:]  # one JDK: several versions would repeat the same classes


def _npm_roots() -> tuple[Path, ...]:
    return tuple(p for p in (Path("/usr/lib/node_modules"), Path("/usr/local/lib/node_modules")) if p.is_dir())


def available_languages() -> dict[str, LanguageSource]:
    """The languages whose sources this machine holds: Python (the stdlib) always; C (system headers),
    JavaScript (globally installed npm packages) and Java (the JDK's src.zip) when present."""
    candidates = [
        LanguageSource("python", f"cpython-{sys.version_info.major}.{sys.version_info.minor}", (stdlib_dir(),), (".py",)),
        LanguageSource("c", "usr-include", (Path("/usr/include"),), (".h",)),
        LanguageSource("javascript", "npm-global", _npm_roots(), (".js", ".mjs", ".cjs")),
        LanguageSource("java", "jdk-src", _jdk_source_zips(), (".java",)),
    ]
    return {s.lang: s for s in candidates if any(r.exists() for r in s.roots)}


def _language_files(source: LanguageSource) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(relative path, reader) for each file of the language, directories walked in sorted order."""
    for root in source.roots:
        if root.is_file() and zipfile.is_zipfile(root):
            archive = zipfile.ZipFile(root)
            for name in sorted(archive.namelist()):
                if name.endswith(source.suffixes) and "/test/" not in name:
                    yield f"{root.name}/{name}", functools.partial(archive.read, name)
            continue
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS and d not in ("node_modules", "dist"))
            for name in sorted(files):
                if name.endswith(source.suffixes) and ".min." not in name:
                    path = Path(directory) / name
                    yield f"{root.name}/{path.relative_to(root).as_posix()}", path.read_bytes


def collect_language(source: LanguageSource, max_bytes: int = MULTI_MAX_BYTES) -> Documents:
    """A language's usable files (the default corpus's rules, plus no minified lines), chosen in a
    stable hash order of their paths until `max_bytes`, so the sample spans the whole tree."""
    skipped = {"empty": 0, "generated": 0, "too_large": 0, "not_utf8": 0, "minified": 0}
    by_split: dict[str, list[Record]] = {split: [] for split in SPLITS}
    digest = hashlib.sha256(f"multi={MULTI_LAYOUT_VERSION};heldout={HELDOUT_PERMILLE};lang={source.lang}".encode())
    total = 0
    candidates = sorted((hashlib.sha256(rel.encode()).digest(), rel, read) for rel, read in _language_files(source))
    for _, relative, read in candidates:
        if total >= max_bytes:
            break
        data = read()
        reason = _skip_reason(data)
        if reason is None and max(map(len, data.splitlines()), default=0) > MAX_LINE_CHARS:
            reason = "minified"
        if reason is None and total + len(data) > max_bytes:
            continue
        if reason is None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not_utf8"
        if reason is not None:
            skipped[reason] += 1
            continue
        total += len(data)
        split = "validation" if is_heldout(relative) else "train"
        by_split[split].append({"text": text, "path": relative, "repo": source.repo, "lang": source.lang})
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    if not by_split["train"] or not by_split["validation"]:
        raise ValueError(f"{source.lang}: too few usable files under {source.roots} for both splits (skipped: {skipped})")
    for docs in by_split.values():
        docs.sort(key=lambda r: r["path"])
    return Documents(by_split, skipped, digest.hexdigest())


def multi_arrayrecord_pattern(out_dir: str | os.PathLike[str], lang: str, split: str) -> str:
    """Glob of one language's ArrayRecord shards of a split in a multi-language corpus."""
    return f"{os.fspath(out_dir)}/arrayrecord/{lang}/{split}-*.array_record"


def ensure_multilang_corpus(
    out_dir: str | os.PathLike[str] = MULTI_OUT_DIR,
    languages: Sequence[str] = ("python", "c", "javascript", "java"),
    vocab_size: int = MULTI_VOCAB_SIZE,
    max_bytes: int = MULTI_MAX_BYTES,
    *,
    sources: Mapping[str, LanguageSource] | None = None,
) -> Path:
    """Builds (or verifies) the multi-language corpus: `arrayrecord/<lang>/{train,validation}-*`
    per language, one tokenizer over every language's train split, and stats.json; returns out_dir.

    sources: where each language's files are (default: `available_languages()`). Raises ValueError
    naming the languages asked for that are not there."""
    out_dir = Path(out_dir)
    languages = sorted(languages)  # the tokenizer (and its fingerprint) do not depend on the order asked
    available = available_languages() if sources is None else dict(sources)
    missing = [lang for lang in languages if lang not in available]
    if missing:
        raise ValueError(f"languages {missing} not on this machine; available: {sorted(available)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        stats = _read_stats(out_dir / "stats.json")
        corpus = stats.get("corpus", {})
        documents = {lang: collect_language(available[lang], max_bytes) for lang in languages}
        for lang, docs in documents.items():
            recorded = corpus.get(lang, {})
            shard_dir = out_dir / "arrayrecord" / lang
            present = {split: sorted(p.name for p in shard_dir.glob(f"{split}-*.array_record")) for split in SPLITS}
            if recorded.get("fingerprint") == docs.fingerprint and recorded.get("shards") == present:
                continue
            shutil.rmtree(shard_dir, ignore_errors=True)
            shard_dir.mkdir(parents=True)
            for split in SPLITS:
                shards = _shard(docs.by_split[split], SHARD_BYTES)
                for index, shard in enumerate(shards):
                    write_array_record(shard_dir / f"{split}-{index:05d}-of-{len(shards):05d}.array_record", shard)
            _log(f"{lang}: wrote {({s: len(d) for s, d in docs.by_split.items()})} files (skipped {docs.skipped})")
            corpus[lang] = {
                "fingerprint": docs.fingerprint,
                "files": {split: len(d) for split, d in docs.by_split.items()},
                "bytes": {split: sum(len(r["text"].encode()) for r in d) for split, d in docs.by_split.items()},
                "skipped_files": docs.skipped,
                "shards": {split: sorted(p.name for p in shard_dir.glob(f"{split}-*.array_record")) for split in SPLITS},
            }
        stats["corpus"] = corpus
        combined = hashlib.sha256("".join(corpus[lang]["fingerprint"] for lang in languages).encode()).hexdigest()
        merged = Documents({split: [r for lang in languages for r in documents[lang].by_split[split]] for split in SPLITS},
                           {}, combined)
        paths = dataclasses.replace(_paths(out_dir), stats=out_dir / "stats.json")
        stats["tokenizer"] = _ensure_tokenizer(paths, merged, stats.get("tokenizer", {}), vocab_size)
        _write_json_if_changed(out_dir / "stats.json", stats)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="output directory")
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer vocabulary size")
    parser.add_argument("--source_dir", default=None, help="directory of .py files (default: the stdlib)")
    args = parser.parse_args(argv)
    paths = ensure_corpus(args.out_dir, args.vocab_size, source_dir=args.source_dir)
    print(paths.stats.read_text(), end="")


if __name__ == "__main__":
    main()

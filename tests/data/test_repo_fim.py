"""Repository-level FIM: inside a repository document (<|repo_name|> ... <|file_sep|> path + file ...)
each file is permuted on its own, behind its own separator; decoded from packed training rows."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import base
from data.code import fim
from data.code.repo import file_piece, repository_document
from data.pipeline import build_iterator
from data.tokenizer import SentencePieceTokenizer
from tests.data.conftest import code_records


def repositories(count: int, files: int) -> list[tuple[str, list[dict]]]:
    records = [r for r in code_records(count * files * 2, seed=5, tag="repo") if len(r["text"]) > 20][: count * files]
    return [(f"org/project{i}", records[i * files:(i + 1) * files]) for i in range(count)]


def split_files(tokens: np.ndarray, file_sep_id: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(header up to the first separator, [the tokens of each file])."""
    cuts = np.flatnonzero(tokens == file_sep_id)
    return tokens[:cuts[0]], [tokens[a + 1:b] for a, b in zip(cuts, [*cuts[1:], len(tokens)])]


def test_permute_files_permutes_each_file_behind_its_separator(tokenizer: SentencePieceTokenizer):
    repo, files = repositories(1, 5)[0]
    tokens = np.asarray(repository_document(repo, files, tokenizer)["tokens"], np.int32)
    out = fim.permute_files(tokens, np.random.default_rng(0), tokenizer, tokenizer.file_sep_id, fim_rate=0.6, spm_rate=0.5)
    header, pieces = split_files(out, tokenizer.file_sep_id)
    want_header, want_pieces = split_files(tokens, tokenizer.file_sep_id)
    np.testing.assert_array_equal(header, want_header)
    permuted = [p[0] == tokenizer.fim_prefix_id for p in pieces]
    assert 0 < sum(permuted) < len(pieces)  # some files permuted, some not, at rate 0.6
    assert len(out) == len(tokens) + 3 * sum(permuted)
    for piece, want in zip(pieces, want_pieces):
        assert fim.restore_tokens(piece, tokenizer) == want.tolist()


@pytest.fixture(scope="module")
def repo_corpus(tmp_path_factory: pytest.TempPathFactory, tokenizer: SentencePieceTokenizer) -> tuple[Path, dict]:
    """Three repository documents with spliced separators ("tokens"), as data.prepare writes them."""
    docs = {repo: files for repo, files in repositories(3, 4)}
    path = tmp_path_factory.mktemp("repo_fim") / "train.jsonl"
    with path.open("w") as f:
        for repo, files in docs.items():
            f.write(json.dumps(repository_document(repo, files, tokenizer)) + "\n")
    return path, docs


def test_packed_rows_hold_repository_documents_with_per_file_fim(repo_corpus, tokenizer: SentencePieceTokenizer):
    """Document-level FIM at rate 1 on rows long enough for a whole repository: decode every row's
    documents and find each file behind its separator, in FIM layout, restoring to the file."""
    path, docs = repo_corpus
    cfg = base.get_config().data
    cfg.sources = ml_collections.ConfigDict({"repos": base.source("jsonl", {"train": str(path)})})
    cfg.seq_len, cfg.batch_size, cfg.read_threads, cfg.chunk_shuffle_window = 8192, 1, 1, 0
    cfg.prefetch_buffer_size = 1
    cfg.fim.level, cfg.fim.fim_rate = "document", 1.0
    batch = next(build_iterator(cfg, tokenizer, process_index=0, process_count=1))
    seg, inputs, targets = batch["segment_ids"][0], batch["inputs"][0], batch["targets"][0]
    seen = set()
    for segment in np.unique(seg[seg > 0]):
        where = np.flatnonzero(seg == segment)
        tokens = np.append(inputs[where], targets[where[-1]])
        assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
        header, pieces = split_files(tokens[1:-1], tokenizer.file_sep_id)
        assert header[0] == tokenizer.repo_name_id
        repo = tokenizer.decode(header[1:].tolist()).strip()
        assert len(pieces) == len(docs[repo])
        for piece, file in zip(pieces, docs[repo]):
            assert piece[0] == tokenizer.fim_prefix_id and np.sum(piece == tokenizer.fim_middle_id) == 1
            restored = fim.restore_tokens(piece, tokenizer)
            assert restored == tokenizer.encode(file_piece(file["path"], file["text"]))
            assert tokenizer.decode(restored).startswith(file["path"] + "\n")
        seen.add(repo)
    assert seen == set(docs)  # all three repositories packed into the one 8K row

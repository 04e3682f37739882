"""FIM as a pipeline stage (`data.fim`): valid layouts and exact undo at every level, consistent rows,
exact resume, refusal of changed FIM settings, and the rate of infill targets that see their prefix."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import grain
import ml_collections
import numpy as np
import pytest

from configs import base
from configs.schema import ConfigError
from data.code import fim
from data.config import as_data_config
from data.corpus import collect_documents, stdlib_dir
from data.packing import BATCH_FIELDS
from data.pipeline import build_iterator
from data.tokenizer import SentencePieceTokenizer
from tests.data.conftest import code_records, write_jsonl

LEVELS = ("chunk", "context", "document")


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded corpus's training documents (the stdlib's .py files), as JSONL."""
    records = collect_documents(stdlib_dir(), "stdlib").by_split["train"]
    return write_jsonl(tmp_path_factory.mktemp("fim_stdlib") / "train.jsonl", records)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short code documents (up to ~1.5k characters): a finite epoch that splits some of them."""
    return write_jsonl(tmp_path_factory.mktemp("fim_small") / "train.jsonl", code_records(40, seed=11))


def fim_data_config(path: Path, level: str, seq_len: int, fim_rate: float = 0.5, **overrides) -> ml_collections.ConfigDict:
    """configs/base.py's data section (data.fim at its defaults) on `path`, without chunk shuffling."""
    cfg = base.get_config().data
    cfg.sources = ml_collections.ConfigDict({"code": base.source("jsonl", {"train": str(path)})})
    cfg.seq_len, cfg.batch_size, cfg.prefetch_buffer_size, cfg.read_threads = seq_len, 8, 8, 1
    cfg.chunk_shuffle_window = 0
    cfg.fim.level, cfg.fim.fim_rate = level, fim_rate
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def build(cfg: ml_collections.ConfigDict, tokenizer: SentencePieceTokenizer, **kwargs):
    return build_iterator(cfg, tokenizer, process_index=0, process_count=1, **kwargs)


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(left: list[dict], right: list[dict], fields=None) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        for key in fields or sorted(set(a) | set(b)):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def segments(batches: list[dict], seq_len: int) -> list[tuple[list[int], bool]]:
    """(token stream, cut at the row's end) of every segment, checking each row's invariants on the way."""
    found = []
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            seg, inputs, targets = batch["segment_ids"][row], batch["inputs"][row], batch["targets"][row]
            ids = seg[seg > 0]
            # Segments numbered 1, 2, ... in order, contiguous, padding only at the end, loss only on segments.
            assert np.array_equal(np.unique(ids), np.arange(1, len(np.unique(ids)) + 1))
            assert np.all(np.diff(ids) >= 0) and not np.any(seg[len(ids) :])
            np.testing.assert_array_equal(batch["loss_mask"][row], (seg > 0).astype(np.float32))
            for segment_id in np.unique(ids):
                where = seg == segment_id
                np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
                seg_inputs, seg_targets = inputs[where], targets[where]
                np.testing.assert_array_equal(seg_inputs[1:], seg_targets[:-1])  # one token stream
                at_row_end = bool(where[-1]) and len(ids) == seq_len
                found.append(([*seg_inputs.tolist(), int(seg_targets[-1])], at_row_end))
    return found


def fim_layout(stream: list[int], tokenizer: SentencePieceTokenizer) -> bool:
    """Whether a segment holds a FIM example: exactly one each of the 3 sentinels, in order, <|fim_prefix|>
    first after an optional BOS (asserted); False for a segment without sentinels."""
    sentinels = [tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id]
    found = [token for token in stream if token in sentinels]
    if not found:
        return False
    assert found == sentinels, found
    head = int(stream[0] == tokenizer.bos_id)
    assert stream[head] == tokenizer.fim_prefix_id
    return True


def strip(stream: list[int], tokenizer: SentencePieceTokenizer) -> tuple[list[int], list[int], list[int]]:
    """(leading BOS or [], content, trailing EOS or [])."""
    head = int(stream[0] == tokenizer.bos_id)
    tail = int(stream[-1] == tokenizer.eos_id)
    return stream[:head], stream[head : len(stream) - tail], stream[len(stream) - tail :]


def expected_chunks(records: list[dict], tokenizer: SentencePieceTokenizer, chunk_pairs: int) -> Counter:
    """Token streams of the chunks of BOS + tokens + EOS at `chunk_pairs` pairs, computed directly."""
    chunks = Counter()
    for record in records:
        document = [tokenizer.bos_id, *tokenizer.encode(record["text"]), tokenizer.eos_id]
        for start in range(0, len(document) - 1, chunk_pairs):
            chunks[tuple(document[start : start + chunk_pairs + 1])] += 1
    return chunks


@pytest.mark.parametrize("level", ["chunk", "context"])
def test_layouts_are_valid_and_permuted_at_the_configured_rate(
    stdlib_corpus: Path, tokenizer: SentencePieceTokenizer, level: str
) -> None:
    seq_len = 256
    found = segments(take(build(fim_data_config(stdlib_corpus, level, seq_len), tokenizer), 12), seq_len)
    sentinels = [tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, tokenizer.fim_middle_id]
    permuted = []
    for stream, cut in found:
        if level == "context" and cut:  # cut at the row's end: it may have lost its later sentinels
            present = [token for token in stream if token in sentinels]
            assert present == sentinels[: len(present)]
            assert not present or stream[int(stream[0] == tokenizer.bos_id)] == sentinels[0]
            permuted.append(bool(present))
        else:
            permuted.append(fim_layout(stream, tokenizer))
    assert len(permuted) > 80
    assert 0.35 < np.mean(permuted) < 0.65  # fim_rate 0.5


def test_chunk_level_undoes_to_the_documents_chunks(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    seq_len = 64
    cfg = fim_data_config(small_corpus, "chunk", seq_len, num_epochs=1, shuffle=False)
    found = segments(list(build(cfg, tokenizer)), seq_len)
    restored = Counter()
    for stream, _ in found:
        fim_layout(stream, tokenizer)  # asserts a valid layout where there are sentinels
        head, content, tail = strip(stream, tokenizer)
        restored[tuple(head + fim.restore_tokens(content, tokenizer) + tail)] += 1
    # Chunks are cut 3 pairs short of the row; every one of them comes back exactly once.
    assert restored == expected_chunks(code_records(40, seed=11), tokenizer, seq_len - 3)
    assert 0.3 < np.mean([fim_layout(stream, tokenizer) for stream, _ in found]) < 0.7


def test_context_level_undoes_to_the_rows_without_fim(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    seq_len = 128
    with_fim = list(build(fim_data_config(small_corpus, "context", seq_len, num_epochs=1), tokenizer))
    without = list(build(fim_data_config(small_corpus, "context", seq_len, fim_rate=0.0, num_epochs=1), tokenizer))
    assert len(with_fim) == len(without)  # FIM comes after packing: the same rows, permuted
    checked = cut_short = 0
    for batch, plain in zip(with_fim, without):
        for row in range(batch["inputs"].shape[0]):
            ours = segments([{k: v[row : row + 1] for k, v in batch.items()}], seq_len)
            theirs = segments([{k: v[row : row + 1] for k, v in plain.items()}], seq_len)
            assert len(ours) <= len(theirs)
            for (stream, cut), (original, _) in zip(ours, theirs):
                head, content, tail = strip(stream, tokenizer)
                if cut:  # possibly truncated to the row: a prefix of the (permuted) original
                    cut_short += 1
                    assert len(stream) <= len(original) + 3
                    if tokenizer.fim_prefix_id not in stream:
                        assert stream == original[: len(stream)]
                    continue
                checked += 1
                assert head + fim.restore_tokens(content, tokenizer) + tail == original
    assert checked > 30 and cut_short > 0


def test_document_level_undoes_to_the_texts(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = fim_data_config(small_corpus, "document", 2048, num_epochs=1)  # no document is split
    found = segments(list(build(cfg, tokenizer)), 2048)
    texts = [fim.restore_text(strip(stream, tokenizer)[1], tokenizer) for stream, _ in found]
    assert Counter(texts) == Counter(record["text"] for record in code_records(40, seed=11))
    assert 7 < sum(fim_layout(stream, tokenizer) for stream, _ in found) < 33  # 40 documents, fim_rate 0.5: 4 sigma


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("resume_after, window", [(3, 0), (5, 16)])
def test_resume_yields_the_uninterrupted_batches(
    small_corpus: Path, tokenizer: SentencePieceTokenizer, level: str, resume_after: int, window: int
) -> None:
    cfg = fim_data_config(small_corpus, level, 128, chunk_shuffle_window=window, batch_size=4)
    uninterrupted = take(build(cfg, tokenizer), resume_after + 4)
    assert sum(np.isin(batch["inputs"], tokenizer.fim_middle_id).sum() for batch in uninterrupted) > 3
    interrupted = build(cfg, tokenizer)
    take(interrupted, resume_after)
    state = json.loads(json.dumps(interrupted.get_state()))  # must survive a JSON checkpoint
    assert {key: state["config"][key] for key in ("fim.fim_rate", "fim.spm_rate", "fim.level")} == {
        "fim.fim_rate": 0.5, "fim.spm_rate": 0.5, "fim.level": level}
    resumed = build(cfg, tokenizer)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), uninterrupted[resume_after:])


@pytest.mark.parametrize(
    "field, saved, changed",
    [("level", "chunk", "context"), ("level", "chunk", "document"), ("fim_rate", 0.5, 0.25), ("spm_rate", 0.5, 1.0)],
)
def test_resume_refuses_changed_fim_settings(
    small_corpus: Path, tokenizer: SentencePieceTokenizer, field: str, saved, changed
) -> None:
    cfg = fim_data_config(small_corpus, "chunk", 64)
    state = build(cfg, tokenizer).get_state()
    cfg.fim[field] = changed
    with pytest.raises(ValueError, match=rf"saved with fim\.{field}={saved!r} but this pipeline has fim\.{field}={changed!r}"):
        build(cfg, tokenizer).set_state(state)


def test_resume_refuses_fim_switched_off_or_other_transforms(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = fim_data_config(small_corpus, "chunk", 64)
    state = build(cfg, tokenizer).get_state()
    with pytest.raises(ValueError, match=r"saved with fim\.fim_rate=0\.5 but this pipeline has fim\.fim_rate=0\.0"):
        build(cfg, tokenizer, fim=False).set_state(state)
    other = build(cfg, tokenizer, transforms=[_Upper()])
    with pytest.raises(ValueError, match=r"saved with transforms=\[\] but this pipeline has transforms=\[.*_Upper'\]"):
        other.set_state(state)


class _Upper(grain.transforms.Map):
    """A user record transform."""

    def map(self, record: dict) -> dict:
        return {**record, "text": record["text"].upper()}


def test_fim_off_and_on(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    sentinels = [tokenizer.fim_prefix_id, tokenizer.fim_middle_id, tokenizer.fim_suffix_id]
    inputs = lambda iterator: np.stack([batch["inputs"] for batch in take(iterator, 3)])
    for level in LEVELS:
        cfg = fim_data_config(small_corpus, level, 64, fim_rate=1.0)
        assert np.isin(inputs(build(cfg, tokenizer)), sentinels).any(), level
        assert not np.isin(inputs(build(cfg, tokenizer, fim=False)), sentinels).any(), level
        cfg.fim.fim_rate = 0.0
        assert not np.isin(inputs(build(cfg, tokenizer)), sentinels).any(), level


def test_the_typed_section_gives_the_same_fim_stream(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = fim_data_config(small_corpus, "context", 64)
    assert_same_batches(take(build(cfg, tokenizer), 3), take(build(as_data_config(cfg), tokenizer), 3))


def test_fim_errors_name_the_field(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = fim_data_config(small_corpus, "chunk", 64)
    cfg.fim.level = "row"
    level_message = r"^data\.fim\.level: input should be 'chunk', 'context' or 'document', got 'row'$"
    with pytest.raises(ConfigError, match=level_message):
        build(cfg, tokenizer)
    cfg.fim.level, cfg.seq_len = "chunk", 3
    chunk_message = r"^data\.fim\.level: 'chunk' needs data\.seq_len > 3 \(room for the sentinels\), got seq_len=3$"
    with pytest.raises(ConfigError, match=chunk_message):
        build(cfg, tokenizer)
    cfg.seq_len = 64
    with pytest.raises(ConfigError, match=chunk_message):
        build(cfg, tokenizer, seq_len=3)  # an override is checked as the field is
    cfg.fim.level = "context"
    assert next(build(cfg, tokenizer, seq_len=3))["inputs"].shape == (8, 3)  # only chunks need room for the sentinels
    cfg.fim.level = "chunk"
    with pytest.raises(ValueError, match="FIM comes from data.fim alone"):
        build(cfg, tokenizer, transforms=[fim.FIMTransform(tokenizer)])


@pytest.mark.parametrize("level", LEVELS)
def test_marking_infill_targets_leaves_the_batches_unchanged(
    small_corpus: Path, tokenizer: SentencePieceTokenizer, level: str
) -> None:
    cfg = fim_data_config(small_corpus, level, 128, batch_size=4, chunk_shuffle_window=8)
    marked = take(build(cfg, tokenizer, mark_fim_infill=True), 6)
    assert_same_batches(marked, take(build(cfg, tokenizer), 6), fields=BATCH_FIELDS)
    for batch in marked:
        infill = batch[fim.FIM_INFILL_FIELD]
        assert infill.dtype == np.float32 and infill.shape == batch["inputs"].shape
        assert np.all(infill <= batch["loss_mask"])
    assert sum(batch[fim.FIM_INFILL_FIELD].sum() for batch in marked) > 0


def prefix_rate(path: Path, tokenizer: SentencePieceTokenizer, level: str, seq_len: int, batches: int) -> dict:
    cfg = fim_data_config(path, level, seq_len, batch_size=16)
    return fim.fim_prefix_rate(take(build(cfg, tokenizer, mark_fim_infill=True), batches), tokenizer.fim_prefix_id)


def test_infill_targets_see_their_prefix_at_chunk_and_context_level(
    stdlib_corpus: Path, tokenizer: SentencePieceTokenizer
) -> None:
    """On real batches of the embedded corpus at seq 256: whole-file FIM leaves most middles in rows
    without their <|fim_prefix|>; chunk- and context-level FIM leave none."""
    rates = {level: prefix_rate(stdlib_corpus, tokenizer, level, 256, 20) for level in LEVELS}
    for level, rate in rates.items():
        assert rate["infill_targets"] > 5000, (level, rate)
    assert rates["document"]["rate"] < 0.25, rates["document"]
    assert rates["chunk"]["rate"] == 1.0 and rates["chunk"]["piece_rate"] == 1.0
    assert rates["context"]["rate"] == 1.0 and rates["context"]["piece_rate"] == 1.0


@pytest.mark.slow  # starts grain worker processes: ~10 s
def test_resume_with_worker_processes(small_corpus: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = fim_data_config(small_corpus, "chunk", 128, num_workers=2, chunk_shuffle_window=16, batch_size=4)
    iterators = [build(cfg, tokenizer) for _ in range(3)]
    uninterrupted, interrupted, resumed = iterators
    expected = take(uninterrupted, 7)
    take(interrupted, 3)
    resumed.set_state(json.loads(json.dumps(interrupted.get_state())))
    assert_same_batches(take(resumed, 4), expected[3:])
    for iterator in iterators:
        iterator.close()

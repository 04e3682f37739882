"""Pipeline: determinism, exact resume, per-process sharding, mixtures, transforms, config errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from configs import base
from configs.schema import ConfigError
from data.config import DataConfig, as_data_config
from data.pipeline import build_iterator, to_global_batch
from data.sources import write_array_record
from data.tfds_export import write_tfds_dataset
from data.tokenizer import SentencePieceTokenizer
from tests.data.conftest import code_records, write_jsonl

SEQ_LEN = 128


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_corpus")
    write_jsonl(root / "a-0.jsonl", code_records(20, seed=1, tag="a"))
    write_jsonl(root / "a-1.jsonl", code_records(19, seed=2, tag="a1"))
    write_array_record(root / "b.array_record", code_records(15, seed=3, tag="b"))
    write_jsonl(root / "heldout.jsonl", code_records(5, seed=4, tag="v"))
    return root


def data_config(corpus_dir: Path, **overrides: object) -> ml_collections.ConfigDict:
    """configs/base.py's data section on the test corpus, without FIM or chunk shuffling (plain documents)."""
    cfg = base.get_config().data
    cfg.sources = ml_collections.ConfigDict(
        {"a": base.source("jsonl", {"train": f"{corpus_dir}/a-*.jsonl", "validation": f"{corpus_dir}/heldout.jsonl"})}
    )
    cfg.seq_len = SEQ_LEN
    cfg.batch_size = 4
    cfg.prefetch_buffer_size = 8
    cfg.chunk_shuffle_window = 0
    cfg.fim.fim_rate = 0.0
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def documents_in(batches: list[dict], tokenizer: SentencePieceTokenizer) -> list[str]:
    """Texts of the whole documents in `batches` (every document must fit one row)."""
    texts = []
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            seg = batch["segment_ids"][row]
            for segment_id in np.unique(seg[seg > 0]):
                inputs = batch["inputs"][row][seg == segment_id]
                targets = batch["targets"][row][seg == segment_id]
                assert inputs[0] == tokenizer.bos_id and targets[-1] == tokenizer.eos_id, "document was split"
                texts.append(tokenizer.decode(targets[:-1]))
    return texts


def all_batches(iterator) -> list[dict]:
    return list(iterator)


def test_batches_have_the_documented_layout(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    batch = next(build_iterator(data_config(corpus_dir), tokenizer, process_index=0, process_count=1))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, SEQ_LEN), np.int32),
        "targets": ((4, SEQ_LEN), np.int32),
        "segment_ids": ((4, SEQ_LEN), np.int32),
        "positions": ((4, SEQ_LEN), np.int32),
        "loss_mask": ((4, SEQ_LEN), np.float32),
    }
    same_segment = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (batch["segment_ids"][:, 1:] > 0)
    # Within a segment the next input is the previous target: pairs of one token stream.
    np.testing.assert_array_equal(batch["inputs"][:, 1:][same_segment], batch["targets"][:, :-1][same_segment])
    np.testing.assert_array_equal(batch["loss_mask"], (batch["segment_ids"] > 0).astype(np.float32))


def test_same_seed_same_batches_other_seed_differs(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir, read_threads=2)
    first = take(build_iterator(cfg, tokenizer, seed=7, process_index=0, process_count=1), 6)
    second = take(build_iterator(cfg, tokenizer, seed=7, process_index=0, process_count=1), 6)
    assert_same_batches(first, second)
    other = take(build_iterator(cfg, tokenizer, seed=8, process_index=0, process_count=1), 6)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other))


@pytest.mark.parametrize("resume_after, packing_bins, window", [(1, 4, 0), (5, 3, 0), (17, 32, 0), (7, 4, 16)])
def test_restore_resumes_exactly(
    corpus_dir: Path, tokenizer: SentencePieceTokenizer, resume_after: int, packing_bins: int, window: int
) -> None:
    cfg = data_config(corpus_dir, read_threads=2, packing_bins=packing_bins, chunk_shuffle_window=window)
    cfg.sources.b = base.source("arrayrecord", {"train": f"{corpus_dir}/b.array_record"}, weight=0.5)
    build = lambda: build_iterator(cfg, tokenizer, process_index=0, process_count=1)  # noqa: E731
    uninterrupted = take(build(), resume_after + 6)

    interrupted = build()
    take(interrupted, resume_after)
    state = json.loads(json.dumps(interrupted.get_state()))  # must survive a JSON checkpoint
    assert state["batches"] == resume_after
    resumed = build()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), uninterrupted[resume_after:])


@pytest.mark.slow  # starts grain worker processes: ~10 s
def test_restore_with_worker_processes(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir, num_workers=2)
    build = lambda: build_iterator(cfg, tokenizer, process_index=0, process_count=1)  # noqa: E731
    uninterrupted = build()
    expected = take(uninterrupted, 7)
    interrupted = build()
    take(interrupted, 3)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = build()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected[3:])
    for iterator in (uninterrupted, interrupted, resumed):
        iterator.close()


def test_state_tracks_epochs(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    # One packing bin per batch row: the state then counts exactly the documents emitted.
    cfg = data_config(corpus_dir, seq_len=2048, packing_bins=4)
    iterator = build_iterator(cfg, tokenizer, process_index=0, process_count=1)
    assert iterator.get_state()["epoch"] == 0
    documents_per_epoch, documents_seen = 39, 0
    for _ in range(12):
        documents_seen += int((next(iterator)["inputs"] == tokenizer.bos_id).sum())
        assert iterator.get_state()["epoch"] == documents_seen // documents_per_epoch
    assert documents_seen // documents_per_epoch >= 2


def test_restore_rejects_a_different_stream(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir)
    state = build_iterator(cfg, tokenizer, seed=1, process_index=0, process_count=1).get_state()
    other = build_iterator(cfg, tokenizer, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="saved with seed=1 but this pipeline has seed=2"):
        other.set_state(state)


def test_one_epoch_covers_every_document_once(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir, num_epochs=1, seq_len=2048)
    texts = documents_in(all_batches(build_iterator(cfg, tokenizer, process_index=0, process_count=1)), tokenizer)
    expected = [r["text"] for r in code_records(20, seed=1, tag="a") + code_records(19, seed=2, tag="a1")]
    assert Counter(texts) == Counter(expected)


def test_processes_read_disjoint_shards_covering_the_data(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir, num_epochs=1, seq_len=2048)
    per_process = [
        documents_in(all_batches(build_iterator(cfg, tokenizer, process_index=p, process_count=2)), tokenizer)
        for p in range(2)
    ]
    expected = [r["text"] for r in code_records(20, seed=1, tag="a") + code_records(19, seed=2, tag="a1")]
    assert not set(per_process[0]) & set(per_process[1])
    assert Counter(per_process[0] + per_process[1]) == Counter(expected)
    assert abs(len(per_process[0]) - len(per_process[1])) <= 1


def test_finite_epoch_drops_no_token(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    """Long documents are split and the last partial batch is padded, not dropped."""
    cfg = data_config(corpus_dir, num_epochs=1, seq_len=32, batch_size=3)
    batches = all_batches(build_iterator(cfg, tokenizer, process_index=0, process_count=1))
    records = code_records(20, seed=1, tag="a") + code_records(19, seed=2, tag="a1")
    expected_pairs = sum(len(tokenizer.encode(r["text"])) + 1 for r in records)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == expected_pairs
    assert sum(int((b["inputs"] == tokenizer.bos_id).sum()) for b in batches) == len(records)


def test_mixture_follows_weights(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir, seq_len=2048)
    cfg.sources.b = base.source("arrayrecord", {"train": f"{corpus_dir}/b.array_record"}, weight=3.0)
    texts = documents_in(take(build_iterator(cfg, tokenizer, process_index=0, process_count=1), 5), tokenizer)
    assert len(texts) > 60
    from_b = sum(t.startswith("# b ") for t in texts)
    assert 0.7 < from_b / len(texts) < 0.8


def test_validation_split_and_tfds_source(corpus_dir: Path, tokenizer: SentencePieceTokenizer, tmp_path: Path) -> None:
    records = code_records(5, seed=4, tag="v")
    write_tfds_dataset(tmp_path, "toy", {"validation": [records]})
    tfds_cfg = data_config(corpus_dir, num_epochs=1, seq_len=2048, shuffle=False)
    tfds_cfg.sources = ml_collections.ConfigDict(
        {"t": base.source("tfds", {"validation": "validation"}, tfds_name="toy", tfds_data_dir=str(tmp_path))}
    )
    jsonl_cfg = data_config(corpus_dir, num_epochs=1, seq_len=2048, shuffle=False)
    from_tfds = all_batches(build_iterator(tfds_cfg, tokenizer, split="validation", process_index=0, process_count=1))
    from_jsonl = all_batches(build_iterator(jsonl_cfg, tokenizer, split="validation", process_index=0, process_count=1))
    assert_same_batches(from_tfds, from_jsonl)
    assert sorted(documents_in(from_tfds, tokenizer)) == sorted(r["text"] for r in records)


class _PrefixFimToken(grain.transforms.Map):
    """A stand-in for a FIM transform: emits tokens, masks the first half of the loss."""

    def __init__(self, tokenizer: SentencePieceTokenizer):
        self._tokenizer = tokenizer

    def map(self, record: dict) -> dict:
        tokens = [self._tokenizer.fim_prefix_id, *self._tokenizer.encode(record["text"])]
        half = len(tokens) // 2
        return {**record, "tokens": tokens, "loss_mask": [0.0] * half + [1.0] * (len(tokens) - half)}


def test_transforms_supply_tokens_and_loss_mask(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir, seq_len=2048)
    batch = next(
        build_iterator(cfg, tokenizer, process_index=0, process_count=1, transforms=[_PrefixFimToken(tokenizer)])
    )
    seg = batch["segment_ids"][0]
    first = seg == 1
    targets = batch["targets"][0][first]
    assert batch["inputs"][0][0] == tokenizer.bos_id and targets[0] == tokenizer.fim_prefix_id
    num_tokens = len(targets) - 1  # the last target is EOS
    expected_mask = [0.0] * (num_tokens // 2) + [1.0] * (num_tokens - num_tokens // 2) + [1.0]
    assert batch["loss_mask"][0][first].tolist() == expected_mask


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c, "seq_len", 0), r"^data\.seq_len: input should be greater than or equal to 1, got 0$"),
        (lambda c: setattr(c, "num_epochs", 0), r"^data\.num_epochs: input should be greater than or equal to 1"),
        (lambda c: setattr(c, "shuffle_seed", 2**32), r"^data\.shuffle_seed: input should be less than 4294967296, "),
        (lambda c: setattr(c, "seq_lne", 64), r"^no field 'data\.seq_lne'; did you mean 'data\.seq_len'\?$"),
        (lambda c: setattr(c.sources.a, "weight", -1.0),
         r"^data\.sources\.a\.weight: input should be greater than 0, got -1\.0$"),
        (lambda c: setattr(c.sources.a, "kind", "csv"),
         r"^data\.sources\.a\.kind: input should be 'jsonl', 'arrayrecord' or 'tfds', got 'csv'$"),
        (lambda c: setattr(c.sources.a, "kind", "tfds"), r"^data\.sources\.a\.tfds_name: required for a tfds source$"),
        (lambda c: c.sources.a.splits.update({"train": ""}),
         r"^data\.sources\.a\.splits\.train: string should have at least 1 character, got ''$"),
        (lambda c: setattr(c, "sources", ml_collections.ConfigDict()),
         r"^data\.sources: dictionary should have at least 1 item"),
    ],
)
def test_invalid_config_names_the_field(
    corpus_dir: Path, tokenizer: SentencePieceTokenizer, mutate, message: str
) -> None:
    cfg = data_config(corpus_dir)
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        as_data_config(cfg)
    with pytest.raises(ConfigError, match=message):
        build_iterator(cfg, tokenizer, process_index=0, process_count=1)


def test_overrides_are_checked_like_config_fields(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir)
    with pytest.raises(ConfigError, match=r"^data\.seq_len: input should be greater than or equal to 1, got 0$"):
        build_iterator(cfg, tokenizer, seq_len=0, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match=r"^data\.shuffle_seed: input should be greater than or equal to 0, got -1$"):
        build_iterator(cfg, tokenizer, seed=-1, process_index=0, process_count=1)


def test_build_errors_name_the_field(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    cfg = data_config(corpus_dir)
    with pytest.raises(ValueError, match=r"data\.sources\.a\.splits has no 'test' entry"):
        build_iterator(cfg, tokenizer, split="test", process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"data\.batch_size=4 is not divisible by process_count=3"):
        build_iterator(cfg, tokenizer, process_index=0, process_count=3)
    cfg.sources.a.splits.train = f"{corpus_dir}/nothing-*.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.a\.splits\.train: no file matches"):
        build_iterator(cfg, tokenizer, process_index=0, process_count=1)


def test_a_data_config_and_its_config_dict_give_the_same_stream(
    corpus_dir: Path, tokenizer: SentencePieceTokenizer
) -> None:
    cfg = data_config(corpus_dir)
    typed = as_data_config(cfg)
    assert isinstance(typed, DataConfig) and as_data_config(typed) is typed
    build = lambda c: build_iterator(c, tokenizer, seed=3, process_index=0, process_count=1)  # noqa: E731
    assert_same_batches(take(build(cfg), 3), take(build(typed), 3))


def test_default_config_is_valid() -> None:
    assert isinstance(as_data_config(base.get_config().data), DataConfig)


def test_to_global_batch_shards_rows_over_the_mesh(corpus_dir: Path, tokenizer: SentencePieceTokenizer) -> None:
    devices = np.array(jax.devices()).reshape(4, 2)
    mesh = Mesh(devices, ("data", "model"))
    batch = next(build_iterator(data_config(corpus_dir, batch_size=8), tokenizer))
    global_batch = to_global_batch(batch, mesh, PartitionSpec("data"))
    for key, array in global_batch.items():
        assert array.shape == (8, SEQ_LEN) and array.sharding.spec == PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(array), batch[key])
    assert global_batch["inputs"].addressable_shards[0].data.shape == (2, SEQ_LEN)

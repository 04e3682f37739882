"""The training input pipeline: sources -> tokens -> packed batches -> global arrays.

Per process (host), as grain datasets:

    each source: records[process_index::process_count] -> shuffle -> repeat
    -> weighted mix of sources -> user transforms -> [FIM, level "document"] -> tokenize
    -> split long documents -> [FIM, level "chunk"] -> shuffle chunks in windows
    -> first-fit pack into rows -> [FIM, level "context"] -> batch -> pad last batch

The config is the typed `data` section, `data.config.DataConfig` (validated once: by
`train.config.load_run_config` with the rest of a run, or by `data.config.as_data_config` when
`build_iterator` is given its ml_collections ConfigDict). Fill-in-the-middle is configured by
`data.fim` (`data.config.FIMConfig`; levels in `data.code.fim`) and applied when its fim_rate > 0
unless `build_iterator(..., fim=False)`.

Every process reads only its slice of every source, so P processes together
read each record exactly once per epoch. With `data.host_sharding="global"` every
process instead runs the whole stream (as process 0 of 1) and keeps its rows of
each global batch, so the batches do not depend on the process count: a P-process
run trains on exactly what a 1-process run does, and resumes on any process
count. Shuffling is a seeded permutation
that changes every epoch, so the stream is a pure function of (config, seed,
process_index, process_count); `DataIterator.get_state()` records the position
in it and `set_state` resumes exactly there. See `data.packing` for how
documents become rows (BOS/EOS, pairs, splitting, segment ids, positions).

With several sources the mixture ends when any source runs out, so
`num_epochs` counts passes over that source; `num_epochs=None` repeats forever
(the usual pretraining setting). Processes may emit different numbers of
batches from a finite dataset: train for a fixed number of steps instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags as absl_flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.schema import to_dict
from data.code import fim as fim_lib
from data.config import FIM_SENTINELS, DataConfig, FIMConfig, as_data_config
from data.packing import BATCH_FIELDS, PAIR_FIELDS, PadBatch, SplitLongDocuments, TokenizeDocument, pack_rows
from data.sources import open_source
from data.tokenizer import Tokenizer

STATE_VERSION = 1
FIM_SEED_SALT = 0x46494D  # "FIM": derives the seed of the FIM stage from the shuffle seed
Batch = dict[str, np.ndarray]


def _derived_seed(seed: int, *salt: int) -> int:
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1, dtype=np.uint32)[0])


class DataIterator:
    """Iterator over local batches with a JSON-serialisable, restorable state.

    Each batch is {field: np.ndarray [local_batch, seq_len]} with fields
    `BATCH_FIELDS`: "inputs"/"targets"/"segment_ids"/"positions" int32 and
    "loss_mask" float32 (segment id 0 and loss_mask 0 mark padding).

    State: {"version", "config" (what the stream depends on: seed, split,
    sizes, sources, process layout, transforms, every FIM field), "batches" (emitted so far), "epoch"
    (informational: completed passes over this process's data), "position"
    (grain's iterator state)}. `set_state` refuses a state whose config differs,
    naming the field.
    """

    def __init__(self, dataset: grain.IterDataset, stream_config: dict[str, Any], documents_per_epoch: int):
        self._iterator = iter(dataset)
        self._stream_config = stream_config
        self._documents_per_epoch = documents_per_epoch
        self._batches = 0

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        position = self._iterator.get_state()
        return {
            "version": STATE_VERSION,
            "config": copy.deepcopy(self._stream_config),
            "batches": self._batches,
            "epoch": _documents_read(position) // self._documents_per_epoch,
            "position": position,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state: version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = state.get("config", {})
        for key in sorted(set(saved) | set(self._stream_config)):
            if saved.get(key) != self._stream_config.get(key):
                raise ValueError(
                    f"data iterator state was saved with {key}={saved.get(key)!r} but this pipeline "
                    f"has {key}={self._stream_config.get(key)!r}"
                )
        self._iterator.set_state(state["position"])
        self._batches = int(state["batches"])

    def close(self) -> None:
        """Stops background threads/processes (also done on garbage collection)."""
        self._iterator.close()


def _documents_read(position: Any) -> int:
    """Sum of the record positions ("next_index") found in a grain iterator state."""
    if isinstance(position, Mapping):
        own = position.get("next_index", 0)
        return (own if isinstance(own, int) else 0) + sum(_documents_read(v) for v in position.values())
    if isinstance(position, (list, tuple)):
        return sum(_documents_read(v) for v in position)
    return 0


def build_iterator(
    data_cfg: DataConfig | ml_collections.ConfigDict | Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int | None = None,
    batch_size: int | None = None,
    split: str = "train",
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    transforms: Sequence[Any] = (),
    fim: bool = True,
    mark_fim_infill: bool = False,
) -> DataIterator:
    """Builds this process's batch iterator.

    Args:
      data_cfg: the `data` section: a DataConfig, or its ConfigDict or nested mapping (e.g.
        `configs.base.get_config().data`), validated by `data.config.as_data_config`.
      tokenizer: encodes "text" and provides BOS/EOS/pad ids.
      seq_len: row length; default `data_cfg.seq_len`. Overrides are validated as config fields are.
      batch_size: global batch size (over all processes); each process emits
        batch_size // process_count rows. Default `data_cfg.batch_size`.
      split: which entry of each source's `splits` to read.
      seed: shuffle seed; default `data_cfg.shuffle_seed`. Also seeds random
        transforms.
      process_index, process_count: this process's slot; default from JAX.
      transforms: grain transforms (Map, RandomMap, Filter, ...) applied to
        records ({"text", path, repo, lang}) before tokenization. A record they
        return with "tokens" (ids, no BOS/EOS) is not re-tokenized; the
        pipeline always adds BOS/EOS. An optional per-token "loss_mask" is kept.
        FIM is not one of them: it comes from `data_cfg.fim`.
      fim: apply `data_cfg.fim` (when present with fim_rate > 0) at its level; False gives plain
        left-to-right rows (e.g. for a held-out loss comparable across runs).
      mark_fim_infill: diagnostic; batches get one more field, `fim.FIM_INFILL_FIELD` (float32
        [local_batch, seq_len], 1 at infill targets, see `fim.fim_prefix_rate`); the other
        fields are exactly those of the unmarked stream.

    Returns:
      A `DataIterator`.
    """
    cfg = as_data_config(data_cfg)
    overrides = {"seq_len": seq_len, "batch_size": batch_size, "shuffle_seed": seed}
    overrides = {field: value for field, value in overrides.items() if value is not None}
    if overrides:  # parsed, so the schema checks them as it checks the file's fields (dataclasses.replace would not)
        cfg = as_data_config({**to_dict(cfg), **overrides})
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by process_count={process_count}")
    local_batch = cfg.batch_size // process_count
    # Global host sharding: read as the only process, batch globally, keep this process's rows.
    rows_of_process = process_index if cfg.host_sharding == "global" else None
    if rows_of_process is not None:
        process_index, process_count, batch_rows = 0, 1, cfg.batch_size
    else:
        batch_rows = local_batch
    fim_cfg = _fim_config(cfg, transforms) if fim else None
    level = fim_cfg.level if fim_cfg is not None else None
    fim_seed = _derived_seed(cfg.shuffle_seed, FIM_SEED_SALT)

    names = sorted(cfg.sources)
    per_source, per_source_one_epoch = [], []
    for source_index, name in enumerate(names):
        source_cfg = cfg.sources[name]
        field = f"data.sources.{name}.splits"
        if split not in source_cfg.splits:
            raise ValueError(f"{field} has no {split!r} entry (has {sorted(source_cfg.splits)})")
        source = open_source(
            source_cfg.kind,
            source_cfg.splits[split],
            field=f"{field}.{split}",
            text_field=source_cfg.text_field,
            tfds_name=source_cfg.tfds_name or None,
            tfds_data_dir=source_cfg.tfds_data_dir or None,
        )
        shard = grain.MapDataset.source(source)[process_index::process_count]
        if len(shard) == 0:
            raise ValueError(f"{field}.{split}: {len(source)} records cannot feed {process_count} processes")
        if cfg.shuffle:
            shard = shard.shuffle(seed=_derived_seed(cfg.shuffle_seed, source_index))
        per_source_one_epoch.append(shard)
        per_source.append(shard.repeat(cfg.num_epochs))
    weights = [cfg.sources[name].weight for name in names]
    documents = _mix(per_source, weights)
    documents_per_epoch = len(_mix(per_source_one_epoch, weights))

    documents = documents.seed(cfg.shuffle_seed)  # seeds random user transforms
    if transforms:
        documents = documents.apply(list(transforms))
    if level == "document":
        fim_transform = fim_lib.FIMTransform(tokenizer, fim_cfg.fim_rate, fim_cfg.spm_rate)
        documents = documents.random_map(fim_transform, seed=fim_seed)
    documents = documents.map(TokenizeDocument(tokenizer))
    if mark_fim_infill and level in (None, "document"):
        documents = documents.map(fim_lib.MarkInfill(tokenizer.fim_middle_id))  # before splitting a document
    tokenized = documents.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    )
    # Chunk-level FIM adds its sentinels to a chunk: cut chunks that many pairs short of a row.
    chunk_len = cfg.seq_len - FIM_SENTINELS if level == "chunk" else cfg.seq_len
    chunks = tokenized.apply([SplitLongDocuments(chunk_len)])
    if level == "chunk":
        chunks = chunks.random_map(
            fim_lib.FIMChunks(tokenizer, fim_cfg.fim_rate, fim_cfg.spm_rate), seed=fim_seed
        )
        if mark_fim_infill:
            chunks = chunks.map(fim_lib.MarkInfill(tokenizer.fim_middle_id))
    if cfg.chunk_shuffle_window > 1:
        # A long file splits into many consecutive chunks; without mixing, one batch can hold
        # little besides one file. Shuffling within windows of chunks keeps batches diverse.
        chunks = grain.experimental.WindowShuffleIterDataset(
            chunks, window_size=cfg.chunk_shuffle_window, seed=_derived_seed(cfg.shuffle_seed, len(names))
        )
    packed_fields = PAIR_FIELDS + ((fim_lib.FIM_INFILL_FIELD,) if mark_fim_infill and level != "context" else ())
    rows = pack_rows(chunks, cfg.seq_len, cfg.packing_bins, tokenizer.pad_id, packed_fields)
    if level == "context":
        context_fim = fim_lib.ContextFIMRows(tokenizer, fim_cfg.fim_rate, fim_cfg.spm_rate, tokenizer.pad_id)
        rows = rows.random_map(context_fim, seed=fim_seed)
        if mark_fim_infill:
            rows = rows.map(fim_lib.MarkInfill(tokenizer.fim_middle_id))
    batches = rows.batch(batch_rows, drop_remainder=False).map(PadBatch(batch_rows, tokenizer.pad_id))
    if rows_of_process is not None:
        batches = batches.map(TakeRows(rows_of_process * local_batch, local_batch))
    if cfg.num_workers:
        if not absl_flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; programs not started through
            # absl.app must mark them parsed (google/grain issues #1355, #1360).
            absl_flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))

    stream_config = {
        "split": split,
        "seed": cfg.shuffle_seed,
        "shuffle": cfg.shuffle,
        "num_epochs": cfg.num_epochs,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "packing_bins": cfg.packing_bins,
        "chunk_shuffle_window": cfg.chunk_shuffle_window,
        "num_workers": cfg.num_workers,
        "host_sharding": cfg.host_sharding,
        "process_index": process_index,  # 0 of 1 with global host sharding: any process count resumes
        "process_count": process_count,
        "vocab_size": tokenizer.vocab_size,
        "sources": {
            name: [cfg.sources[name].kind, cfg.sources[name].splits[split], cfg.sources[name].weight]
            for name in names
        },
        # Every transform shapes the stream: user transforms by class, FIM by every setting.
        "transforms": [f"{type(t).__module__}.{type(t).__qualname__}" for t in transforms],
        **(fim_lib.stream_config(fim_cfg) if fim_cfg is not None else {"fim.fim_rate": 0.0}),
    }
    if mark_fim_infill:
        stream_config["fim.mark_infill"] = True
    return DataIterator(batches, stream_config, max(1, documents_per_epoch))


def _fim_config(cfg: DataConfig, transforms: Sequence[Any]) -> FIMConfig | None:
    """The FIM the pipeline applies: `cfg.fim` (validated with `cfg`), None when its fim_rate is 0.

    Raises ValueError when `transforms` already holds a FIM transform (FIM would be applied twice).
    """
    if cfg.fim.fim_rate == 0:
        return None
    if any(isinstance(t, fim_lib.FIMTransform) for t in transforms):
        raise ValueError("transforms hold a FIMTransform while data.fim.fim_rate > 0: FIM comes from data.fim alone")
    return cfg.fim


class TakeRows(grain.transforms.Map):
    """A batch's rows [start, start + count): this process's part of a global batch."""

    def __init__(self, start: int, count: int):
        self.start, self.count = start, count

    def map(self, batch: Batch) -> Batch:
        return {name: array[self.start : self.start + self.count] for name, array in batch.items()}


def _mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def to_global_batch(
    batch: Mapping[str, np.ndarray],
    mesh: Mesh,
    partition_spec: PartitionSpec | None = None,
) -> dict[str, jax.Array]:
    """Assembles every process's local batch into globally sharded arrays.

    Args:
      batch: this process's {field: [local_batch, ...]} arrays.
      mesh: the device mesh.
      partition_spec: sharding of each array; default shards the batch
        dimension over all mesh axes. Process p's rows become global rows
        [p * local_batch, (p + 1) * local_batch) when the batch axis is
        laid out process by process (the usual mesh construction).

    Returns:
      {field: jax.Array [local_batch * process_count, ...]}.
    """
    spec = PartitionSpec(tuple(mesh.axis_names)) if partition_spec is None else partition_spec
    sharding = NamedSharding(mesh, spec)
    return {field: jax.make_array_from_process_local_data(sharding, array) for field, array in batch.items()}


__all__ = [
    "BATCH_FIELDS",
    "DataIterator",
    "build_iterator",
    "to_global_batch",
]

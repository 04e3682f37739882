"""The training input pipeline: sources -> tokens -> packed batches -> global arrays.

Per process (host), as grain datasets:

    each source: records[process_index::process_count] -> shuffle -> repeat
    -> weighted mix of sources -> user transforms -> [FIM, level "document"] -> tokenize
    -> split long documents -> [FIM, level "chunk"] -> shuffle chunks in windows
    -> first-fit pack into rows -> [FIM, level "context"] -> batch -> pad last batch

Fill-in-the-middle is configured by `data.fim` (`data.code.config.default_fim_config`; levels in
`data.code.fim`) and applied when its fim_rate > 0 unless `build_iterator(..., fim=False)`.

Every process reads only its slice of every source, so P processes together
read each record exactly once per epoch. Shuffling is a seeded permutation
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

from data import corpus
from data.code import config as fim_config_lib
from data.code import fim as fim_lib
from data.packing import BATCH_FIELDS, PAIR_FIELDS, PadBatch, SplitLongDocuments, TokenizeDocument, pack_rows
from data.sources import SOURCE_KINDS, open_source
from data.tokenizer import Tokenizer

STATE_VERSION = 1
FIM_SEED_SALT = 0x46494D  # "FIM": derives the seed of the FIM stage from the shuffle seed
Batch = dict[str, np.ndarray]


def source_config(
    kind: str,
    splits: Mapping[str, str],
    *,
    weight: float = 1.0,
    text_field: str = "text",
    tfds_name: str = "",
    tfds_data_dir: str = "",
) -> ml_collections.ConfigDict:
    """Config of one data source.

    Args:
      kind: "jsonl", "arrayrecord" or "tfds".
      splits: pipeline split name -> the source's data for it: comma-separated
        files/glob patterns for jsonl/arrayrecord, a TFDS split expression
        (e.g. "train[:90%]") for tfds.
      weight: relative sampling weight in the mixture.
      text_field: name of the text field in raw records.
      tfds_name, tfds_data_dir: TFDS dataset name and data directory (tfds only).
    """
    return ml_collections.ConfigDict(
        {
            "kind": kind,
            "splits": dict(splits),
            "weight": float(weight),
            "text_field": text_field,
            "tfds_name": tfds_name,
            "tfds_data_dir": tfds_data_dir,
        }
    )


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a codelm config: the embedded stdlib corpus."""
    cfg = ml_collections.ConfigDict()
    out_dir = corpus.DEFAULT_OUT_DIR
    cfg.sources = ml_collections.ConfigDict(
        {"stdlib": source_config("arrayrecord", {s: corpus.arrayrecord_pattern(out_dir, s) for s in corpus.SPLITS})}
    )
    cfg.tokenizer_path = f"{out_dir}/tokenizer.model"
    cfg.seq_len = 1024
    cfg.batch_size = 8  # global: summed over processes
    cfg.shuffle = True
    cfg.shuffle_seed = 0
    cfg.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
    cfg.num_workers = 0  # grain worker processes; 0 keeps everything in this process
    cfg.read_threads = 2  # threads reading + tokenizing documents (per process or worker)
    cfg.prefetch_buffer_size = 64  # documents read ahead by those threads
    cfg.packing_bins = 32  # rows filled at once by first-fit packing (more: less padding)
    cfg.chunk_shuffle_window = 0  # >1: shuffle document chunks within windows of this many before packing
    return cfg


def _field(cfg: ml_collections.ConfigDict, name: str, prefix: str) -> Any:
    if name not in cfg:
        raise ValueError(f"{prefix}.{name} is missing")
    return cfg[name]


def _check_int(cfg: ml_collections.ConfigDict, name: str, prefix: str, minimum: int) -> None:
    value = _field(cfg, name, prefix)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{prefix}.{name} must be an integer >= {minimum}, got {value!r}")


def validate_data_config(cfg: ml_collections.ConfigDict, prefix: str = "data") -> None:
    """Raises ValueError naming the first invalid field of a data config."""
    for name, minimum in [
        ("seq_len", 1),
        ("batch_size", 1),
        ("shuffle_seed", 0),
        ("num_workers", 0),
        ("read_threads", 1),
        ("prefetch_buffer_size", 1),
        ("packing_bins", 1),
        ("chunk_shuffle_window", 0),
    ]:
        _check_int(cfg, name, prefix, minimum)
    if _field(cfg, "num_epochs", prefix) is not None:
        _check_int(cfg, "num_epochs", prefix, 1)
    if not isinstance(_field(cfg, "shuffle", prefix), bool):
        raise ValueError(f"{prefix}.shuffle must be a bool, got {cfg.shuffle!r}")
    if cfg.shuffle_seed >= 2**32:
        raise ValueError(f"{prefix}.shuffle_seed must be < 2**32, got {cfg.shuffle_seed}")
    sources = _field(cfg, "sources", prefix)
    if not _is_mapping(sources) or not sources:
        raise ValueError(f"{prefix}.sources must name at least one source")
    for name, source in sources.items():
        where = f"{prefix}.sources.{name}"
        kind = _field(source, "kind", where)
        if kind not in SOURCE_KINDS:
            raise ValueError(f"{where}.kind must be one of {SOURCE_KINDS}, got {kind!r}")
        weight = _field(source, "weight", where)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}.weight must be a positive number, got {weight!r}")
        splits = _field(source, "splits", where)
        if not _is_mapping(splits) or not all(isinstance(v, str) and v for v in splits.values()):
            raise ValueError(f"{where}.splits must map split names to non-empty strings, got {splits!r}")
        if kind == "tfds" and not source.get("tfds_name"):
            raise ValueError(f"{where}.tfds_name is required for a tfds source")
    fim = getattr(cfg, "fim", None)
    if fim is not None:
        fim_config_lib.validate_fim_config(fim, f"{prefix}.fim")


def _is_mapping(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


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
    data_cfg: ml_collections.ConfigDict,
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
      data_cfg: a data config (see `default_data_config`).
      tokenizer: encodes "text" and provides BOS/EOS/pad ids.
      seq_len: row length; default `data_cfg.seq_len`.
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
    cfg = data_cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.seq_len = cfg.seq_len if seq_len is None else seq_len
        cfg.batch_size = cfg.batch_size if batch_size is None else batch_size
        cfg.shuffle_seed = cfg.shuffle_seed if seed is None else seed
    validate_data_config(cfg)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by process_count={process_count}")
    local_batch = cfg.batch_size // process_count
    fim_settings = _fim_settings(data_cfg, cfg.seq_len, transforms) if fim else None
    level = fim_settings.level if fim_settings is not None else None
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
        fim_transform = fim_lib.FIMTransform(tokenizer, fim_settings.fim_rate, fim_settings.spm_rate)
        documents = documents.random_map(fim_transform, seed=fim_seed)
    documents = documents.map(TokenizeDocument(tokenizer))
    if mark_fim_infill and level in (None, "document"):
        documents = documents.map(fim_lib.MarkInfill(tokenizer.fim_middle_id))  # before splitting a document
    tokenized = documents.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    )
    # Chunk-level FIM adds 3 sentinels to a chunk: cut chunks 3 pairs short of a row.
    chunk_len = cfg.seq_len - fim_lib.SENTINELS_PER_EXAMPLE if level == "chunk" else cfg.seq_len
    chunks = tokenized.apply([SplitLongDocuments(chunk_len)])
    if level == "chunk":
        chunks = chunks.random_map(
            fim_lib.FIMChunks(tokenizer, fim_settings.fim_rate, fim_settings.spm_rate), seed=fim_seed
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
        context_fim = fim_lib.ContextFIMRows(tokenizer, fim_settings.fim_rate, fim_settings.spm_rate, tokenizer.pad_id)
        rows = rows.random_map(context_fim, seed=fim_seed)
        if mark_fim_infill:
            rows = rows.map(fim_lib.MarkInfill(tokenizer.fim_middle_id))
    batches = rows.batch(local_batch, drop_remainder=False).map(PadBatch(local_batch, tokenizer.pad_id))
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
        "process_index": process_index,
        "process_count": process_count,
        "vocab_size": tokenizer.vocab_size,
        "sources": {
            name: [cfg.sources[name].kind, cfg.sources[name].splits[split], cfg.sources[name].weight]
            for name in names
        },
        # Every transform shapes the stream: user transforms by class, FIM by every setting.
        "transforms": [f"{type(t).__module__}.{type(t).__qualname__}" for t in transforms],
        **(fim_settings.stream_config() if fim_settings is not None else {"fim.fim_rate": 0.0}),
    }
    if mark_fim_infill:
        stream_config["fim.mark_infill"] = True
    return DataIterator(batches, stream_config, max(1, documents_per_epoch))


def _fim_settings(data_cfg: Any, seq_len: int, transforms: Sequence[Any]) -> fim_lib.FIMSettings | None:
    """The FIM the pipeline applies: `data_cfg.fim` (read by attribute, validated), None when absent or off.

    Raises ConfigError naming the field ("data.fim.level: ...") for invalid settings, and
    ValueError when `transforms` already holds a FIM transform (FIM would be applied twice).
    """
    fim_cfg = getattr(data_cfg, "fim", None)
    if fim_cfg is None:
        return None
    settings = fim_lib.FIMSettings.from_config(fim_cfg, "data.fim")
    if settings.fim_rate == 0:
        return None
    if any(isinstance(t, fim_lib.FIMTransform) for t in transforms):
        raise ValueError("transforms hold a FIMTransform while data.fim.fim_rate > 0: FIM comes from data.fim alone")
    if settings.level == "chunk" and seq_len <= fim_lib.SENTINELS_PER_EXAMPLE:
        raise fim_config_lib.ConfigError(
            f"data.fim.level: 'chunk' needs data.seq_len > {fim_lib.SENTINELS_PER_EXAMPLE} (room for the sentinels), "
            f"got seq_len={seq_len}"
        )
    return settings


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
    "default_data_config",
    "source_config",
    "to_global_batch",
    "validate_data_config",
]

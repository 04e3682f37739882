"""The `data` section of a run config as typed, frozen schemas (`configs/schema.py`).

`load_run_config` validates it with the rest of a run; `as_data_config` validates the section alone
(an ml_collections ConfigDict or nested mapping), for callers of `data.pipeline.build_iterator`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import ml_collections
from pydantic import Field

from configs.schema import ConfigError, parse, section

NonEmpty = Annotated[str, Field(min_length=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
FIM_LEVELS = ("chunk", "context", "document")
FIM_SENTINELS = 3  # tokens a FIM example adds: <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>


@section
class SourceConfig:
    """One source of documents. splits: pipeline split name -> comma-separated files/globs
    (jsonl, arrayrecord) or a TFDS split expression such as "train[:90%]" (tfds)."""

    kind: Literal["jsonl", "arrayrecord", "tfds"]
    splits: dict[str, NonEmpty]
    weight: Annotated[float, Field(gt=0.0)] = 1.0
    text_field: str = "text"
    tfds_name: str = ""
    tfds_data_dir: str = ""

    def __post_init__(self) -> None:
        if self.kind == "tfds" and not self.tfds_name:
            raise ConfigError("tfds_name: required for a tfds source")


@section
class FIMConfig:
    """Fill-in-the-middle (data/code/fim.py). level: "chunk" permutes each row-sized piece of a
    document (every infill target has its prefix in its row), "context" each document of a packed
    row (Bavarian et al.'s context-level FIM), "document" whole files before they are split."""

    fim_rate: Fraction = 0.5
    spm_rate: Fraction = 0.5
    level: Literal[FIM_LEVELS] = "chunk"


@section
class DataConfig:
    """Sources, tokenizer and batch shape. batch_size is global (summed over processes)."""

    sources: Annotated[dict[str, SourceConfig], Field(min_length=1)]
    tokenizer_path: NonEmpty
    seq_len: Annotated[int, Field(ge=1)] = 1024
    batch_size: Annotated[int, Field(ge=1)] = 8
    shuffle: bool = True
    shuffle_seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    num_epochs: Annotated[int, Field(ge=1)] | None = None  # None: repeat forever
    num_workers: Annotated[int, Field(ge=0)] = 0
    read_threads: Annotated[int, Field(ge=1)] = 2
    prefetch_buffer_size: Annotated[int, Field(ge=1)] = 64
    packing_bins: Annotated[int, Field(ge=1)] = 32
    chunk_shuffle_window: Annotated[int, Field(ge=0)] = 0
    # "records": each process reads every P-th record and packs its own rows (scales with hosts).
    # "global": each process builds the whole global batch stream and keeps its rows: batches do not
    # depend on the number of processes (a run resumes on another process count, a P-process run
    # equals a 1-process run), at the cost of every host reading and tokenizing everything.
    host_sharding: Literal["records", "global"] = "records"
    fim: FIMConfig = FIMConfig(fim_rate=0.0)

    def __post_init__(self) -> None:
        if self.fim.fim_rate > 0 and self.fim.level == "chunk" and self.seq_len <= FIM_SENTINELS:
            raise ConfigError(
                f"fim.level: 'chunk' needs data.seq_len > {FIM_SENTINELS} (room for the sentinels), "
                f"got seq_len={self.seq_len}"
            )


def as_data_config(cfg: DataConfig | ml_collections.ConfigDict | Mapping[str, Any]) -> DataConfig:
    """`cfg` as a validated DataConfig: a DataConfig is returned as is, a ConfigDict or nested mapping
    is parsed; raises ConfigError naming the field ("data.seq_len: ...")."""
    if isinstance(cfg, DataConfig):
        return cfg
    return parse(DataConfig, _plain(cfg), "data")


def _plain(value: Any) -> Any:
    """Nested ConfigDicts and mappings as plain dicts."""
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value

"""A training run's config: every section typed and frozen, validated once at load.

    run = load_run_config(config_dict)          # raises ConfigError naming the field path
    run.train.steps, run.data.seq_len, run.model.d_model, run.mesh.make(), ...

Sections are owned by the layer that reads them (model: models/config.py, data: data/config.py,
mesh: models/sharding.py, sampler: models/sampler.py, optim: train/optimizer.py); this module adds
the train and checkpoint sections and the checks that span sections. SFT and RL extend `RunConfig`
with their own sections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import jax
from ml_collections import ConfigDict
from pydantic import Field

from configs.schema import ConfigError, parse, section, to_dict, unknown_field
from data.config import DataConfig
from models.config import ModelConfig, config_from_dict
from models.layers import available_attention_kernels
from models.moe import GROUPED_MATMUL_KERNELS
from models.sampler import SamplerConfig
from models.sharding import MeshConfig
from train.optimizer import OptimConfig

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

# Fields that shape the optimizer trajectory: a resume that changes them is refused unless
# `checkpoint.allow_changes` lists them (or their section).
TRAJECTORY_FIELDS = ("optim", "train.steps", "train.grad_accum", "data.batch_size")


@section
class TrainConfig:
    steps: PositiveInt = 10000
    grad_accum: PositiveInt = 1  # micro-batches per step; data.batch_size is split among them
    z_loss: Annotated[float, Field(ge=0.0)] = 0.0  # coefficient of log(Z)^2 (PaLM: 1e-4)
    seed: NonNegativeInt = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 500  # 0: no evaluation
    eval_batches: NonNegativeInt = 20
    output_dir: Annotated[str, Field(min_length=1)] = "runs/base"
    # A codelm run directory or an HF checkpoint whose weights (not optimizer or step) start a pretraining run:
    # continued pretraining, or context extension with the model section's new rope_theta / rope_scaling /
    # max_seq_len. "": fresh weights. SFT and RL read theirs from sft.init_from / rl.init_from.
    init_from: str = ""
    peak_tflops_per_device: Annotated[float, Field(ge=0.0)] = 0.0  # 0: look the device up
    profile_start_step: NonNegativeInt = 0
    profile_num_steps: NonNegativeInt = 0  # > 0: trace that many steps into output_dir/profile


@section
class CheckpointConfig:
    every: PositiveInt = 500
    keep_last: PositiveInt = 3
    keep_every: NonNegativeInt = 0  # also keep every M-th step forever; 0 disables
    async_save: bool = True
    resume: bool = True
    allow_changes: str = ""  # comma-separated fields/sections a resume may change (TRAJECTORY_FIELDS)

    @property
    def allowed_changes(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.allow_changes.split(",") if part.strip())


@section
class RunConfig:
    model: ModelConfig
    data: DataConfig
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sampler: SamplerConfig = SamplerConfig()

    # Fields that shape the optimizer trajectory (see TRAJECTORY_FIELDS); jobs add their own sections.
    trajectory_fields: ClassVar[tuple[str, ...]] = TRAJECTORY_FIELDS

    @property
    def micro_batch_size(self) -> int:
        return self.data.batch_size // self.train.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


R = TypeVar("R", bound=RunConfig)


def check_run(run: RunConfig, *, n_devices: int, n_processes: int, platform: str) -> None:
    """Checks that span sections, on the devices the run will use; raises ConfigError."""
    data, train, model = run.data, run.train, run.model
    if data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len: {data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if data.batch_size % train.grad_accum:
        raise ConfigError(f"train.grad_accum: must divide data.batch_size={data.batch_size}, got {train.grad_accum}")
    if data.batch_size % n_processes:
        raise ConfigError(f"data.batch_size: {data.batch_size} does not divide over {n_processes} processes")
    shards = run.mesh.batch_shards(n_devices)
    if run.micro_batch_size % shards:
        where = f"data-parallel size {shards} of mesh {run.mesh.shape(n_devices)}"
        if train.grad_accum == 1:
            raise ConfigError(f"data.batch_size: {data.batch_size} rows must be divisible by the {where}")
        raise ConfigError(
            f"train.grad_accum: each micro-batch (data.batch_size / train.grad_accum = {run.micro_batch_size} rows) "
            f"must be divisible by the {where}"
        )
    kernels = available_attention_kernels(platform)
    if model.attention_impl not in kernels:
        raise ConfigError(
            f"model.attention_impl: {model.attention_impl!r} is not available on {platform}; available: {', '.join(kernels)}"
        )
    if model.moe is not None and model.moe.grouped_matmul not in ("auto", *GROUPED_MATMUL_KERNELS):
        raise ConfigError(
            f"model.moe.grouped_matmul: no kernel {model.moe.grouped_matmul!r}; "
            f"available: auto, {', '.join(sorted(GROUPED_MATMUL_KERNELS))}"
        )


def load_run_config(
    cfg: ConfigDict | Mapping[str, Any],
    schema: type[R] = RunConfig,  # type: ignore[assignment]
    *,
    n_devices: int | None = None,
    n_processes: int | None = None,
    platform: str | None = None,
    model_base: ModelConfig | None = None,
) -> R:
    """Validates a config (an ml_collections ConfigDict or nested mapping) into `schema`.

    The model section is a preset plus overrides (see `models.config.config_from_dict`), or, with
    `model_base` (a fine-tune's starting checkpoint), overrides of that config; every other section
    is parsed by its schema. Cross-section checks run against the given device and process counts
    (default: this JAX runtime's)."""
    raw = cfg.to_dict() if isinstance(cfg, ConfigDict) else dict(cfg)
    known = {f.name for f in dataclasses.fields(schema)}
    for name in raw:
        if name not in known:
            raise unknown_field("", name, known)
    if "model" not in raw:
        raise ConfigError("model: missing (every config starts from configs/base.py)")
    raw["model"] = config_from_dict(raw["model"] or {}, base=model_base)
    run = parse(schema, raw)
    check_run(
        run,
        n_devices=jax.device_count() if n_devices is None else n_devices,
        n_processes=jax.process_count() if n_processes is None else n_processes,
        platform=platform or jax.default_backend(),
    )
    return run


def trajectory_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], fields: tuple[str, ...] = TRAJECTORY_FIELDS
) -> list[tuple[str, Any, Any]]:
    """(field path, saved value, current value) for each of `fields` (a section or a section.field)
    that differs between two `RunConfig.to_dict()` results."""
    changes = []
    for field in fields:
        section_name, _, name = field.partition(".")
        old, new = saved.get(section_name, {}), current.get(section_name, {})
        pairs = [(f"{section_name}.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))] if not name else [
            (field, old.get(name), new.get(name))]
        changes += [(path, a, b) for path, a, b in pairs if a != b]
    return changes


def is_allowed(path: str, allowed: tuple[str, ...]) -> bool:
    return any(path == a or path.startswith(a + ".") for a in allowed)

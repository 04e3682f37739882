"""Reading and writing Hugging Face checkpoints (config.json + safetensors) as codelm Decoders.

Import reads one codelm parameter at a time: its HF tensors (one per layer, per expert) are read from
the memory-mapped safetensors files, converted to codelm's layout, stacked, cast, and placed straight
into their target shards, so host memory holds one parameter at a time, never the whole model.
Export is the reverse, one parameter at a time, into safetensors shards of bounded size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from configs.sharding_rules import DEFAULT_RULES
from models.config import ConfigError, ModelConfig
from models.decoder import Decoder, plan_stacks
from models.hf.family import LAYER_PREFIX, Family, HFConfig, TensorMap
from models.hf.layouts import Layout
from models.hf.registry import get_family, infer_family
from models.hf.safetensors_io import CheckpointFormatError, SafetensorsReader, write_sharded
from models.lora import adapters, apply_lora
from models.sharding import Rules, state_shardings

CONFIG_FILE = "config.json"
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

StatePath = tuple[str | int, ...]


# ---- config ------------------------------------------------------------------------------------------


def read_hf_config(directory: str | os.PathLike[str], **overrides: Any) -> tuple[ModelConfig, Family]:
    """The ModelConfig and family of an HF checkpoint directory's config.json.

    Parameters default to the checkpoint's own dtype (`torch_dtype` / `dtype`, float32 if absent) and
    computation to float32 for float32 checkpoints, bfloat16 otherwise; `overrides` set any
    ModelConfig field (e.g. dtype="float32", scan_layers=False, remat="none").
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a Hugging Face checkpoint directory (no {CONFIG_FILE})")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON: {error}") from None
    family = get_family(values.get("model_type"), f"{path}: field 'model_type'")
    hf = HFConfig(values, str(path), family.defaults)
    fields = family.config_fields(hf)
    param_dtype = _HF_DTYPES.get(str(values.get("dtype") or values.get("torch_dtype") or "float32"), "float32")
    fields.update(
        name=Path(directory).resolve().name,
        param_dtype=param_dtype,
        dtype="float32" if param_dtype == "float32" else "bfloat16",
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields), family
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# ---- which HF tensors make which codelm parameter -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """A codelm parameter (`path` in the Decoder's state) and the HF tensors that make it.

    names: HF tensor names laid out like the parameter's leading axes (layers when scanned, then
    experts); a 0-d array for a parameter made of one tensor.
    """

    path: StatePath
    names: np.ndarray
    layout: Layout


def param_sources(cfg: ModelConfig, family: Family) -> list[ParamSource]:
    """Every codelm parameter of `Decoder(cfg)` with the HF tensors of `family` that make it.

    A stack's pattern position j (`models.decoder.LayerStack`) is layer first + r * period + j of
    repeat r; positions are a path component only in stacks whose pattern has several layers."""
    sources = [ParamSource(t.codelm, np.array(t.hf), t.layout) for t in family.global_tensors(cfg)]
    for plan in plan_stacks(cfg):
        for j, spec in enumerate(plan.pattern):
            prefix = ("stacks", plan.name, "blocks") + ((j,) if len(plan.pattern) > 1 else ())
            for tensor in family.block_tensors(cfg, spec.moe):
                template = LAYER_PREFIX + tensor.hf

                def layer_names(layer: int, tensor: TensorMap = tensor, template: str = template) -> np.ndarray:
                    if tensor.per_expert:
                        return np.array([template.format(layer=layer, expert=e) for e in range(cfg.moe.num_experts)])
                    return np.array(template.format(layer=layer))

                layers = [plan.layer(r, j) for r in range(plan.repeats)]
                if cfg.scan_layers:
                    names = np.stack([layer_names(layer) for layer in layers])
                    sources.append(ParamSource((*prefix, *tensor.codelm), names, tensor.layout))
                else:
                    sources += [ParamSource((*prefix, r, *tensor.codelm), layer_names(layer), tensor.layout)
                                for r, layer in enumerate(layers)]
    return sources


def _mapped(flat: Mapping[StatePath, nnx.Variable], sources: list[ParamSource]) -> set[StatePath]:
    """The variables a checkpoint holds: every parameter, and the buffers the family maps (DeepSeek-V3's
    router bias, `e_score_correction_bias`)."""
    planned = {s.path for s in sources}
    return {path for path, variable in flat.items() if isinstance(variable, nnx.Param) or path in planned}


def _check_covers(sources: list[ParamSource], state_paths: set[StatePath], family: Family) -> None:
    planned = {s.path for s in sources}
    if planned != state_paths:
        missing = sorted(map(str, state_paths - planned))
        extra = sorted(map(str, planned - state_paths))
        raise ConfigError(f"{family.model_type} tensor map does not match the Decoder: unmapped {missing}, unknown {extra}")


# ---- import --------------------------------------------------------------------------------------------


def _read_param(reader: SafetensorsReader, source: ParamSource, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The parameter's value on the host, in codelm layout, cast to `dtype`."""
    out = np.empty(shape, dtype)
    lead = source.names.shape
    for index in np.ndindex(lead):
        name = str(source.names[index])
        hf = reader[name]
        try:
            value = source.layout.to_codelm(hf)
        except ValueError:
            value = None
        if value is None or value.shape != shape[len(lead):]:
            expected = source.layout.to_hf(np.empty(shape[len(lead):], np.int8)).shape
            raise CheckpointFormatError(
                f"{reader.source}: tensor {name!r} has shape {tuple(hf.shape)}, the config implies {expected}"
            )
        out[index] = value  # casts
    return out


def _place(value: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_hf_checkpoint(
    directory: str | os.PathLike[str],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    **overrides: Any,
) -> Decoder:
    """A Decoder holding the weights of an HF checkpoint directory (config.json + safetensors).

    With `mesh`, every parameter is placed directly in the shards `rules` (default
    `configs.sharding_rules.DEFAULT_RULES`) give it; without, on the default device. `overrides` are
    ModelConfig fields (see `read_hf_config`). Checkpoint tensors that map to no parameter are an
    error (they mean the config and weights disagree). Variables that are not parameters (the MoE
    router's selection bias) take their initial value, zero. With a `lora` override, the base weights
    are loaded and fresh adapters (B = 0, A from seed 0) added on top (`models.lora.apply_lora`).
    """
    cfg, family = read_hf_config(directory, **overrides)
    if cfg.lora is not None:
        base = load_hf_checkpoint(directory, mesh=mesh, rules=rules, **{**overrides, "lora": None})
        return apply_lora(base, cfg.lora, nnx.Rngs(0))
    rules = tuple(rules or DEFAULT_RULES)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abstract_state))
    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, rules))) if mesh else {}
    sources = param_sources(cfg, family)
    params = _mapped(flat, sources)
    _check_covers(sources, params, family)
    for path in set(flat) - params:  # buffers HF has no counterpart for (the MoE selection bias) start at zero
        value = flat[path].get_value()
        flat[path] = flat[path].replace(_place(np.zeros(value.shape, value.dtype), shardings[path].get_value() if mesh else None))

    start = time.perf_counter()
    with SafetensorsReader(directory) as reader:
        used = {str(name) for s in sources for name in s.names.flat}
        unused = {name for name in reader.keys() if name not in used and not family.ignores(name, cfg)}
        if unused:
            raise CheckpointFormatError(f"{reader.source}: tensors {sorted(unused)[:8]} map to no parameter of {cfg.name}")
        for i, source in enumerate(sources):
            variable = flat[source.path]
            abstract_value = variable.get_value()
            host = _read_param(reader, source, tuple(abstract_value.shape), np.dtype(abstract_value.dtype))
            sharding = shardings[source.path].get_value() if mesh else None
            flat[source.path] = variable.replace(_place(host, sharding))
            del host
            logging.info("loaded %d/%d %s", i + 1, len(sources), "/".join(map(str, source.path)))
    logging.info("loaded %s (%s) in %.1fs", directory, family.model_type, time.perf_counter() - start)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- export --------------------------------------------------------------------------------------------


def _to_host(value: jax.Array) -> np.ndarray:
    if value.is_fully_addressable:
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _hf_tensors(model: Decoder, family: Family, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    sources = param_sources(model.cfg, family)
    _check_covers(sources, _mapped(flat, sources), family)
    for source in sources:
        value = _to_host(flat[source.path].get_value())
        for index in np.ndindex(source.names.shape):
            yield str(source.names[index]), source.layout.to_hf(value[index]).astype(dtype)


def save_hf_checkpoint(
    model: Decoder,
    directory: str | os.PathLike[str],
    *,
    family: str | None = None,
    dtype: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Writes `model` as an HF checkpoint directory that `transformers` (and codelm) can load.

    family: HF model_type to write (default: the first family that can express the config; an error
      names the field no family can express). dtype: tensor dtype on disk (default the parameters').
    extra_config: more config.json fields, e.g. bos_token_id / eos_token_id.
    On several hosts every process must call this (parameters are gathered); process 0 writes.
    A model with LoRA adapters is refused: `models.lora.merge_lora` folds them into the weights first.
    """
    if adapters(model):
        raise ValueError("save_hf_checkpoint: the model has LoRA adapters; export merge_lora(model) instead")
    cfg = model.cfg
    fam = get_family(family) if family else infer_family(cfg)
    dtype = dtype or cfg.param_dtype
    config = fam.hf_config(cfg)
    config.update(torch_dtype=dtype, dtype=dtype, **(extra_config or {}))
    tensors = _hf_tensors(model, fam, np.dtype(jax.numpy.dtype(dtype)))
    directory = Path(directory)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in the gathers
            pass
        return directory
    files = write_sharded(tensors, directory, max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logging.info("wrote %s as %s (%d files)", directory, fam.model_type, len(files))
    return directory


"""Pretrained models on disk: codelm training-run directories and Hugging Face checkpoints.

A run directory holds `run_config.json` (the resolved model config and the run's full config),
`tokenizer.model` (or `tokenizer.json`) and orbax checkpoints under `checkpoints/<step>/`. Training
writes it (`train.checkpoint`); everything that samples, evaluates or fine-tunes reads it from here,
so no layer below `train` needs to import `train`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from configs.sharding_rules import DEFAULT_RULES
from data.hf_tokenizer import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, HFTokenizer
from data.hf_tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from data.tokenizer import Tokenizer
from data.tokenizers import load_tokenizer
from models.config import ModelConfig
from models.decoder import Decoder
from models.hf import load_hf_checkpoint
from models.hf.checkpoint import CONFIG_FILE, read_hf_config
from models.sharding import Rules, abstract_with_shardings, make_mesh, state_shardings

RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
RUN_TOKENIZERS = ("tokenizer.model", TOKENIZER_FILE)
HF_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE)


def trainable_variables(model_cfg: ModelConfig) -> Any:
    """The nnx filter of what a run trains (and checkpoints as `params`): the LoRA adapters when the
    model has them, else every parameter. Everything else is checkpointed as `rest`."""
    return nnx.LoRAParam if model_cfg.lora is not None else nnx.Param


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / RUN_CONFIG).is_file()


def write_run_metadata(run_dir: Path, model_cfg: ModelConfig, config: dict[str, Any], tokenizer_path: str) -> None:
    """Records what a run trains and copies its tokenizer beside it (process 0 only), so that
    `load_trained_model` needs only the run directory. Written atomically."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_cfg.to_dict(), "config": config}
    tmp = run_dir / f".{RUN_CONFIG}.tmp"
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, run_dir / RUN_CONFIG)
    tokenizer = Path(tokenizer_path)
    if tokenizer.is_file() and tokenizer.name != TOKENIZER_FILE:
        shutil.copyfile(tokenizer, run_dir / RUN_TOKENIZERS[0])
        return
    # A Hugging Face tokenizer: tokenizer.json with its config, chat template and generation config.
    directory = tokenizer.parent if tokenizer.is_file() else tokenizer
    for name in HF_TOKENIZER_FILES:
        if (directory / name).is_file() and directory.resolve() != run_dir.resolve():
            shutil.copyfile(directory / name, run_dir / name)


def read_run_metadata(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """{"model": ModelConfig fields, "config": the run's config} of a run directory."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a codelm run directory (no {RUN_CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def run_model_config(run_dir: str | os.PathLike[str]) -> ModelConfig:
    return ModelConfig(**read_run_metadata(run_dir)["model"])


def run_tokenizer_path(run_dir: str | os.PathLike[str]) -> Path | None:
    """The tokenizer a run directory holds: its sentencepiece model, or itself when it holds an HF
    tokenizer.json (with tokenizer_config.json and chat template beside it); None without one."""
    run_dir = Path(run_dir)
    if (run_dir / RUN_TOKENIZERS[0]).is_file():
        return run_dir / RUN_TOKENIZERS[0]
    return run_dir if (run_dir / TOKENIZER_FILE).is_file() else None


def run_tokenizer(run_dir: str | os.PathLike[str]) -> Tokenizer | None:
    path = run_tokenizer_path(run_dir)
    return None if path is None else load_tokenizer(path)


def pretrained_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The model config of a codelm run directory or a Hugging Face checkpoint directory."""
    if is_run_dir(path):
        return run_model_config(path)
    if (Path(path) / CONFIG_FILE).is_file():
        return read_hf_config(path)[0]
    raise FileNotFoundError(
        f"{path}: neither a codelm training run ({RUN_CONFIG}) nor a Hugging Face checkpoint directory ({CONFIG_FILE})"
    )


def pretrained_tokenizer_path(path: str | os.PathLike[str]) -> Path:
    """Where the tokenizer of a run directory or HF checkpoint directory is (see `run_tokenizer_path`)."""
    found = run_tokenizer_path(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.model or {TOKENIZER_FILE})")
    return found


def extend_model(base: nnx.Module, cfg: ModelConfig, seed: int = 0) -> Decoder:
    """`Decoder(cfg)` whose variables include all of `base`'s (e.g. `base` plus LoRA adapters):
    `base`'s values are reused, and only the variables `base` lacks are initialised (inside jit,
    so the rest of the model is never materialised twice)."""
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    base_values = dict(nnx.to_flat_state(nnx.state(base)))
    missing = [path for path, _ in nnx.to_flat_state(abstract_state) if path not in base_values]

    def init_missing() -> list[Any]:
        flat = dict(nnx.to_flat_state(nnx.state(make())))
        return [flat[path] for path in missing]

    new_values = dict(zip(missing, jax.jit(init_missing)()))
    flat = [(path, base_values[path] if path in base_values else new_values[path])
            for path, _ in nnx.to_flat_state(abstract_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_trained_model(
    run_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **overrides: Any,
) -> tuple[Decoder, Tokenizer | None]:
    """(model, tokenizer) from a training run directory: parameters of checkpoint `step` (default the
    latest), placed on `mesh` (default: all devices, fully sharded over fsdp). Only the parameters
    and model variables are read, not the optimizer state. `overrides` change model fields that do
    not change parameter shapes (remat, dtype, attention_impl)."""
    run_dir = Path(run_dir)
    model_cfg = run_model_config(run_dir)
    if overrides:
        model_cfg = model_cfg.replace(**overrides)
    mesh = mesh or make_mesh({"fsdp": -1})
    abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, trainable_variables(model_cfg), ...)
    target = {
        "params": abstract_with_shardings(abstract_params, state_shardings(abstract_params, mesh, rules)),
        "rest": abstract_with_shardings(abstract_rest, state_shardings(abstract_rest, mesh, rules)),
    }
    manager = ocp.CheckpointManager((run_dir / CHECKPOINTS).absolute(), item_names=("state", "data"))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{run_dir}/{CHECKPOINTS}: no checkpoint to load")
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    finally:
        manager.close()
    model = nnx.merge(graphdef, restored["params"], restored["rest"])
    return model, run_tokenizer(run_dir)


def load_pretrained(
    path: str | os.PathLike[str], *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, **overrides: Any
) -> tuple[Decoder, Tokenizer]:
    """(model, tokenizer) from a codelm run directory or a Hugging Face checkpoint directory
    (config.json + safetensors + tokenizer.json)."""
    path = Path(path)
    if is_run_dir(path):
        model, tokenizer = load_trained_model(path, mesh=mesh, rules=rules, **overrides)
        if tokenizer is None:
            raise FileNotFoundError(f"{path}: the run saved no tokenizer")
        return model, tokenizer
    if (path / CONFIG_FILE).is_file():
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} beside the weights")
        return load_hf_checkpoint(path, mesh=mesh, rules=rules, **overrides), HFTokenizer(path)
    raise FileNotFoundError(
        f"{path}: neither a codelm training run ({RUN_CONFIG}) nor a Hugging Face checkpoint directory ({CONFIG_FILE})"
    )

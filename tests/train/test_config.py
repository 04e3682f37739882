"""One typed config: every section validated once at load, errors naming the full field path,
misspellings with a suggestion, checks across sections, and the same from the command line."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import base, quickstart
from configs.schema import ConfigError
from models.config import ModelConfig
from train.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[2]


def load(mutate, n_devices=8, platform="cpu"):
    cfg = quickstart.get_config()
    mutate(cfg)
    return load_run_config(cfg, n_devices=n_devices, n_processes=1, platform=platform)


def test_sections_are_typed_and_frozen():
    run = load(lambda cfg: None)
    assert isinstance(run, RunConfig) and isinstance(run.model, ModelConfig)
    assert run.train.steps == 300 and run.data.seq_len == 256 and run.mesh.ici.fsdp == -1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.steps = 5  # type: ignore[misc]


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.train, "stpes", 3), "no field 'train.stpes'; did you mean 'train.steps'?"),
    (lambda c: setattr(c, "trian", {}), "no field 'trian'; did you mean 'train'?"),
    (lambda c: setattr(c.model, "d_modle", 3), "no field 'model.d_modle'; did you mean 'model.d_model'?"),
    (lambda c: setattr(c.mesh.ici, "fdsp", 2), "no field 'mesh.ici.fdsp'; did you mean 'mesh.ici.fsdp'?"),
    (lambda c: setattr(c.data.fim, "fim_rat", 0.1), "no field 'data.fim.fim_rat'; did you mean 'data.fim.fim_rate'?"),
    (lambda c: setattr(c.train, "steps", 0), "train.steps: input should be greater than or equal to 1, got 0"),
    (lambda c: setattr(c.optim, "schedule", "linear"), "optim.schedule: input should be 'cosine', 'wsd' or 'constant', got 'linear'"),
    (lambda c: setattr(c.train, "on_nonfinite", "ignore"), "train.on_nonfinite: input should be 'stop' or 'skip'"),
    (lambda c: setattr(c.data.fim, "level", "row"), "data.fim.level: input should be 'chunk', 'context' or 'document'"),
    (lambda c: setattr(c.mesh, "rules", "megatron"), "mesh.rules: got 'megatron', allowed values are default, data_parallel"),
    (lambda c: setattr(c.mesh.ici, "fsdp", 0), "mesh.ici.fsdp: must be a positive integer or -1, got 0"),
    (lambda c: setattr(c.model, "n_kv_heads", 3), "model.n_kv_heads: must divide n_heads=4, got 3"),
    (lambda c: setattr(c.data, "sources", {"x": base.source("tfds", {"train": "train"})}), "data.sources.x.tfds_name: required"),
    # across sections
    (lambda c: setattr(c.data, "seq_len", 4096), "data.seq_len: 4096 exceeds model.max_seq_len=1024"),
    (lambda c: setattr(c.train, "grad_accum", 3), "train.grad_accum: must divide data.batch_size=16, got 3"),
    (lambda c: setattr(c.data, "batch_size", 12), "data.batch_size: 12 rows must be divisible by the data-parallel size 8"),
    (lambda c: setattr(c.train, "grad_accum", 4), "train.grad_accum: each micro-batch (data.batch_size / train.grad_accum = 4 rows) must be divisible by the data-parallel size 8"),
    (lambda c: setattr(c.model, "attention_impl", "cudnn"), "model.attention_impl: 'cudnn' is not available on cpu; available: blockwise, chunked, ring, xla"),
])
def test_errors_name_the_field_path(mutate, message):
    with pytest.raises(ConfigError) as error:
        load(mutate)
    assert str(error.value).startswith(message), str(error.value)


def test_data_parallel_size_comes_from_the_rules_and_mesh():
    # tensor parallelism does not split the batch: 8 devices as fsdp=2 x tensor=4 need batches of 2k rows
    load(lambda c: (setattr(c.mesh.ici, "tensor", 4), setattr(c.data, "batch_size", 2)))
    with pytest.raises(ConfigError, match="data-parallel size 2"):
        load(lambda c: (setattr(c.mesh.ici, "tensor", 4), setattr(c.data, "batch_size", 3)))


def test_kernels_available_on_the_platform_pass():
    assert load(lambda c: setattr(c.model, "attention_impl", "cudnn"), platform="gpu").model.attention_impl == "cudnn"


def test_base_config_lists_every_model_field():
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "rope_scaling", "moe", "lora", "mla"}
    assert set(base.MODEL_FIELDS) == fields


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "train.pretrain", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_command_line_errors_are_one_line_with_the_field_path():
    proc = run_cli("--config.train.stpes=3")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "config error: no field 'train.stpes'; did you mean 'train.steps'?"), proc.stderr
    proc = run_cli("--config=configs/quickstart.py", "--config.data.seq_len=100000")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "config error: data.seq_len: 100000 exceeds model.max_seq_len=1024"), proc.stderr

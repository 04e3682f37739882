"""Fixtures for training tests: a small code corpus (JSONL) and tokenizer, and run configs over them."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import ConfigDict

from configs import base
from data.tokenizer import train_sentencepiece
from data.tokenizers import load_tokenizer
from train.config import RunConfig, load_run_config

# Compiles shorter than this are not worth a cache file (eager ops); the train steps take seconds.
MIN_CACHED_COMPILE_S = 0.1

MODULES = ["argparse", "ast", "collections/__init__", "dataclasses", "difflib", "inspect", "json/decoder",
           "pathlib", "shutil", "string", "textwrap", "typing"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train_corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(m, (stdlib / f"{m}.py").read_text()) for m in MODULES]
    for split, part in (("train", texts[:-2]), ("validation", texts[-2:])):
        with (root / f"{split}.jsonl").open("w") as f:
            for name, text in part:
                # Several documents per module, so packing and shuffling have work to do.
                for i, chunk in enumerate(text.split("\n\n\n")):
                    f.write(json.dumps({"text": chunk, "path": f"{name}.py#{i}"}) + "\n")
    train_sentencepiece([t for _, t in texts], root / "tok", vocab_size=512)
    return root


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent XLA compilation cache for this session's training tests, fresh each session."""
    return tmp_path_factory.mktemp("xla_cache")


def compilation_cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment variables that point a training subprocess at the session's compilation cache."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_CACHED_COMPILE_S)}


@pytest.fixture(scope="package", autouse=True)
def reuse_compilations(compilation_cache_dir):
    """Most runs here compile the same small model's train and eval steps (a fresh `jax.jit` per
    Trainer, so the in-memory cache misses); compiling dominates their time, so reuse compilations
    through the persistent cache, for this package only."""
    previous = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_S)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def small_run_config(corpus_dir: Path, output_dir: Path, **train_overrides) -> ConfigDict:
    """A complete training config for a ~0.1M-parameter model on the test corpus."""
    cfg = base.get_config()
    cfg.model = ConfigDict({"preset": "tiny", "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4,
                            "n_kv_heads": 2, "d_ff": 128})
    cfg.data.sources = ConfigDict({"code": base.source(
        "jsonl", {s: str(corpus_dir / f"{s}.jsonl") for s in ("train", "validation")})})
    cfg.data.tokenizer_path = str(corpus_dir / "tok.model")
    cfg.data.seq_len = 64
    cfg.data.batch_size = 8
    cfg.data.read_threads = 1
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 2
    cfg.train.steps = 6
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.output_dir = str(output_dir)
    cfg.checkpoint.every = 1000
    cfg.checkpoint.async_save = False
    for key, value in train_overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def small_run(corpus_dir: Path, output_dir: Path, **train_overrides) -> RunConfig:
    """`small_run_config`, validated."""
    return load_run_config(small_run_config(corpus_dir, output_dir, **train_overrides))


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    return load_tokenizer(corpus_dir / "tok.model")

"""Pretraining from another run's weights (`train.init_from`): continued pretraining and context extension.
The new run starts from the source's parameters under its own RoPE settings and row length, records
them, and a resume restores its own checkpoint rather than the source's weights."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from configs.schema import ConfigError
from models.pretrained import load_trained_model
from tests.train.conftest import small_run
from tests.train.test_trainer import MESH_STEPS
from train.pretrain import pretrain


def params(run_dir):
    return jax.tree.leaves(nnx.state(load_trained_model(run_dir), nnx.Param))


@pytest.fixture(scope="module")
def source(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("init_from") / "source"
    pretrain(small_run(corpus_dir, out, train__steps=MESH_STEPS, sampler__prompt=""))  # no sample: not checked
    return out


def test_context_extension_starts_from_the_source_weights(corpus_dir, source, tmp_path):
    def extended(out, **init_from):
        return small_run(corpus_dir, out, train__steps=1, data__seq_len=128, model__rope_theta=1e5,
                         model__rope_scaling=ConfigDict({"kind": "linear", "factor": 2.0}), optim__lr=1e-12,
                         optim__warmup_steps=0, sampler__prompt="", **init_from)

    out = tmp_path / "extended"
    pretrain(extended(out, train__init_from=str(source)))
    source_params = params(source)
    for a, b in zip(params(out), source_params, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-8)  # one update at lr 1e-12: the source's weights
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["config"]["train"]["init_from"] == str(source) and saved["model"]["rope_theta"] == 1e5
    assert saved["model"]["rope_scaling"]["kind"] == "linear" and saved["config"]["data"]["seq_len"] == 128

    fresh = tmp_path / "fresh"  # the same run without init_from starts elsewhere (and compiles the same step)
    pretrain(extended(fresh))
    assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(params(fresh), source_params, strict=True))


def test_init_from_names_a_missing_run(corpus_dir, tmp_path):
    with pytest.raises((ConfigError, FileNotFoundError), match="nowhere"):
        pretrain(small_run(corpus_dir, tmp_path / "x", train__steps=1, train__init_from=str(tmp_path / "nowhere")))

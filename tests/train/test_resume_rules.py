"""Resume cannot damage a run: a changed model is refused naming the config field and leaves the run
directory as it was; shape mismatches name the parameter; optimizer/schedule changes need
checkpoint.allow_changes and are logged; a finished run keeps its summary."""

import dataclasses
import json
import os
import shutil

import pytest
from flax import nnx

from configs.schema import ConfigError
from configs.sharding_rules import DEFAULT_RULES
from models.decoder import Decoder
from models.sharding import abstract_with_shardings
from tests.train.conftest import small_run
from tests.train.test_trainer import MESH_STEPS, STEPS, make_task, one_device, train
from train import trainer as trainer_module
from train.checkpoint import Checkpointer
from train.optimizer import make_optimizer
from train.pretrain import pretrain
from train.state import init_train_state


def snapshot(directory):
    """{relative path: (size, mtime)} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = (os.path.getsize(path), os.path.getmtime(path))
    return out


@pytest.fixture(scope="module")
def trained_once(corpus_dir, tokenizer, tmp_path_factory):
    run = small_run(corpus_dir, tmp_path_factory.mktemp("resume_rules") / "run", train__steps=STEPS)
    train(run, make_task(run, tokenizer), mesh=one_device())
    return run


@pytest.fixture
def trained(trained_once, tmp_path):
    """A finished run (its final checkpoint) of its own, to resume: a copy of one trained run."""
    shutil.copytree(trained_once.train.output_dir, tmp_path / "run")
    return dataclasses.replace(trained_once, train=dataclasses.replace(trained_once.train, output_dir=str(tmp_path / "run")))


def resume(run, tokenizer, **changes):
    sections = {}
    for key, value in changes.items():
        section, name = key.split("__")
        sections.setdefault(section, {})[name] = value
    run = dataclasses.replace(run, **{s: dataclasses.replace(getattr(run, s), **v) for s, v in sections.items()})
    return train(run, make_task(run, tokenizer), mesh=one_device())


def test_changed_model_is_refused_and_leaves_the_run_as_it_was(trained, tokenizer):
    directory = trained.train.output_dir
    before = snapshot(directory)
    run_config = open(f"{directory}/run_config.json").read()
    changed = dataclasses.replace(trained, model=trained.model.replace(d_model=128))
    with pytest.raises(ConfigError, match=r"model.d_model: the checkpoints in .* were trained with 64, this config has 128"):
        train(changed, make_task(changed, tokenizer), mesh=one_device())
    assert snapshot(directory) == before
    assert open(f"{directory}/run_config.json").read() == run_config  # the run still loads


def test_a_refused_resume_builds_nothing_first(trained, tokenizer, monkeypatch):
    """The checkpoint's config is checked before the model and optimizer state are built (and compiled)."""
    def must_not_build(*args, **kwargs):
        raise AssertionError("the train state was built before the resume was refused")

    monkeypatch.setattr(trainer_module, "init_train_state", must_not_build)
    changed = dataclasses.replace(trained, model=trained.model.replace(d_model=128))
    with pytest.raises(ConfigError, match="model.d_model"):
        train(changed, make_task(changed, tokenizer), mesh=one_device())


def test_shape_mismatch_names_the_parameter(corpus_dir, tmp_path):
    run = small_run(corpus_dir, tmp_path)

    def state_of(d_ff):
        model_cfg = run.model.replace(d_ff=d_ff)
        return init_train_state(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)),
                                lambda p: make_optimizer(run.optim, 10, p)[0], one_device(), DEFAULT_RULES)

    _, state, _, _ = state_of(128)
    checkpointer = Checkpointer(tmp_path / "ckpt", run.checkpoint)
    checkpointer.save(1, state, None, force=True)
    checkpointer.wait()
    _, other, _, shardings = state_of(256)
    with pytest.raises(ConfigError, match=r"params/stacks/dense/blocks/ffn/mlp/down_proj has shape \(2, 128, 64\) there but \(2, 256, 64\)"):
        checkpointer.restore(1, abstract_with_shardings(other, shardings), None)


def test_optimizer_changes_need_allow_changes_and_are_logged(trained, tokenizer, capsys):
    with pytest.raises(ConfigError, match="optim.lr: the run in .* was trained with 0.01, this config has 0.02; .*"
                                          "checkpoint.allow_changes='optim.lr'"):
        resume(trained, tokenizer, optim__lr=0.02)
    more = STEPS + 2
    with pytest.raises(ConfigError, match=f"train.steps: .* trained with {STEPS}, this config has {more}"):
        resume(trained, tokenizer, train__steps=more)
    result = resume(trained, tokenizer, train__steps=more, optim__lr=0.02, checkpoint__allow_changes="train.steps,optim")
    assert result.step == more
    err = capsys.readouterr().err
    assert "resume: optim.lr changed from 0.01 to 0.02 (allowed)" in err
    assert f"resume: train.steps changed from {STEPS} to {more} (allowed)" in err
    saved = json.loads(open(f"{trained.train.output_dir}/run_config.json").read())
    assert saved["config"]["train"]["steps"] == more  # the run now records what it continued with


def test_changed_data_stream_is_refused(trained, tokenizer):
    with pytest.raises(Exception, match="seq_len"):
        resume(trained, tokenizer, data__seq_len=32)


def test_a_finished_run_keeps_its_summary(corpus_dir, tmp_path):
    run = small_run(corpus_dir, tmp_path / "done", train__steps=MESH_STEPS, train__eval_every=MESH_STEPS,
                    train__eval_batches=1)
    run = dataclasses.replace(run, sampler=dataclasses.replace(run.sampler, prompt="def f(", max_new_tokens=2))
    first = pretrain(run)
    assert first["eval_loss"] is not None
    again = pretrain(run)
    assert again == first
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["eval_loss"] == first["eval_loss"]


def test_fine_tuning_jobs_add_their_sections_to_the_refused_changes():
    from rl.train import RLConfig
    from train.config import trajectory_changes
    from train.sft import SFTConfig

    saved = {"rl": {"reward": "binary", "temperature": 1.0}, "sft": {"epochs": 3.0, "init_from": "a"}}
    current = {"rl": {"reward": "fraction", "temperature": 1.0}, "sft": {"epochs": 2.0, "init_from": "a"}}
    assert trajectory_changes(saved, current, RLConfig.trajectory_fields) == [("rl.reward", "binary", "fraction")]
    assert trajectory_changes(saved, current, SFTConfig.trajectory_fields) == [("sft.epochs", 3.0, 2.0)]

"""`train.sft` end to end on a tiny codelm run: it starts from the run's weights, trains on assistant
tokens only, derives steps from epochs, reports data statistics and losses before/after, and resumes
exactly from a checkpoint."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from configs.sft import base as sft_base
from tests.train.conftest import small_run
from tests.train.test_trainer import STEPS, make_task, one_device, train
from train.sft import finetune, load_sft_config

PAIRS = [{"prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n", "completion": f"    return x + {i}\n"}
         for i in range(40)]
CHATS = [{"messages": [{"role": "user", "content": f"Multiply by {i}."},
                       {"role": "assistant", "content": f"def g(x):\n    return x * {i}"}]} for i in range(20)]


@pytest.fixture(scope="module")
def pretrained(corpus_dir, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "run"
    run = small_run(corpus_dir, out, train__steps=STEPS)  # compiled as test_trainer's one-device runs
    train(run, make_task(run, tokenizer), mesh=one_device())
    return out


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_data")
    for name, records in (("pairs", PAIRS), ("chats", CHATS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (root / f"{name}_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    return root


def sft_config(pretrained, sft_files, out, **fields):
    cfg = sft_base.get_config()
    cfg.sft.init_from = str(pretrained)
    cfg.data.sources = {name: sft_base.base.source("jsonl", {"train": str(sft_files / f"{name}.jsonl"),
                                                             "validation": str(sft_files / f"{name}_val.jsonl")})
                        for name in ("pairs", "chats")}
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.read_threads = 64, 8, 1
    cfg.optim.lr = 1e-3
    cfg.train.output_dir = str(out)
    cfg.train.log_every, cfg.train.eval_every, cfg.train.eval_batches = 1, 0, 0
    cfg.checkpoint.async_save = False
    cfg.mesh.ici.fsdp = 8
    for key, value in fields.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def test_sft_from_a_codelm_run(pretrained, sft_files, tmp_path):
    run = load_sft_config(sft_config(pretrained, sft_files, tmp_path / "sft", sft__epochs=2.0, train__eval_every=1000,
                                     train__eval_batches=2))
    assert run.model.d_model == 64 and run.data.tokenizer_path == str(pretrained / "tokenizer.model")
    summary = finetune(run)
    data = summary["data"]
    assert data["examples_read"] == 60 and data["examples_kept"] == 60 and data["dropped"] == 0
    assert summary["steps"] == -(-2 * data["rows_per_epoch"] // 8)  # ceil(epochs * rows / batch)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (tmp_path / "sft" / "loss_curve.png").is_file()
    saved = json.loads((tmp_path / "sft" / "run_config.json").read_text())
    assert saved["config"]["sft"]["init_from"] == str(pretrained)


def test_sft_resumes_exactly(pretrained, sft_files, tmp_path):
    out = tmp_path / "resume"
    cfg = sft_config(pretrained, sft_files, out, sft__epochs=0.0, train__steps=4, checkpoint__every=2)
    finetune(load_sft_config(cfg))
    first = losses(out)
    shutil.rmtree(out / "checkpoints" / "4")  # as if the run died after step 2's checkpoint
    finetune(load_sft_config(cfg))
    resumed = losses(out)[len(first):]
    assert [s for s, _ in resumed] == [3, 4]
    assert resumed == first[2:]  # same batches, same losses, bitwise


def test_sft_config_errors_name_the_field(pretrained, sft_files, tmp_path):
    from configs.schema import ConfigError

    cfg = sft_config(pretrained, sft_files, tmp_path, sft__init_from=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="sft.init_from: .*neither a codelm training run"):
        load_sft_config(cfg)
    cfg = sft_config(pretrained, sft_files, tmp_path)
    cfg.sft.data.truncation = "cut"
    with pytest.raises(ConfigError, match="sft.data.truncation: input should be 'drop' or 'truncate'"):
        load_sft_config(cfg)
    cfg = sft_config(pretrained, sft_files, tmp_path)
    cfg.model.preset = "tiny"
    with pytest.raises(ConfigError, match="model.preset: a fine-tune's model is sft.init_from's"):
        load_sft_config(cfg)
    run = load_sft_config(sft_config(pretrained, sft_files, tmp_path, model__d_ff=256))
    assert run.model.d_ff == 256  # overrides apply to the checkpoint's config ...
    assert dataclasses.replace(run.model, d_ff=128) == load_sft_config(sft_config(pretrained, sft_files, tmp_path)).model


def test_lora_sft_trains_only_the_adapters(pretrained, sft_files, tmp_path):
    from flax import nnx

    from models.lora import merge_lora
    from models.pretrained import load_trained_model

    cfg = sft_config(pretrained, sft_files, tmp_path / "lora", sft__epochs=0.0, train__steps=3)
    cfg.model.lora.rank, cfg.model.lora.dropout = 4, 0.1
    run = load_sft_config(cfg)
    summary = finetune(run)
    assert summary["lora"]["rank"] == 4 and 0 < summary["trainable_params"] < summary["frozen_params"] / 10
    base, _ = load_trained_model(pretrained)
    tuned, _ = load_trained_model(tmp_path / "lora")
    frozen = lambda m: nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))  # noqa: E731
    for a, b in zip(jax.tree.leaves(frozen(base)), jax.tree.leaves(frozen(tuned))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # base weights bitwise unchanged
    adapters = jax.tree.leaves(nnx.state(tuned, nnx.LoRAParam))
    assert any(np.abs(np.asarray(a)).max() > 0 for a in adapters)
    tokens = np.arange(16, dtype=np.int32).reshape(1, 16)
    np.testing.assert_allclose(merge_lora(tuned)(tokens).logits, tuned(tokens).logits, atol=1e-4)

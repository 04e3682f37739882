"""`python -m models.generate` on an HF checkpoint directory written here and on a codelm training run:
same tokens as the Sampler API, prompts from .jsonl (text and chat), clear errors for what it cannot read."""

import json

import pytest

pytest.importorskip("torch")

from configs import generate as generate_config  # noqa: E402
from configs.schema import ConfigError  # noqa: E402
from data.hf_tokenizer import HFTokenizer  # noqa: E402
from models import generate  # noqa: E402
from models.hf import load_hf_checkpoint, reference  # noqa: E402
from models.pretrained import load_trained_model  # noqa: E402
from models.sampler import Sampler  # noqa: E402
from tests.models.test_hf_tokenizer import MESSAGES, byte_level_tokenizer  # noqa: E402
from tests.train.conftest import corpus_dir, small_run, tokenizer  # noqa: E402, F401  (fixtures)
from tests.train.test_trainer import make_task, train  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = byte_level_tokenizer(tmp_path_factory.mktemp("qwen2"))
    vocab = HFTokenizer(directory).vocab_size
    reference.random_model("qwen2", vocab_size=vocab).save_pretrained(directory)
    return directory


def run_generate(**fields):
    """`python -m models.generate` with `--config.<section>.<field>=value` for each section__field."""
    cfg = generate_config.get_config()
    for key, value in fields.items():
        node = cfg
        *path, name = key.split("__")
        for part in path:
            node = node[part]
        node[name] = value
    generate.generate(generate.load_config(cfg))


def test_cli_matches_sampler_api(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps("def add(a, b):"), json.dumps({"messages": MESSAGES}), ""]))
    out = tmp_path / "out.jsonl"
    run_generate(checkpoint=str(checkpoint), prompts__text="import os", prompts__file=str(prompts),
                 sampler__max_new_tokens=5, output__format="jsonl", output__path=str(out), mesh__ici__fsdp=4,
                 mesh__ici__tensor=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["import os", "def add(a, b):", MESSAGES]

    hf_tokenizer = HFTokenizer(checkpoint)
    sampler = Sampler(load_hf_checkpoint(checkpoint), hf_tokenizer)
    expected = sampler.generate(["import os", "def add(a, b):", hf_tokenizer.apply_chat_template(MESSAGES)], 5)
    assert [r["tokens"] for r in records] == expected.tokens
    assert [r["text"] for r in records] == expected.texts
    assert all(len(r["logprobs"]) == len(r["tokens"]) for r in records)


def test_cli_errors(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint: .* neither a codelm training run"):
        run_generate(checkpoint=str(tmp_path), prompts__text="x")
    with pytest.raises(ConfigError, match="prompts: give prompts.text or prompts.file"):
        run_generate(checkpoint=str(checkpoint))
    with pytest.raises(ConfigError, match="no field 'mesh.ici.fdsp'; did you mean 'mesh.ici.fsdp'"):
        run_generate(checkpoint=str(checkpoint), prompts__text="x", mesh__ici__fdsp=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"text": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON string"):
        run_generate(checkpoint=str(checkpoint), prompts__file=str(bad))


@pytest.mark.slow
def test_cli_samples_from_a_codelm_training_run(corpus_dir, tokenizer, tmp_path):  # noqa: F811
    run = small_run(corpus_dir, tmp_path / "run", train__steps=2)
    train(run, make_task(run, tokenizer))
    out = tmp_path / "out.jsonl"
    run_generate(checkpoint=str(tmp_path / "run"), prompts__text="def add(a, b):", sampler__max_new_tokens=6,
                 output__format="jsonl", output__path=str(out))
    record = json.loads(out.read_text())
    model, run_tokenizer = load_trained_model(tmp_path / "run")
    assert record["tokens"] == Sampler(model, run_tokenizer).generate(["def add(a, b):"], 6).tokens[0]
    assert record["prompt"] == "def add(a, b):" and len(record["logprobs"]) == len(record["tokens"])

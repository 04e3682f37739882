"""Pretraining: next-token prediction on packed documents.

    python -m train.pretrain --config=configs/quickstart.py [--config.train.steps=600 ...]

With the default data config it first builds the embedded corpus and tokenizer (idempotent), then
trains, evaluates on the held-out split, and reports the eval loss against the corpus's unigram
entropy, a sample completion, and a loss-curve PNG under train.output_dir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs.schema import ConfigError
from data import corpus
from data.config import DataConfig
from data.pipeline import DataIterator, build_iterator
from data.sources import open_source
from data.tokenizer import Tokenizer
from data.tokenizers import load_tokenizer
from models.config import ModelConfig
from models.sampler import Sampler, SamplerConfig
from train import cli
from train.config import RunConfig
from train.finetune import has_checkpoints, load_starting_model
from train.metrics import plot_loss_curve
from train.step import next_token_loss
from train.trainer import Trainer, TrainResult, TrainTask

_CONFIG = cli.define_config("configs/quickstart.py")
EMBEDDED_TOKENIZER = f"{corpus.DEFAULT_OUT_DIR}/tokenizer.model"


def prepare_data(data: DataConfig) -> Tokenizer:
    """Builds the embedded corpus when the config points at it, then loads the tokenizer."""
    if data.tokenizer_path == EMBEDDED_TOKENIZER:
        corpus.ensure_corpus(corpus.DEFAULT_OUT_DIR)
    return load_tokenizer(data.tokenizer_path)


def data_iterator(data: DataConfig, tokenizer: Tokenizer, split: str, *, fim: bool = True) -> DataIterator:
    """The split's batch iterator; FIM (data.fim) only where `fim`."""
    return build_iterator(data, tokenizer, split=split, fim=fim)


def fit_vocab(model_cfg: ModelConfig, explicit_vocab: bool, tokenizer: Tokenizer) -> ModelConfig:
    """A model trained from scratch takes the tokenizer's vocabulary (padded to a multiple of 128)
    unless the config sets model.vocab_size (`explicit_vocab`); a smaller explicit size is an error."""
    if explicit_vocab:
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
            )
        return model_cfg
    return model_cfg.replace(vocab_size=128 * math.ceil(tokenizer.vocab_size / 128))


def _split_pairs(data: DataConfig, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """[n, 2] (input, target) token pairs of a split's documents, BOS ... EOS, as the model sees them."""
    pairs = []
    for name, source_cfg in data.sources.items():
        source = open_source(source_cfg.kind, source_cfg.splits[split], field=f"data.sources.{name}.splits.{split}",
                             text_field=source_cfg.text_field)
        for i in range(len(source)):
            document = np.array([tokenizer.bos_id, *tokenizer.encode(source[i]["text"]), tokenizer.eos_id], np.int64)
            pairs.append(np.stack([document[:-1], document[1:]], axis=1))
    return np.concatenate(pairs)


def ngram_baselines(data: DataConfig, tokenizer: Tokenizer, bigram_weight: float = 0.9) -> dict[str, float]:
    """Count-based baselines in nats/token over the targets the model is scored on.

    unigram_entropy_train: entropy of the train split's token distribution.
    unigram_cross_entropy_heldout: held-out cross-entropy under the train unigram (add-one smoothed).
    bigram_cross_entropy_heldout: held-out cross-entropy of an interpolated bigram,
      p(b | a) = w * c(a, b) / c(a) + (1 - w) * p_unigram(b) (Jelinek & Mercer 1980), counted on train.
    """
    vocab = tokenizer.vocab_size
    train, held_out = _split_pairs(data, tokenizer, "train"), _split_pairs(data, tokenizer, "validation")
    unigram = np.bincount(train[:, 1], minlength=vocab).astype(np.float64)
    p = unigram / unigram.sum()
    smoothed = (unigram + 1) / (unigram.sum() + vocab)
    pair_ids = train[:, 0] * vocab + train[:, 1]
    keys, counts = np.unique(pair_ids, return_counts=True)
    context = np.bincount(train[:, 0], minlength=vocab).astype(np.float64)
    query = held_out[:, 0] * vocab + held_out[:, 1]
    index = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
    pair_counts = np.where(keys[index] == query, counts[index], 0)
    bigram = np.divide(pair_counts, context[held_out[:, 0]], out=np.zeros(len(query)), where=context[held_out[:, 0]] > 0)
    mixed = bigram_weight * bigram + (1 - bigram_weight) * smoothed[held_out[:, 1]]
    return {
        "unigram_entropy_train": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
        "unigram_cross_entropy_heldout": float(-np.log(smoothed[held_out[:, 1]]).mean()),
        "bigram_cross_entropy_heldout": float(-np.log(mixed).mean()),
    }


def sample_completion(result: TrainResult, tokenizer: Tokenizer, sampler_cfg: SamplerConfig) -> str:
    """The trained model's continuation of `sampler.prompt`."""
    model = nnx.merge(result.graphdef, result.state.params, result.state.rest)
    sampler = Sampler(model, tokenizer, max_len=sampler_cfg.max_len)
    return sampler.generate(
        [sampler_cfg.prompt], max_new_tokens=sampler_cfg.max_new_tokens, temperature=sampler_cfg.temperature,
        top_k=sampler_cfg.top_k, top_p=sampler_cfg.top_p,
    ).texts[0]


def make_task(run: RunConfig, tokenizer: Tokenizer, pretrained: nnx.Module | None = None) -> TrainTask:
    """Next-token prediction on the packed train split; held-out loss on plain left-to-right text
    (no FIM), comparable across runs and with the n-gram baselines. `pretrained`: the starting weights
    (train.init_from), else fresh ones."""
    post_update = None
    if run.model.moe is not None and run.model.moe.bias_update_rate > 0:
        from models.moe import apply_bias_updates  # noqa: PLC0415

        post_update = apply_bias_updates
    return TrainTask(
        model_config=run.model,
        train_data=data_iterator(run.data, tokenizer, "train"),
        loss_fn=functools.partial(next_token_loss, z_loss=run.train.z_loss),
        eval_data=functools.partial(data_iterator, run.data, tokenizer, "validation", fim=False),
        post_update=post_update,
        pretrained=pretrained,
    )


def summarize_run(run: RunConfig, result: TrainResult, tokenizer: Tokenizer) -> dict[str, Any]:
    """summary.json: sizes, tokens, eval loss, n-gram baselines, loss-curve PNG, sample."""
    model_cfg, out = run.model, result.output_dir
    summary: dict[str, Any] = {
        "model": model_cfg.name,
        "params": model_cfg.param_count(),
        "params_non_embedding": model_cfg.param_count(embeddings=False),
        "steps": result.step,
        "tokens_trained": result.step * run.data.batch_size * run.data.seq_len,
        "flops_per_token": model_cfg.flops_per_token(run.data.seq_len),
        "eval_loss": result.eval_loss,
    }
    baselines = {}
    if run.data.tokenizer_path == EMBEDDED_TOKENIZER:
        summary.update(ngram_baselines(run.data, tokenizer))
        baselines["unigram cross-entropy (held-out)"] = summary["unigram_cross_entropy_heldout"]
        baselines["interpolated bigram (held-out)"] = summary["bigram_cross_entropy_heldout"]
    title = f"{model_cfg.name} on {', '.join(sorted(run.data.sources))}"
    png = plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png", title=title, baselines=baselines)
    summary["loss_curve"] = str(png)
    if run.sampler.prompt:
        completion = sample_completion(result, tokenizer, run.sampler)
        summary["sample_prompt"], summary["sample_completion"] = run.sampler.prompt, completion
        label = "greedy" if run.sampler.temperature == 0 else f"temperature {run.sampler.temperature}"
        print(f"\n--- sample ({label}) ---\n{run.sampler.prompt}{completion}\n-----------------------\n", file=sys.stderr)
    return summary


def pretrain(run: RunConfig, *, explicit_vocab: bool = True) -> dict[str, Any] | None:
    """Trains (or resumes, or finds finished) the run; returns its summary on process 0 (None
    elsewhere). A run that had already finished keeps the summary it wrote then."""
    tokenizer = prepare_data(run.data)
    run = dataclasses.replace(run, model=fit_vocab(run.model, explicit_vocab, tokenizer))
    mesh = run.mesh.make()
    pretrained = None
    # A resume restores its checkpoint instead of loading the starting weights.
    if run.train.init_from and not (run.checkpoint.resume and has_checkpoints(run.train.output_dir)):
        pretrained = load_starting_model(run.train.init_from, run.model, mesh, run.mesh.rule_set, seed=run.train.seed)
    result = Trainer(run, make_task(run, tokenizer, pretrained), mesh=mesh).run()
    if result.preempted:
        sys.exit(143)  # 128 + SIGTERM: the scheduler restarts the job, which resumes
    if jax.process_index() != 0:
        return None
    summary_path = result.output_dir / "summary.json"
    if result.already_finished and summary_path.is_file():
        return json.loads(summary_path.read_text())
    summary = summarize_run(run, result, tokenizer)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(run: RunConfig) -> None:
    summary = pretrain(run, explicit_vocab=_CONFIG.value.model.get("vocab_size") is not None)
    if summary is not None:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run(main, _CONFIG)

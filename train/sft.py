"""Supervised fine-tuning: full or LoRA, from a codelm run directory or a Hugging Face checkpoint.

    python -m train.sft --config=configs/sft/quickstart.py        # make sft: the embedded default
    python -m train.sft --config=configs/sft/base.py --config.sft.init_from=path/to/Qwen2.5-Coder-1.5B \\
        --config.data.sources.chat.splits.train=chats.jsonl --config.model.lora.rank=16

The run is the pretraining Trainer with another batch source: conversations (or prompt/completion
pairs) rendered with the model's chat template (codelm's default format for codelm models), packed
several per row, loss on assistant tokens only (`data.sft`). Checkpoints, exact resume, progress line,
metrics and the loss-curve PNG are the Trainer's. The `sft` section adds what fine-tuning needs:

  init_from     the starting checkpoint; the model section only overrides its config (LoRA, remat,
                dtype), and the tokenizer is the checkpoint's unless data.tokenizer_path is set.
  epochs        passes over the training set; train.steps = ceil(epochs * packed rows / batch) (0: use
                train.steps as given). warmup_ratio likewise sets optim.warmup_steps.
  data          chat template choice, truncation policy (drop or truncate over-long examples).
  eval          held-out problems and an execution service: pass@k before training and every
                train.eval_every steps, beside the held-out loss.

With `model.lora` set, only the adapters train (the base weights are frozen and get no optimizer
state); `models.lora.merge_lora` folds them into the base for export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

import jax
import numpy as np
from ml_collections import ConfigDict
from pydantic import Field

from configs import cli as config_cli
from configs.schema import ConfigError, section
from data.sft import SFTDataConfig, build_sft_iterator
from data.tokenizers import load_tokenizer
from models.pretrained import pretrained_model_config, pretrained_tokenizer_path
from train import distributed
from train.config import RunConfig, load_run_config
from train.evaluation import PassAtK
from train.finetune import execution_service, has_checkpoints, heldout_problems, load_starting_model, trainable_filter
from train.metrics import plot_loss_curve, read_metrics
from train.step import next_token_loss
from train.trainer import Trainer, TrainResult, TrainTask

_CONFIG = config_cli.define_config("configs/sft/quickstart.py")

EMBEDDED_SFT_DIR = "artifacts/sft"


@section
class SFTEvalConfig:
    """pass@k on held-out problems while fine-tuning (beside the held-out loss)."""

    problems: str = ""  # "": none | "synthetic": the embedded held-out set | a HumanEval/MBPP-style JSONL file
    limit: Annotated[int, Field(ge=0)] = 0  # use the first N problems; 0: all
    sandbox: str = ""  # "": no pass@k | "local": start a service for the run | comma-separated service URLs
    num_samples: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    max_new_tokens: Annotated[int, Field(ge=1)] = 128


@section
class SFTSection:
    init_from: Annotated[str, Field(min_length=1)]
    epochs: Annotated[float, Field(ge=0.0)] = 3.0  # 0: train.steps as given
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.03  # None: optim.warmup_steps as given
    data: SFTDataConfig = SFTDataConfig()
    eval: SFTEvalConfig = SFTEvalConfig()


@section
class SFTConfig(RunConfig):
    sft: SFTSection

    trajectory_fields: ClassVar[tuple[str, ...]] = (*RunConfig.trajectory_fields, "sft.epochs", "sft.warmup_ratio",
                                                    "sft.data")


# ---- config --------------------------------------------------------------------------------------------


def load_sft_config(cfg: ConfigDict, **checks: Any) -> SFTConfig:
    """The SFT config: the model is `sft.init_from`'s, with the model section's overrides; the tokenizer
    is the checkpoint's unless data.tokenizer_path is set. Raises ConfigError naming the field."""
    raw = cfg.to_dict()
    init_from = (raw.get("sft") or {}).get("init_from") or ""
    if not init_from:
        raise ConfigError("sft.init_from: required (a codelm run directory or a Hugging Face checkpoint directory)")
    if (raw.get("model") or {}).get("preset"):
        raise ConfigError("model.preset: a fine-tune's model is sft.init_from's; the model section only overrides fields")
    try:
        base = pretrained_model_config(init_from)
        if not raw["data"].get("tokenizer_path"):
            raw["data"]["tokenizer_path"] = str(pretrained_tokenizer_path(init_from))
    except FileNotFoundError as e:
        raise ConfigError(f"sft.init_from: {e}") from None
    return load_run_config(raw, SFTConfig, model_base=base, **checks)


def with_schedule(run: SFTConfig, rows_per_epoch: int) -> SFTConfig:
    """train.steps from sft.epochs and optim.warmup_steps from sft.warmup_ratio (when set)."""
    steps = run.train.steps
    if run.sft.epochs > 0:
        steps = max(1, math.ceil(run.sft.epochs * rows_per_epoch / run.data.batch_size))
    warmup = run.optim.warmup_steps if run.sft.warmup_ratio is None else round(run.sft.warmup_ratio * steps)
    return dataclasses.replace(run, train=dataclasses.replace(run.train, steps=steps),
                               optim=dataclasses.replace(run.optim, warmup_steps=min(warmup, steps - 1)))


# ---- data ----------------------------------------------------------------------------------------------


def prepare_embedded_data(run: SFTConfig) -> None:
    """Builds the embedded SFT set (stdlib functions, synthetic problems) when the config reads it."""
    paths = [path for source in run.data.sources.values() for path in source.splits.values()]
    if any(path.startswith(EMBEDDED_SFT_DIR) for path in paths):
        from data.sft_corpus import ensure_sft_corpus  # noqa: PLC0415  (only the embedded default needs it)
        from evals.synthetic import write_embedded_sft_problems  # noqa: PLC0415

        ensure_sft_corpus(EMBEDDED_SFT_DIR)
        write_embedded_sft_problems(EMBEDDED_SFT_DIR)


# ---- model ---------------------------------------------------------------------------------------------


# ---- the run -------------------------------------------------------------------------------------------


def finetune(run: SFTConfig) -> dict[str, Any] | None:
    """Fine-tunes (or resumes, or finds finished) the run; returns its summary on process 0."""
    prepare_embedded_data(run)
    tokenizer = load_tokenizer(run.data.tokenizer_path)
    train_data = build_sft_iterator(run.data, run.sft.data, tokenizer, split="train")
    run = with_schedule(run, train_data.stats.rows_per_epoch)
    mesh = run.mesh.make()
    output_dir = Path(run.train.output_dir)
    resuming = run.checkpoint.resume and has_checkpoints(output_dir)
    post_update = None
    if run.model.moe is not None and run.model.moe.bias_update_rate > 0:
        from models.moe import apply_bias_updates  # noqa: PLC0415

        post_update = apply_bias_updates
    has_validation = all("validation" in source.splits for source in run.data.sources.values())
    eval_data = None
    if has_validation:
        one_pass = dataclasses.replace(run.data, num_epochs=1)
        eval_data = functools.partial(build_sft_iterator, one_pass, run.sft.data, tokenizer, split="validation")
    task = TrainTask(
        model_config=run.model,
        train_data=train_data,
        loss_fn=functools.partial(next_token_loss, z_loss=run.train.z_loss),
        eval_data=eval_data,
        post_update=post_update,
        # A resume restores its checkpoint instead of loading the starting weights.
        pretrained=None if resuming else load_starting_model(run.sft.init_from, run.model, mesh, run.mesh.rule_set,
                                                             seed=run.train.seed),
        trainable=trainable_filter(run.model),
    )
    trainer = Trainer(run, task, mesh=mesh)
    trainer.add_eval_at_start()
    pass_at_k = None
    with execution_service(run.sft.eval.sandbox if run.sft.eval.problems else "") as urls:
        if urls:
            e = run.sft.eval
            pass_at_k = PassAtK(heldout_problems(e.problems, e.limit), tokenizer, urls, num_samples=e.num_samples,
                                ks=tuple(k for k in (1, 10) if k <= e.num_samples), temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens, max_len=run.sampler.max_len)
            trainer.add_hook(pass_at_k, every=run.train.eval_every or run.train.steps, at_start=True)
        result = trainer.run()
    if result.preempted:
        sys.exit(143)
    if jax.process_index() != 0:
        return None
    summary_path = output_dir / "summary.json"
    if result.already_finished and summary_path.is_file():
        return json.loads(summary_path.read_text())
    summary = summarize(run, result, trainer, train_data.stats, pass_at_k)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(run: SFTConfig, result: TrainResult, trainer: Trainer, stats: Any,
              pass_at_k: PassAtK | None) -> dict[str, Any]:
    """summary.json: the starting point, data statistics (truncated/dropped), losses and pass@k before
    and after, throughput, and the loss curve."""
    out = result.output_dir
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if r.get("split") == "train" and "tokens_per_sec" in r]
    evals = sorted((r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r)
    summary: dict[str, Any] = {
        "init_from": run.sft.init_from,
        "model": run.model.name,
        "lora": dataclasses.asdict(run.model.lora) if getattr(run.model, "lora", None) is not None else None,
        "trainable_params": trainer.n_trainable,
        "frozen_params": trainer.n_frozen,
        "steps": result.step,
        "epochs": run.sft.epochs,
        "batch_size": run.data.batch_size,
        "lr": run.optim.lr,
        "schedule": run.optim.schedule,
        "data": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats),
        "eval_loss_before": evals[0][1] if evals and evals[0][0] == 0 else None,
        "eval_loss_after": result.eval_loss,
        "tokens_per_sec": float(np.mean([r["tokens_per_sec"] for r in train_records[1:] or train_records]))
        if train_records else None,
    }
    if pass_at_k is not None and pass_at_k.history:
        steps = sorted(pass_at_k.history)
        summary["pass_at_k_before"] = pass_at_k.history[steps[0]] if steps[0] == 0 else None
        summary["pass_at_k_after"] = pass_at_k.history[steps[-1]]
    title = f"SFT of {model_label(run)} on {', '.join(sorted(run.data.sources))}"
    summary["loss_curve"] = str(plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png", title=title))
    return summary


def model_label(run: SFTConfig) -> str:
    lora = getattr(run.model, "lora", None)
    return f"{run.model.name}" + (f" (LoRA r={lora.rank})" if lora is not None else "")


def main(run: SFTConfig) -> None:
    summary = finetune(run)
    if summary is not None:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    config_cli.run(main, _CONFIG, load_sft_config, setup=distributed.maybe_initialize)

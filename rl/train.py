"""RL with execution rewards: the GRPO family on codelm's Trainer, rewarded by the execution service.

    python -m rl.train --config=configs/rl/quickstart.py        # make rl: the embedded default
    python -m rl.train --config=configs/rl/base.py --config.rl.init_from=runs/sft-quickstart \\
        --config.rl.sandbox=http://sandbox-a:8080,http://sandbox-b:8080

Each train step is one policy update on a mini-batch of a rollout batch (`rl.rollouts.RolloutSource`,
the Trainer's data iterator): `rl.prompts_per_batch` problems x `rl.group_size` samples from codelm's
sampler with the current weights, scored by running the problems' tests in the execution service
(`rl.rewards`), advantages by `rl.estimator`, then `rl.mini_batches` updates through the shared train
step with the loss below. Checkpoints, exact resume (the rollout state is the iterator's), metrics, the
progress line and preemption are the Trainer's. Logged per update: loss, entropy, KL, clip fraction,
importance-ratio mean/min/max (split "train"); per rollout batch (split "rollout"): reward mean/std,
pass rate, zero-variance group fraction, response lengths, service errors and the time split (rollout,
reward wait = idle, update). pass@k on held-out problems before, every `rl.eval.every` steps, and after.

Loss per response token (rl.algorithms), aggregated by `rl.aggregation`:
    ppo_clip(logp, old_logp, A; clip_low, clip_high; token or GSPO sequence ratio) * IS weight
    + kl_coef * KL_k(logp, ref_logp) - entropy_coef * H
with logp = log softmax(logits / temperature) at the sampled tokens, as the sampler reports them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from pydantic import Field

from configs import cli as config_cli
from configs.schema import ConfigError, section
from data.tokenizers import load_tokenizer
from evals.passk import paired_change
from evals.problems import Problem, load_problems
from models.pretrained import (
    pretrained_model_config,
    pretrained_tokenizer_path,
)
from models.sampler import Sampler
from rl import algorithms as alg
from rl.rewards import RewardWorker
from rl.rollouts import RolloutSettings, RolloutSource
from train import distributed
from train.config import RunConfig, load_run_config
from train.evaluation import PassAtK
from train.finetune import (
    SYNTHETIC,
    execution_service,
    has_checkpoints,
    heldout_problems,
    load_starting_model,
    trainable_filter,
)
from train.metrics import print_progress, read_metrics
from train.step import Batch, LossOutput, model_aux_loss
from train.trainer import StepInfo, Trainer, TrainTask

_CONFIG = config_cli.define_config("configs/rl/quickstart.py")

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


@section
class RLEvalConfig:
    """Held-out pass@k before training, every `every` steps (0: only before and after) and at the end."""

    problems: str = SYNTHETIC  # "": none | "synthetic": the embedded held-out set | a HumanEval/MBPP-style JSONL
    limit: Annotated[int, Field(ge=0)] = 0  # the first N problems; 0: all
    num_samples: PositiveInt = 1
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    max_new_tokens: PositiveInt = 128
    every: Annotated[int, Field(ge=0)] = 0


@section
class RLSection:
    init_from: Annotated[str, Field(min_length=1)]
    problems: str = SYNTHETIC  # "synthetic": the embedded problems | a HumanEval/MBPP-style JSONL file
    # The embedded problems' split: "train" (all of it), or "rl", whose constants the SFT default never
    # shows (evals/synthetic.py), so rewards favour reading the docstring over recalling an SFT answer.
    synthetic_split: Literal["train", "rl", "sft"] = "train"
    num_problems: PositiveInt = 2000  # synthetic problems to generate (or the first N of the file)
    # Group size 16: pass@1 is flat for N = 4..64 and training collapses at N >= 128 (the finding the
    # issue quotes for code RL); 16 is the common default of DeepSeekMath's GRPO and DAPO.
    group_size: Annotated[int, Field(ge=2)] = 16
    prompts_per_batch: PositiveInt = 8
    mini_batches: PositiveInt = 1  # policy updates per rollout batch
    max_prompt_len: PositiveInt = 256  # problems with longer prompts are left out
    max_response_len: PositiveInt = 256
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # RLOO by default: RLOO 0.322 > REINFORCE++ 0.318 > GRPO 0.301 pass@1 in the one published comparison
    # the issue quotes for code RL; REINFORCE++-baseline is the other recommended choice.
    estimator: Literal["grpo", "drgrpo", "rloo", "reinforce++", "reinforce++_baseline"] = "rloo"
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"  # DAPO's token-level mean
    ratio: Literal["token", "sequence"] = "token"  # sequence: GSPO (use clip ranges ~3e-4 / 4e-4)
    clip_low: Annotated[float, Field(ge=0.0)] = 0.2
    clip_high: Annotated[float, Field(ge=0.0)] = 0.28  # DAPO's clip-higher
    dual_clip: Annotated[float, Field(ge=0.0)] = 0.0  # > 1: dual-clip PPO bound for negative advantages; 0 off
    kl_coef: Annotated[float, Field(ge=0.0)] = 0.0  # 0: no reference model is held
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: Annotated[float, Field(ge=0.0)] = 0.0
    tis_cap: Annotated[float, Field(ge=0.0)] = 0.0  # > 0: truncated IS with this cap (recomputes old log-probs)
    recompute_old_logp: bool = False  # old log-probs from a trainer forward pass instead of the sampler's
    # Sequence packing: up to this many prompt+response sequences share a row of max_prompt_len +
    # max_response_len tokens (segment ids keep them apart), so updates skip the padding (verl's
    # use_remove_padding does the same job); 1: one sequence per row.
    sequences_per_row: Annotated[int, Field(ge=1, le=64)] = 8
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_sampling_rounds: PositiveInt = 3
    overlong: Literal["none", "filter", "soft"] = "none"
    overlong_cache: PositiveInt = 32
    reward: Literal["binary", "fraction"] = "binary"
    error_reward: float = 0.0  # the reward of a sample the service could not score (counted)
    run_timeout: Annotated[float, Field(gt=0.0)] = 5.0
    sandbox: str = "local"  # "local": start a private service | comma-separated service URLs
    sandbox_workers: PositiveInt = 2
    reward_chunks: PositiveInt = 2  # sampling chunks; a chunk is scored while the next is sampled
    retry_deadline_s: Annotated[float, Field(gt=0.0)] = 60.0
    eval: RLEvalConfig = RLEvalConfig()

    def __post_init__(self) -> None:
        if 0.0 < self.dual_clip <= 1.0:
            raise ConfigError(f"dual_clip: must be 0 (off) or > 1, got {self.dual_clip}")  # parse prefixes "rl."


@section
class RLConfig(RunConfig):
    rl: RLSection

    # Everything in the rl section shapes the rollouts and the updates: a resume may not change it silently.
    trajectory_fields: ClassVar[tuple[str, ...]] = (*RunConfig.trajectory_fields, "rl")


# ---- config --------------------------------------------------------------------------------------------


def load_rl_config(cfg: ConfigDict, **checks: Any) -> RLConfig:
    """The RL config: the model is `rl.init_from`'s (the model section overrides fields), the tokenizer the
    checkpoint's; data.batch_size and data.seq_len follow from the rl section (rows per update, prompt +
    response). Raises ConfigError naming the field."""
    raw = cfg.to_dict()
    rl = raw.get("rl") or {}
    if not rl.get("init_from"):
        raise ConfigError("rl.init_from: required (a codelm run directory or a Hugging Face checkpoint directory)")
    if (raw.get("model") or {}).get("preset"):
        raise ConfigError("model.preset: an RL run's model is rl.init_from's; the model section only overrides fields")
    try:
        base = pretrained_model_config(rl["init_from"])
        if not raw["data"].get("tokenizer_path"):
            raw["data"]["tokenizer_path"] = str(pretrained_tokenizer_path(rl["init_from"]))
    except FileNotFoundError as e:
        raise ConfigError(f"rl.init_from: {e}") from None
    group, prompts, minis = (rl.get("group_size", 16), rl.get("prompts_per_batch", 8), rl.get("mini_batches", 1))
    if (group * prompts) % minis:
        raise ConfigError(f"rl.mini_batches: {minis} does not divide the rollout batch of "
                          f"{prompts} x {group} = {group * prompts} sequences")
    raw["data"]["batch_size"] = group * prompts // minis
    raw["data"]["seq_len"] = rl.get("max_prompt_len", 256) + rl.get("max_response_len", 256)
    return load_run_config(raw, RLConfig, model_base=base, **checks)


def settings_of(rl: RLSection, stop: tuple[str, ...], row_quantum: int = 1) -> RolloutSettings:
    return RolloutSettings(
        prompts_per_batch=rl.prompts_per_batch, group_size=rl.group_size, mini_batches=rl.mini_batches,
        max_response_len=rl.max_response_len, temperature=rl.temperature, top_p=rl.top_p, stop=stop,
        estimator=rl.estimator, dynamic_sampling=rl.dynamic_sampling, max_sampling_rounds=rl.max_sampling_rounds,
        overlong=rl.overlong, overlong_cache=rl.overlong_cache, reward_chunks=rl.reward_chunks,
        recompute_old_logp=rl.recompute_old_logp or rl.tis_cap > 0, kl=rl.kl_coef > 0,
        sequences_per_row=rl.sequences_per_row, row_quantum=row_quantum)


# ---- the loss ------------------------------------------------------------------------------------------


def policy_loss(model: nnx.Module, batch: Batch, *, rl: RLSection) -> LossOutput:
    """The RL objective on one micro-batch (module docstring); batch fields as `rl.rollouts` packs them,
    [B, L]. Returns the aggregated sum and its weight, with masked-mean metrics."""
    packing = alg.Packing(batch["segment_ids"], rl.sequences_per_row) if rl.sequences_per_row > 1 else None
    out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = out.logits.astype(jnp.float32) / rl.temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]  # [B, L]
    mask = batch["loss_mask"]
    pg = alg.ppo_clip(logp, batch["old_logp"], batch["advantages"], mask, clip_low=rl.clip_low,
                      clip_high=rl.clip_high, level=rl.ratio, dual_clip=rl.dual_clip, packing=packing)
    per_token = pg.loss
    metrics: dict[str, jax.Array] = {}
    if rl.tis_cap > 0:
        weights = alg.truncated_is_weights(batch["old_logp"], batch["sampler_logp"], rl.tis_cap)
        per_token = per_token * weights
        metrics["is_weight_mean"] = alg.masked_mean(weights, mask)
        metrics["sampler_kl"] = alg.masked_mean(batch["old_logp"] - batch["sampler_logp"], mask)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)  # [B, L]
    if rl.entropy_coef:
        per_token = per_token - rl.entropy_coef * entropy
    if rl.kl_coef:
        kl = alg.kl_estimate(logp, batch["ref_logp"], rl.kl_estimator)
        per_token = per_token + rl.kl_coef * kl
        metrics["kl_ref"] = alg.masked_mean(kl, mask)
    total, weight = alg.aggregate(per_token, mask, rl.aggregation, horizon=rl.max_response_len, packing=packing)
    aux = model_aux_loss(out.aux)
    big = jnp.where(mask > 0, pg.ratio, -jnp.inf)
    small = jnp.where(mask > 0, pg.ratio, jnp.inf)
    any_token = jnp.sum(mask) > 0
    metrics.update(
        pg_loss=total / jnp.maximum(weight, 1e-9),
        entropy=alg.masked_mean(entropy, mask),
        clip_frac=alg.masked_mean(pg.clipped, mask),
        ratio_mean=alg.masked_mean(pg.ratio, mask),
        ratio_max=jnp.where(any_token, jnp.max(big), 1.0),
        ratio_min=jnp.where(any_token, jnp.min(small), 1.0),
        approx_kl_old=alg.masked_mean(batch["old_logp"] - logp, mask),
        response_tokens=jnp.sum(mask),
    )
    return LossOutput(total + aux * weight, weight, metrics)


# ---- the trainer ---------------------------------------------------------------------------------------


class RLTrainer(Trainer):
    """The Trainer, handing its current weights to the rollout source and logging rollout metrics."""

    def __init__(self, run: RLConfig, task: TrainTask, source: RolloutSource, **kwargs: Any):
        super().__init__(run, task, **kwargs)
        self.source = source
        self._state = None
        self.update_s = 0.0  # policy-update time of this invocation (device time, synchronised per step)
        source.policy = self._policy
        self.add_hook(self._after_update, every=1)
        self.rollout_history: dict[int, dict[str, float]] = {}

    def _policy(self) -> nnx.Module:
        """The current weights as a model view (no copy: the state's device arrays)."""
        return nnx.merge(self.graphdef, self._state.params, self._state.rest)

    def initial_state(self) -> Any:
        self._state = super().initial_state()
        return self._state

    def _after_update(self, info: StepInfo) -> None:
        self._state = info.state
        jax.block_until_ready(info.metrics["loss"])
        if self.source.last_batch_at is not None:
            self.update_s += time.perf_counter() - self.source.last_batch_at
        if self.source.new_metrics is not None:
            values = dict(self.source.new_metrics)
            self.source.new_metrics = None
            self.rollout_history[info.step] = values
            self.log(info.step, values, prefix="rollout")
            print_progress(f"step {info.step}: reward {values['reward_mean']:.3f} pass {values['pass_rate']:.3f} "
                           f"zero-var {values['zero_variance_groups']:.2f} len {values['response_len_mean']:.0f} "
                           f"rollout {values['rollout_s']:.1f}s reward-wait {values['reward_wait_s']:.1f}s")


def make_sampler_factory(run: RLConfig, tokenizer: Any, mesh: Any) -> Any:
    max_len = min(run.data.seq_len, run.model.max_seq_len)

    def factory(model: nnx.Module) -> Sampler:
        return Sampler(model, tokenizer, max_len=max_len, mesh=mesh, rules=run.mesh.rule_set)

    return factory


def train_problems(rl: RLSection, sampler_encode: Any) -> list[Problem]:
    if rl.problems == SYNTHETIC:
        from evals.synthetic import synthetic_problems  # noqa: PLC0415

        try:
            problems = synthetic_problems(rl.synthetic_split, rl.num_problems, seed=0)
        except ValueError as error:
            raise ConfigError(f"rl.num_problems: {error}") from error
    else:
        problems = load_problems(rl.problems)[: rl.num_problems]
    kept = [p for p in problems if len(sampler_encode(p.prompt)) <= rl.max_prompt_len]
    if not kept:
        raise ConfigError(f"rl.max_prompt_len: no problem's prompt fits in {rl.max_prompt_len} tokens")
    return kept


def train_rl(run: RLConfig, urls: list[str] | None = None) -> dict[str, Any] | None:
    """Trains (or resumes, or finds finished) the RL run; returns its summary on process 0. `urls`
    overrides rl.sandbox (tests pass a service they control)."""
    with contextlib.ExitStack() as stack:
        if urls is None:
            urls = stack.enter_context(execution_service(run.rl.sandbox, workers=run.rl.sandbox_workers))
        return _train(run, list(urls))


def _train(run: RLConfig, urls: list[str]) -> dict[str, Any] | None:
    rl = run.rl
    tokenizer = load_tokenizer(run.data.tokenizer_path)
    add_bos = getattr(tokenizer, "add_bos", tokenizer.bos_id is not None) and tokenizer.bos_id is not None
    problems = train_problems(rl, lambda text: ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(text)))
    stop = tuple(sorted({s for p in problems for s in p.stop}))
    mesh = run.mesh.make()
    output_dir = Path(run.train.output_dir)
    resuming = run.checkpoint.resume and has_checkpoints(output_dir)
    starting_model = functools.partial(load_starting_model, rl.init_from, run.model, mesh, run.mesh.rule_set,
                                       seed=run.train.seed)
    rewards = RewardWorker(urls, mode=rl.reward, error_reward=rl.error_reward, run_timeout=rl.run_timeout,
                           retry_deadline_s=rl.retry_deadline_s)
    try:
        row_quantum = run.train.grad_accum * run.mesh.batch_shards(jax.device_count())
        source = RolloutSource(problems, make_sampler_factory(run, tokenizer, mesh), rewards,
                               settings_of(rl, stop, row_quantum), seq_len=run.data.seq_len, seed=run.train.seed)
        if rl.kl_coef > 0:
            reference = starting_model()  # frozen: the starting weights
            source.ref_policy = lambda: reference
        task = TrainTask(model_config=run.model, train_data=source, loss_fn=functools.partial(policy_loss, rl=rl),
                         pretrained=None if resuming else starting_model(),
                         trainable=trainable_filter(run.model), count_data_time=False)
        trainer = RLTrainer(run, task, source, mesh=mesh)
        pass_at_k = None
        if rl.eval.problems:
            e = rl.eval
            pass_at_k = PassAtK(heldout_problems(e.problems, e.limit), tokenizer, urls, num_samples=e.num_samples,
                                ks=tuple(k for k in (1, 10) if k <= e.num_samples), temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens, max_len=run.model.max_seq_len)
            trainer.add_hook(pass_at_k, every=e.every or run.train.steps, at_start=True)
        started = time.perf_counter()
        result = trainer.run()
        wall_s = time.perf_counter() - started
        update_s = trainer.update_s
    finally:
        rewards.close()
    if result.preempted:
        sys.exit(143)
    if jax.process_index() != 0:
        return None
    summary_path = output_dir / "summary.json"
    if result.already_finished and summary_path.is_file():
        return json.loads(summary_path.read_text())
    summary = summarize(run, result.step, output_dir, pass_at_k, wall_s, update_s)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(run: RLConfig, steps: int, out: Path, pass_at_k: PassAtK | None, wall_s: float,
              update_s: float) -> dict[str, Any]:
    """summary.json: pass@k before/after, reward curve (PNG), time split over the rollout batches."""
    records = read_metrics(out / "metrics.jsonl")
    rollouts = [r for r in records if r.get("split") == "rollout"]
    train = [r for r in records if r.get("split") == "train" and "step_time_s" in r]
    rollout_s = float(sum(r.get("rollout_s", 0.0) for r in rollouts))
    wait_s = float(sum(r.get("reward_wait_s", 0.0) for r in rollouts))
    batch_s = float(sum(r.get("rollout_batch_s", 0.0) for r in rollouts))
    summary: dict[str, Any] = {
        "init_from": run.rl.init_from, "model": run.model.name, "steps": steps, "estimator": run.rl.estimator,
        "group_size": run.rl.group_size, "prompts_per_batch": run.rl.prompts_per_batch,
        "rollout_batches": len(rollouts),
        "reward_first": rollouts[0]["reward_mean"] if rollouts else None,
        "reward_last": rollouts[-1]["reward_mean"] if rollouts else None,
        "service_errors": float(sum(r.get("service_errors", 0.0) for r in rollouts)),
        "time_split_s": {"rollout": rollout_s, "reward_wait (idle)": wait_s,
                         "packing_and_logprobs": max(batch_s - rollout_s - wait_s, 0.0), "update": update_s,
                         "eval_checkpoint_other": max(wall_s - batch_s - update_s, 0.0), "total": wall_s},
        "update_step_time_s": float(np.mean([r["step_time_s"] for r in train])) if train else None,
    }
    if pass_at_k is not None and pass_at_k.history:
        first, last = min(pass_at_k.history), max(pass_at_k.history)
        summary["pass_at_k_before"] = pass_at_k.history[first] if first == 0 else None
        summary["pass_at_k_after"] = pass_at_k.history[last]
        if first == 0 and last != first:
            change, stderr = paired_change(pass_at_k.per_problem[first], pass_at_k.per_problem[last])
            summary["pass@1_change"] = {"mean": change, "paired_stderr": stderr,
                                        "problems": len(pass_at_k.per_problem[first]),
                                        "samples_per_problem": pass_at_k.num_samples}
    if rollouts:
        heldout = {step: result["pass@1"] for step, result in pass_at_k.history.items()} if pass_at_k else {}
        summary["reward_curve"] = str(plot_reward_curve(rollouts, out / "reward_curve.png",
                                                        title=f"RL ({run.rl.estimator}) of {run.model.name}",
                                                        heldout_pass_at_1=heldout))
    return summary


def plot_reward_curve(rollouts: list[dict[str, Any]], path: Path, title: str,
                      heldout_pass_at_1: dict[int, float] | None = None) -> Path:
    """The rollout batches' reward, pass rate and zero-variance groups per step, and held-out pass@1 at the
    steps it was evaluated (a batch's reward follows which problems it drew; the held-out set is fixed)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps = [r["step"] for r in rollouts]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot(steps, [r["reward_mean"] for r in rollouts], "o-", label="reward mean")
    ax.plot(steps, [r["pass_rate"] for r in rollouts], "s--", label="pass rate (all tests)")
    ax.plot(steps, [r["zero_variance_groups"] for r in rollouts], ":", label="zero-variance groups")
    if heldout_pass_at_1:
        evaluated = sorted(heldout_pass_at_1)
        ax.plot(evaluated, [heldout_pass_at_1[step] for step in evaluated], "D-", color="black", linewidth=2,
                label="held-out pass@1")
    ax.set_xlabel("step (policy updates)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(run: RLConfig) -> None:
    summary = train_rl(run)
    if summary is not None:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    config_cli.run(main, _CONFIG, load_rl_config, setup=distributed.maybe_initialize)

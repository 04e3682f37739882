"""Rollouts as the Trainer's data iterator: sample groups with the current policy, score them in the
execution service, compute advantages, and hand out policy-update mini-batches.

    source = RolloutSource(problems, sampler_factory, rewards, settings, seq_len=..., seed=...)
    source.policy = lambda: model                     # the trainer's current weights (a Decoder view)
    batch = next(source)                              # one update's rows, [rows, seq_len] each

One rollout batch = `prompts_per_batch` problems x `group_size` samples. It is split into
`mini_batches` updates (PPO epochs of one pass); when they are used up the next `next()` samples a new
rollout batch with the weights of that moment. Problems are visited in a seeded order, reshuffled every
epoch over the set; every prompt's sampling seed is a function of (seed, rollout index, round, position),
so the rollouts depend on the checkpointed state only. `get_state()` holds the prompt cursor, the
rollout count and the unused part of the current rollout batch (npz, base64), so a run killed anywhere
resumes with the same rollouts and the same updates.

Sampling runs in `reward_chunks` chunks; a chunk's programs go to the service (`rl.rewards.RewardWorker`,
a background event loop) while the next chunk is sampled, so rollout and reward overlap. Weights pass to
the sampler as an argument (`Sampler.generate(params=...)`): the arrays stay on the device with the
trainer's shardings and the compiled sampling programs are reused.

Batch fields, [rows, L] with L = seq_len (prompt + response, right padded), the response tokens of
sequence i being targets at positions len(prompt) - 1 ...: inputs, targets, positions, segment_ids
(int32); loss_mask, advantages, old_logp (float32); ref_logp and sampler_logp when used. With
`sequences_per_row` > 1 each mini-batch's sequences are packed into as few rows as fit (`pack_rows`:
segment ids 1, 2, ... tell them apart and positions restart), so an update computes on tokens rather
than on padding; row counts are rounded to a few buckets, so the train step compiles a few shapes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evals.problems import Problem
from models.sampler import Sampler
from rl import algorithms as alg
from rl.rewards import RewardResult, RewardWorker


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    prompts_per_batch: int
    group_size: int
    mini_batches: int
    max_response_len: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    estimator: str = "rloo"
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3  # dynamic sampling: rollout rounds at most per batch
    overlong: str = "none"  # none | filter (no loss on truncated responses) | soft (DAPO's penalty)
    overlong_cache: int = 16
    reward_chunks: int = 2
    recompute_old_logp: bool = False  # old log-probs from a trainer forward pass (needed for truncated IS)
    kl: bool = False  # reference log-probs needed
    sequences_per_row: int = 1  # > 1: pack up to this many sequences into a row (no compute on padding)
    row_quantum: int = 1  # packed row counts are multiples of this (data-parallel shards x micro-batches)


def _encode(arrays: dict[str, np.ndarray]) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode()


def _decode(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as data:
        return {k: data[k] for k in data.files}


def prompt_seed(seed: int, rollout: int, round_: int, position: int) -> int:
    """The sampling seed of one prompt: a function of where it is in the run only."""
    return int(np.random.SeedSequence([seed, rollout, round_, position]).generate_state(1)[0] & 0x7FFFFFFF)


def packed_row_count(needed: int, rows: int, quantum: int) -> int:
    """Rows for `needed` packed rows out of at most `rows`: rounded up to a quarter of `rows` (so the train
    step sees at most four shapes), to a multiple of `quantum`, and never more than `rows`."""
    bucket = -(-max(rows // 4, 1) // quantum) * quantum
    return min(rows, -(-needed // bucket) * bucket)


def pack_rows(fields: dict[str, np.ndarray], lengths: Sequence[int], parts: int, max_per_row: int,
              quantum: int = 1) -> dict[str, np.ndarray]:
    """Rows [N, L] holding one sequence each (its first `lengths[i]` tokens; N divisible by `parts`) ->
    [parts * R, L] rows holding up to `max_per_row` sequences each, part by part (a part's sequences stay
    in its R rows: a mini-batch stays a mini-batch). First-fit decreasing by length; positions restart
    at 0 in each sequence, segment ids number a row's sequences 1, 2, ...; every other field moves with
    its tokens. R is the same for every part (`packed_row_count` of the fullest)."""
    n, width = fields["inputs"].shape
    per_part = n // parts
    layouts = []  # per part: rows, each a list of sequence indices
    for part in range(parts):
        members = sorted(range(part * per_part, (part + 1) * per_part), key=lambda i: (-lengths[i], i))
        rows: list[list[int]] = []
        free: list[int] = []
        for i in members:
            slot = next((r for r, room in enumerate(free) if room >= lengths[i] and len(rows[r]) < max_per_row), None)
            if slot is None:
                rows.append([])
                free.append(width)
                slot = len(rows) - 1
            rows[slot].append(i)
            free[slot] -= lengths[i]
        layouts.append(rows)
    count = packed_row_count(max(len(rows) for rows in layouts), per_part, quantum)
    out = {k: np.zeros((parts * count, width), v.dtype) for k, v in fields.items()}
    for part, rows in enumerate(layouts):
        for r, members in enumerate(rows):
            row, start = part * count + r, 0
            for segment, i in enumerate(members, start=1):
                span = slice(start, start + lengths[i])
                for k, v in fields.items():
                    out[k][row, span] = v[i, : lengths[i]]
                out["positions"][row, span] = np.arange(lengths[i])
                out["segment_ids"][row, span] = segment
                start += lengths[i]
    return out


class RolloutSource:
    """The RL data iterator (module docstring). `policy` must be set to a callable returning the current
    model (or its nnx.State) before the first `next()`; `ref_policy` likewise when settings.kl."""

    def __init__(self, problems: Sequence[Problem], sampler_factory: Callable[[Any], Sampler], rewards: RewardWorker,
                 settings: RolloutSettings, *, seq_len: int, seed: int):
        self.problems, self.settings, self.seq_len, self.seed = list(problems), settings, seq_len, seed
        self.sampler_factory, self.rewards = sampler_factory, rewards
        self.sampler: Sampler | None = None
        self.policy: Callable[[], Any] | None = None
        self.ref_policy: Callable[[], Any] | None = None
        self.cursor = 0  # problems drawn so far (over epochs)
        self.rollouts = 0  # rollout batches made
        self.batch: dict[str, np.ndarray] | None = None  # the current rollout batch (rows in update order)
        self.next_mini = 0
        self.new_metrics: dict[str, float] | None = None  # set when a rollout batch was made; the logger takes it
        self.last_batch_at: float | None = None  # perf_counter when next() last returned
        if len(self.problems) < settings.prompts_per_batch:
            raise ValueError(f"{len(self.problems)} problems for prompts_per_batch={settings.prompts_per_batch}")

    # -- iterator protocol and checkpointed state

    def __iter__(self) -> RolloutSource:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch is None or self.next_mini == self.settings.mini_batches:
            self.batch, self.next_mini = self.make_batch(), 0
        rows = len(self.batch["inputs"]) // self.settings.mini_batches
        part = {k: v[self.next_mini * rows:(self.next_mini + 1) * rows] for k, v in self.batch.items()}
        self.next_mini += 1
        self.last_batch_at = time.perf_counter()
        return part

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cursor": self.cursor, "rollouts": self.rollouts, "next_mini": self.next_mini}
        if self.batch is not None and self.next_mini < self.settings.mini_batches:
            state["batch"] = _encode(self.batch)
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.cursor, self.rollouts, self.next_mini = int(state["cursor"]), int(state["rollouts"]), int(state["next_mini"])
        self.batch = _decode(state["batch"]) if "batch" in state else None

    # -- prompts

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def _take(self, count: int) -> list[int]:
        """The next `count` problem indices in the seeded per-epoch order."""
        out = []
        for position in range(self.cursor, self.cursor + count):
            epoch, offset = divmod(position, len(self.problems))
            out.append(int(self._order(epoch)[offset]))
        self.cursor += count
        return out

    # -- one rollout batch

    def _sampler(self, params: Any) -> Sampler:
        if self.sampler is None:
            self.sampler = self.sampler_factory(params)
        return self.sampler

    def _sample_round(self, params: Any, indices: list[int], round_: int, timing: dict[str, float]) -> dict[str, Any]:
        """Samples G responses for each problem in `indices` (in chunks, scoring each chunk while the next
        is sampled) -> outputs, prompt ids and RewardResult, all prompt-major [len(indices) * G]."""
        s = self.settings
        sampler = self._sampler(params)
        problems = [self.problems[i] for i in indices]
        prompts = sampler.encode_prompts([p.prompt for p in problems])
        chunks = np.array_split(np.arange(len(indices)), min(s.reward_chunks, len(indices)))
        outputs, futures = [], []
        for chunk in chunks:
            start = time.perf_counter()
            seeds = [prompt_seed(self.seed, self.rollouts, round_, int(g)) for g in chunk]
            out = sampler.generate([prompts[g] for g in chunk], s.max_response_len, n=s.group_size,
                                   temperature=s.temperature, top_p=s.top_p, stop=s.stop, seed=seeds, params=params)
            timing["rollout_s"] += time.perf_counter() - start
            outputs.append(out)
            futures.append(self.rewards.submit([problems[g] for g in chunk for _ in range(s.group_size)], out.texts))
        start = time.perf_counter()
        results = [f.result() for f in futures]  # waits only for what the last chunk's sampling did not cover
        timing["reward_wait_s"] += time.perf_counter() - start
        tokens = [t for out in outputs for t in out.tokens]
        logprobs = [lp for out in outputs for lp in out.logprobs]
        finish = [f for out in outputs for f in out.finish_reasons]
        reward = RewardResult(*(np.concatenate([getattr(r, f.name) for r in results])
                                for f in dataclasses.fields(RewardResult)))
        return {"indices": indices, "prompts": prompts, "tokens": tokens, "logprobs": logprobs, "finish": finish,
                "reward": reward}

    def make_batch(self) -> dict[str, np.ndarray]:
        """Samples, scores and packs one rollout batch; sets `new_metrics`."""
        if self.policy is None:
            raise RuntimeError("RolloutSource.policy is not set (the trainer sets it)")
        s = self.settings
        p = s.prompts_per_batch
        params = self.policy()
        timing = {"rollout_s": 0.0, "reward_wait_s": 0.0}
        start = time.perf_counter()
        rounds = [self._sample_round(params, self._take(p), 0, timing)]
        groups = [(0, j) for j in range(p)]
        if s.dynamic_sampling:
            for round_ in range(1, s.max_sampling_rounds + 1):
                pools = [self._group_rewards(r) for r in rounds]
                groups = alg.select_groups(pools, p)
                if len(groups) == p or round_ == s.max_sampling_rounds:
                    break
                rounds.append(self._sample_round(params, self._take(p), round_, timing))
        batch, metrics = self._pack(rounds, groups)
        metrics.update(timing, rollout_batch_s=time.perf_counter() - start, sampling_rounds=len(rounds))
        self.rollouts += 1
        self.new_metrics = metrics
        return batch

    def _group_rewards(self, r: dict[str, Any]) -> np.ndarray:
        """Rewards [P_r, G] of a round, with the overlong penalty when configured."""
        s = self.settings
        rewards = r["reward"].rewards.astype(np.float64)
        if s.overlong == "soft":
            lengths = np.array([len(t) for t in r["tokens"]])
            rewards = rewards + alg.soft_overlong_penalty(lengths, s.max_response_len, s.overlong_cache)
        return rewards.reshape(-1, s.group_size)

    def _pack(self, rounds: list[dict[str, Any]], groups: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], dict]:
        """The chosen groups as training rows [P * G, L] (missing groups padded with loss_mask 0)."""
        s = self.settings
        p, g, length = s.prompts_per_batch, s.group_size, self.seq_len
        n = p * g
        fields = {k: np.zeros((n, length), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
        fields.update({k: np.zeros((n, length), np.float32) for k in ("loss_mask", "old_logp")})
        rewards = np.zeros((p, g))
        response_mask = np.zeros((p, g, length), np.float32)
        lengths, truncated, all_rewards, passed, errors, timeouts = [], [], [], [], [], []
        sampler_logp = np.zeros((n, length), np.float32)
        prompts_ids, responses = [], []
        for slot, (r, j) in enumerate(groups):
            rnd = rounds[r]
            rewards[slot] = self._group_rewards(rnd)[j]
            for k in range(g):
                i, row = j * g + k, slot * g + k
                prompt, response = rnd["prompts"][j], list(rnd["tokens"][i])
                seq = (prompt + response)[: length + 1]
                n_resp = len(seq) - len(prompt)
                fields["inputs"][row, : len(seq) - 1] = seq[:-1]
                fields["targets"][row, : len(seq) - 1] = seq[1:]
                fields["positions"][row, : len(seq) - 1] = np.arange(len(seq) - 1)
                fields["segment_ids"][row, : len(seq) - 1] = 1
                span = slice(len(prompt) - 1, len(prompt) - 1 + n_resp)
                overlong = rnd["finish"][i] == "length"
                if not (s.overlong == "filter" and overlong):
                    response_mask[slot, k, span] = 1.0
                sampler_logp[row, span] = rnd["logprobs"][i][:n_resp]
                prompts_ids.append(prompt)
                responses.append(seq[len(prompt):])
                lengths.append(len(response))
                truncated.append(overlong)
        for rnd in rounds:  # statistics over everything sampled, chosen or not
            all_rewards.append(rnd["reward"].rewards)
            passed.append(rnd["reward"].passed)
            errors.append(rnd["reward"].errors)
            timeouts.append(rnd["reward"].timeouts)
        chosen = len(groups)
        adv = np.zeros((p, g, length), np.float32)
        if chosen:
            adv[:chosen] = alg.advantages(s.estimator, rewards[:chosen], response_mask[:chosen])
        fields["advantages"] = adv.reshape(n, length)
        fields["loss_mask"] = response_mask.reshape(n, length)
        fields["old_logp"] = sampler_logp
        rows = len(prompts_ids)
        if s.recompute_old_logp:
            fields["sampler_logp"] = sampler_logp
            fields["old_logp"] = self._score(prompts_ids, responses, self.policy(), rows)
        if s.kl:
            fields["ref_logp"] = self._score(prompts_ids, responses, self.ref_policy(), rows)
        if s.sequences_per_row > 1:
            fields = pack_rows(fields, list((fields["segment_ids"] > 0).sum(axis=1)), s.mini_batches,
                               s.sequences_per_row, s.row_quantum)
        first = np.concatenate(all_rewards[:1])
        all_r = np.concatenate(all_rewards)
        metrics = {
            "reward_mean": float(first.mean()), "reward_std": float(first.std()),
            "pass_rate": float(np.concatenate(passed[:1]).mean()),
            "zero_variance_groups": float(alg.zero_variance_groups(self._group_rewards(rounds[0])).mean()),
            "chosen_groups": float(chosen), "rewards_sampled": float(len(all_r)),
            "service_errors": float(np.concatenate(errors).sum()), "timeouts": float(np.concatenate(timeouts).sum()),
            "response_len_mean": float(np.mean(lengths)) if lengths else 0.0,
            "response_len_max": float(np.max(lengths)) if lengths else 0.0,
            "truncated_frac": float(np.mean(truncated)) if truncated else 0.0,
        }
        return fields, metrics

    def _score(self, prompts: list[list[int]], responses: list[list[int]], params: Any, rows: int) -> np.ndarray:
        """Per-token log-probs [N, L] of the responses under `params` (full forward pass), placed like old_logp."""
        out = np.zeros((self.settings.prompts_per_batch * self.settings.group_size, self.seq_len), np.float32)
        if not rows:
            return out
        logps = self._sampler(params).score(prompts, responses, temperature=max(self.settings.temperature, 1e-6),
                                            params=params)
        for row, (prompt, lp) in enumerate(zip(prompts, logps)):
            out[row, len(prompt) - 1: len(prompt) - 1 + len(lp)] = lp
        return out

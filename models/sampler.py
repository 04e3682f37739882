"""Batched autoregressive sampling with a preallocated KV cache, jitted prefill and decode loop.

Padding: prompts are LEFT-padded to a common bucketed length P. Pad slots get segment id 0 (no token
attends to them) and each prompt's real tokens get segment 1 and positions 0..L_i-1, so the last
column holds every row's last prompt token and every decode step writes all rows at one cache
index, while positions stay per row (new token t of row i has position L_i + t).

Shapes are bucketed so that few programs are compiled: the batch to a power of two (and a multiple
of the mesh's batch shards), P and the generation budget to powers of two (at least
`min_bucket`), the cache to P + budget. Decoding runs as one `jax.lax.while_loop` on device that
exits when every row is done or the budget is spent; with stop strings it runs in chunks of
`stop_check_interval` tokens between which the host looks for the strings in the decoded text.

Log-probabilities: for each generated token, log softmax(logits / temperature) (temperature 1 when
greedy) at that token, i.e. the distribution before top-k / top-p truncation, which is what a full
forward pass of the model gives (RL importance ratios are taken against it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Annotated, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from pydantic import Field

from configs.schema import section
from configs.sharding_rules import DEFAULT_RULES
from models.decoder import Decoder
from models.layers import LayerCache
from models.sharding import Rules, constrain, logical_sharding, sharding_context

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
_MAX_EOS_IDS = 8  # EOS ids are passed as a fixed-size array (padded with -1) to avoid recompiles



@section
class SamplerConfig:
    """The `sampler` section: how a job samples (a training run's sample, evaluation, RL rollouts).

    prompt: the text a pretraining run continues at the end as a smoke test ("" skips it).
    max_len: prompt + completion tokens the cache holds; temperature 0 is greedy.
    """

    prompt: str = ""
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    top_k: Annotated[int, Field(ge=0)] = 0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    max_len: Annotated[int, Field(ge=2)] = 256

class TokenizerLike(Protocol):
    """What the sampler uses of a tokenizer (`data.tokenizer.Tokenizer`, `data.hf_tokenizer.HFTokenizer`)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def bos_id(self) -> int | None: ...


class SampleOutput(NamedTuple):
    """Per prompt i: `tokens[i]` the generated ids (EOS included when emitted; cut after the token
    that completed a stop string), `texts[i]` their text (without EOS or the stop string; None without
    a tokenizer), `logprobs[i]` float32 [len] per-token log-probabilities (module docstring),
    `logprob_sums[i]`, `lengths[i] == len(tokens[i])`, `finish_reasons[i]` in {"eos", "stop",
    "length"}, `prompt_tokens[i]` the prompt as fed (BOS included). `timing`: seconds spent in
    prefill and decode, tokens processed."""

    tokens: list[list[int]]
    texts: list[str] | None
    logprobs: list[np.ndarray]
    logprob_sums: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    prompt_tokens: list[list[int]]
    timing: dict[str, float]


class DecodeState(NamedTuple):
    """Loop carry. tokens/logprobs: [B, N] outputs; step: [] tokens written so far; last_token,
    position: [B] the token to feed next and its position; done: [B]; key: sampling PRNG key."""

    cache: dict[str, LayerCache]
    tokens: jax.Array
    logprobs: jax.Array
    step: jax.Array
    last_token: jax.Array
    position: jax.Array
    done: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of the sampling parameters (each distinct value compiles once)."""

    greedy: bool
    top_k: int  # 0: no top-k truncation
    top_p: bool  # whether nucleus truncation is applied (its threshold is a runtime value)


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# ---- sampling one token -------------------------------------------------------------------------------


def sample_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, mode: SamplingMode
) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (token [B] int32, its log-probability [B]).

    Truncation as in transformers' logits processors: temperature, then top-k (keep the k largest),
    then top-p (keep the smallest set of most likely tokens whose probability reaches top_p).
    """
    if mode.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    scaled = logits / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if mode.top_k or mode.top_p:
        k = mode.top_k or scaled.shape[-1]
        values, indices = jax.lax.top_k(scaled, k)  # sorted, descending
        if mode.top_p:
            probs = jax.nn.softmax(values, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            values = jnp.where(mass_before < top_p, values, -jnp.inf)
        choice = jax.random.categorical(key, values, axis=-1)
        token = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        token = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


# ---- jitted prefill and decode ------------------------------------------------------------------------


def _constrain_cache(cache: dict[str, LayerCache]) -> dict[str, LayerCache]:
    """Batch over the data axes, KV heads over tensor (no-op outside a sharding context)."""
    return {
        name: LayerCache(
            constrain(c.k, ("layers", "batch", None, "activation_kv_heads", None)),
            constrain(c.v, ("layers", "batch", None, "activation_kv_heads", None)),
            constrain(c.positions, ("layers", "batch", None)),
            constrain(c.segment_ids, ("layers", "batch", None)),
            c.index,
        )
        for name, c in cache.items()
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "budget", "cache_dtype", "mode"))
def _prefill(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    done: jax.Array,
    eos_ids: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    cache_len: int,
    budget: int,
    cache_dtype: str,
    mode: SamplingMode,
) -> DecodeState:
    """Runs the prompts [B, P] through the model into a fresh cache and samples the first token."""
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    cache = _constrain_cache(model.init_cache(batch, cache_len, cache_dtype))
    hidden, _, cache = model.hidden_states(tokens, positions, segment_ids, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]  # left padding: the last column is every row's last token
    key, step_key = jax.random.split(key)
    token, logp = sample_token(logits, step_key, temperature, top_p, mode)
    out_tokens = jnp.zeros((batch, budget), jnp.int32).at[:, 0].set(token)
    out_logprobs = jnp.zeros((batch, budget), jnp.float32).at[:, 0].set(jnp.where(done, 0.0, logp))
    done = done | jnp.isin(token, eos_ids)
    return DecodeState(cache, out_tokens, out_logprobs, jnp.ones((), jnp.int32), token, positions[:, -1] + 1, done, key)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("carry",))
def _decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    carry: DecodeState,
    stop_at: jax.Array,
    eos_ids: jax.Array,
    pad_id: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    mode: SamplingMode,
) -> DecodeState:
    """Generates tokens until step == stop_at or every row is done (one device loop, no host round trips).

    The parameters ride in the loop carry unchanged: NNX modules must be built from values of the
    trace they run in, and XLA passes loop-invariant carries through without copies.
    """

    def keep_going(loop: tuple[nnx.State, DecodeState]) -> jax.Array:
        c = loop[1]
        return (c.step < stop_at) & ~jnp.all(c.done)

    def one_token(loop: tuple[nnx.State, DecodeState]) -> tuple[nnx.State, DecodeState]:
        params, c = loop
        segment = jnp.ones_like(c.last_token)[:, None]
        out = nnx.merge(graphdef, params)(c.last_token[:, None], c.position[:, None], segment, c.cache)
        key, step_key = jax.random.split(c.key)
        token, logp = sample_token(out.logits[:, 0], step_key, temperature, top_p, mode)
        token = jnp.where(c.done, pad_id, token)
        logp = jnp.where(c.done, 0.0, logp)
        return params, DecodeState(
            cache=out.cache,
            tokens=jax.lax.dynamic_update_index_in_dim(c.tokens, token, c.step, axis=1),
            logprobs=jax.lax.dynamic_update_index_in_dim(c.logprobs, logp, c.step, axis=1),
            step=c.step + 1,
            last_token=token,
            position=c.position + 1,
            done=c.done | jnp.isin(token, eos_ids),
            key=key,
        )

    return jax.lax.while_loop(keep_going, one_token, (state, carry))[1]


# ---- the sampler ----------------------------------------------------------------------------------------


class Sampler:
    """Generates continuations of batches of prompts with a Decoder (dense or MoE).

    model: the Decoder, already placed (e.g. `load_hf_checkpoint(..., mesh=mesh)`); mesh / rules:
      the mesh it lives on and the logical-axis rules (batch and KV cache are sharded by them).
    tokenizer: needed for string prompts, texts and stop strings; its EOS id(s) end a sequence
      (`eos_ids` if it has them, else `eos_id`).
    max_len: longest prompt + generation (default the model's max_seq_len).
    add_bos: prepend BOS to string prompts (default: the tokenizer's `add_bos` if it has one, else
      whether it has a BOS id). Token-id prompts are used as given.

    The sampler holds the model's parameters as they were when it was made; after a weight update
    (RL), make a new one: that is cheap, and compiled programs are shared by all samplers of models
    with the same structure.
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: TokenizerLike | None = None,
        *,
        max_len: int | None = None,
        mesh: Mesh | None = None,
        rules: Rules | None = None,
        cache_dtype: str | None = None,
        add_bos: bool | None = None,
        min_bucket: int = 16,
        stop_check_interval: int = 16,
    ):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_len = max_len or model.cfg.max_seq_len
        self.mesh, self.rules = mesh, tuple(rules or DEFAULT_RULES)
        self.cache_dtype = cache_dtype or model.cfg.dtype
        self.min_bucket, self.stop_check_interval = min_bucket, stop_check_interval
        bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
        self.add_bos = (getattr(tokenizer, "add_bos", bos is not None) if add_bos is None else add_bos) and bos is not None
        self.eos_ids: tuple[int, ...] = ()
        if tokenizer is not None:
            self.eos_ids = tuple(getattr(tokenizer, "eos_ids", None) or (() if tokenizer.eos_id is None else (tokenizer.eos_id,)))
        self.pad_id = _pad_id(tokenizer)

    # -- input preparation

    def encode_prompts(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """The token ids `generate` feeds for `prompts`: strings encoded (BOS first when `add_bos`),
        token lists as given; checked to be non-empty and inside the vocabulary."""
        ids = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i}: string prompts need a tokenizer")
                prompt = ([self.tokenizer.bos_id] if self.add_bos else []) + list(self.tokenizer.encode(prompt))
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError(f"prompt {i} is empty (no tokens)")
            if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
                raise ValueError(f"prompt {i}: token ids must be in [0, {self.cfg.vocab_size})")
            ids.append(prompt)
        return ids

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        spec = logical_sharding(("batch",), self.mesh, self.rules).spec[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return math.prod(self.mesh.shape[a] for a in axes)

    def _put(self, array: np.ndarray, axes: tuple[str | None, ...]) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, logical_sharding(axes, self.mesh, self.rules, array.shape))

    def _left_padded(self, prompts: list[list[int]], batch: int, length: int) -> dict[str, np.ndarray]:
        tokens = np.full((batch, length), self.pad_id, np.int32)
        positions = np.zeros((batch, length), np.int32)
        segments = np.zeros((batch, length), np.int32)
        done = np.zeros((batch,), bool)
        for row in range(batch):
            prompt = prompts[row] if row < len(prompts) else [self.pad_id]  # filler rows: one token, done at once
            tokens[row, length - len(prompt):] = prompt
            positions[row, length - len(prompt):] = np.arange(len(prompt))
            segments[row, length - len(prompt):] = 1
            done[row] = row >= len(prompts)
        return {"tokens": tokens, "positions": positions, "segment_ids": segments, "done": done}

    # -- generation

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        seed: int = 0,
    ) -> SampleOutput:
        """Continues every prompt by up to `max_new_tokens` tokens (see `SampleOutput`).

        temperature 0 is greedy decoding. top_k 0 and top_p 1 disable those truncations. stop:
        strings that end a sequence (the text is cut before them); stop_token_ids: ids that end a
        sequence like EOS. seed: sampling is deterministic given the seed and the batch.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        eos = tuple(dict.fromkeys((*self.eos_ids, *stop_token_ids)))
        if len(eos) > _MAX_EOS_IDS:
            raise ValueError(f"at most {_MAX_EOS_IDS} EOS / stop token ids, got {len(eos)}")
        prompts_ids = self.encode_prompts(prompts)
        longest = max(len(p) for p in prompts_ids)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_len={self.max_len}")
        prompt_len = min(bucket(longest, self.min_bucket), self.max_len - max_new_tokens)
        budget = min(bucket(max_new_tokens, self.min_bucket), self.max_len - prompt_len)
        multiple = self._batch_multiple()
        batch = -(-bucket(len(prompts_ids), 1) // multiple) * multiple
        mode = SamplingMode(greedy=temperature == 0, top_k=min(top_k, self.cfg.vocab_size), top_p=top_p < 1)

        inputs = self._left_padded(prompts_ids, batch, prompt_len)
        eos_array = np.full((_MAX_EOS_IDS,), -1, np.int32)
        eos_array[: len(eos)] = eos
        scalars = dict(temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p))
        context = sharding_context(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

        with context:
            start = time.perf_counter()
            carry = _prefill(
                self.graphdef, self.state,
                self._put(inputs["tokens"], ("batch", None)),
                self._put(inputs["positions"], ("batch", None)),
                self._put(inputs["segment_ids"], ("batch", None)),
                self._put(inputs["done"], ("batch",)),
                jnp.asarray(eos_array), jax.random.key(seed), **scalars,
                cache_len=prompt_len + budget, budget=budget, cache_dtype=self.cache_dtype, mode=mode,
            )
            jax.block_until_ready(carry.tokens)
            prefill_seconds = time.perf_counter() - start
            carry = self._decode_loop(carry, prompts_ids, max_new_tokens, stop, eos_array, mode, scalars)
            tokens, logprobs, steps = jax.device_get((carry.tokens, carry.logprobs, carry.step))
            decode_seconds = time.perf_counter() - start - prefill_seconds

        output = self._finish(prompts_ids, tokens, logprobs, int(steps), set(eos), stop)
        generated = int(output.lengths.sum())
        timing = {
            "prefill_seconds": prefill_seconds,
            "decode_seconds": decode_seconds,
            "prompt_tokens": float(sum(map(len, prompts_ids))),
            "generated_tokens": float(generated),
            "decode_steps": float(steps),
        }
        return output._replace(timing=timing)

    def _decode_loop(
        self,
        carry: DecodeState,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop: Sequence[str],
        eos_array: np.ndarray,
        mode: SamplingMode,
        scalars: dict[str, jax.Array],
    ) -> DecodeState:
        """Runs `_decode` to the end, or in chunks with host-side stop-string checks between them."""
        interval = self.stop_check_interval if stop else max_new_tokens
        step = 1
        while step < max_new_tokens:
            step = min(step + interval, max_new_tokens)
            carry = _decode(
                self.graphdef, self.state, carry, jnp.int32(step), jnp.asarray(eos_array),
                jnp.int32(self.pad_id), **scalars, mode=mode,
            )
            if not stop:
                continue
            tokens, done, written = jax.device_get((carry.tokens, carry.done, carry.step))
            if done.all():
                break
            new_done = done.copy()
            for row, prompt in enumerate(prompts):
                if not done[row] and _find_stop(self._text(prompt, tokens[row, :written]), stop) is not None:
                    new_done[row] = True
            if new_done.all():
                break
            if (new_done != done).any():
                carry = carry._replace(done=self._put(new_done, ("batch",)))
            step = int(written)
        return carry

    def _text(self, prompt: list[int], generated: Sequence[int]) -> str:
        """Text of `generated` as it reads after `prompt` (some tokenizers drop a leading space when
        decoding a sequence on its own, so decode prompt + generated and remove the prompt's text)."""
        assert self.tokenizer is not None
        prompt_text = self.tokenizer.decode(prompt)
        full = self.tokenizer.decode([*prompt, *map(int, generated)])
        return full[len(prompt_text):] if full.startswith(prompt_text) else self.tokenizer.decode(list(map(int, generated)))

    def _finish(
        self,
        prompts: list[list[int]],
        tokens: np.ndarray,
        logprobs: np.ndarray,
        steps: int,
        eos: set[int],
        stop: Sequence[str],
    ) -> SampleOutput:
        out_tokens, out_logprobs, texts, reasons = [], [], [], []
        for row, prompt in enumerate(prompts):
            generated = tokens[row, :steps].tolist()
            eos_at = next((i for i, t in enumerate(generated) if t in eos), None)
            if eos_at is None:
                reason, body = FINISH_LENGTH, generated
            else:
                generated = generated[: eos_at + 1]
                reason, body = FINISH_EOS, generated[:-1]
            text = None
            if self.tokenizer is not None:
                text = self._text(prompt, body)
                cut = _find_stop(text, stop)
                if cut is not None:
                    generated = body[: self._tokens_through_stop(prompt, body, stop)]
                    text, reason = text[:cut], FINISH_STOP
            out_tokens.append(generated)
            out_logprobs.append(logprobs[row, : len(generated)].astype(np.float32))
            texts.append(text)
            reasons.append(reason)
        return SampleOutput(
            tokens=out_tokens,
            texts=texts if self.tokenizer is not None else None,
            logprobs=out_logprobs,
            logprob_sums=np.array([lp.sum() for lp in out_logprobs], np.float32),
            lengths=np.array([len(t) for t in out_tokens], np.int32),
            finish_reasons=reasons,
            prompt_tokens=prompts,
            timing={},
        )

    def _tokens_through_stop(self, prompt: list[int], generated: list[int], stop: Sequence[str]) -> int:
        """The fewest leading tokens of `generated` whose text contains a stop string (binary search:
        once a prefix's text contains one, every longer prefix's does)."""
        low, high = 1, len(generated)
        while low < high:
            mid = (low + high) // 2
            if _find_stop(self._text(prompt, generated[:mid]), stop) is None:
                low = mid + 1
            else:
                high = mid
        return low


def _pad_id(tokenizer: TokenizerLike | None) -> int:
    """The id that fills padding slots and finished rows (never attended to, never returned)."""
    try:
        return int(getattr(tokenizer, "pad_id", None) or 0)
    except (KeyError, ValueError):  # a tokenizer without pad (or EOS) token
        return 0


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


"""Batched sampling for RL rollouts, pass@k evaluation and `models.generate`: a slot KV cache, shared
prompt prefill for groups of samples, continuous batching, parameters passed as arguments.

Using it (the RL trainer, evals, the CLI):

    sampler = Sampler(model, tokenizer, max_len=2048, mesh=mesh, rules=rules)  # once
    out = sampler.generate(prompts, max_new_tokens=512, n=8, temperature=1.0, seed=step,
                           params=nnx.state(policy))      # every step, with the new weights
    out.tokens[i], out.logprobs[i]                        # sample i = out.sample_index[i] of prompt out.prompt_index[i]
    sampler.score(prompt_ids, completion_ids, params=...) # the same log-probs from one full forward pass

- prompts: strings (encoded with the tokenizer, BOS first when `add_bos`) or lists of token ids (used
  as given, e.g. a rendered chat template). n: samples per prompt. Outputs are prompt-major: request
  i = g * n + j is sample j of prompt g (`prompt_index`, `sample_index`).
- params: an `nnx.State` of a model with the sampler model's structure (`nnx.state(model)`, e.g. the
  trainer's model after an update; remat/dtype settings may differ, parameter shapes may not), or a
  `Decoder`. None: the parameters the sampler was built with (`set_params` replaces them). They are
  an argument of every compiled program, so new weights reuse the programs compiled before, as long
  as they arrive with the same shardings (same mesh and rules).
- seed: an int (prompt g samples with key fold_in(PRNGKey(seed), g)), or one seed per prompt (key
  PRNGKey(seed[g])). Sample j of a prompt draws its t-th token with fold_in(fold_in(key, j), t), so a
  prompt's samples depend on its seed only: not on the other prompts of the call, the number of rows,
  or when continuous batching scheduled it (tested).
- Log-probabilities: `logprobs[i][t]` is log softmax(logits / temperature) (temperature 1 when greedy)
  at the sampled token, the distribution before top-k / top-p truncation, i.e. what a full forward pass
  of the model gives (RL importance ratios are taken against it; they agree with `score` to float
  rounding, 1e-5 in float32). `logprobs_top_k=k` also returns the k most likely tokens and their
  log-probabilities at every step (`top_ids[i]`, `top_logprobs[i]`: [len, k]).
- Stopping: EOS ids of the tokenizer, `stop_token_ids` (any number), `stop` strings (checked on the
  host every `stop_check_interval` tokens; text and tokens cut at the string), or `max_new_tokens`.

How it runs (`timing` reports prefill / decode seconds and tokens):
- Rows and slots. The decode batch has R rows (`max_rows`, bucketed to a power of two, a multiple of
  the mesh's batch shards). Every row owns a slot cache [S] per layer (`models.layers.KVCache`); the
  token at position p sits in slot p, so rows hold sequences of different lengths.
- Prefill is shared: the prompts of the requests that enter the batch are prefilled once each, right
  padded to the prompt bucket P, and their keys/values are copied into the rows of their n samples
  (`share_prefill=False` prefills every sample separately; the outputs are the same, tested).
- Continuous batching: decoding runs as one device loop of up to `decode_chunk` steps, which exits
  early once max(1, R / 8) rows have finished while requests are pending; finished rows are read back
  and refilled with pending requests, so long-tailed response lengths do not leave rows idle. Once no
  request is pending (the drain tail), the live rows move to a batch of half the rows or fewer
  whenever they fit (`drain_rows`), so finished rows stop costing work.
- Decode reads only the filled part of the cache: each loop is compiled for an attention window W (a
  bucket {1, 1.5} x 2^k >= the longest active row's position at the end of the chunk) and reads slots
  [0, W) only. The cache is one buffer per layer, donated to each program; the loop carries every
  layer's slots [0, W) (the buffer itself when W = S, else cut once per loop and written back after
  it), and every step scatters its new slots into them and reads them in place (no per-step copies).
  No host round trips per token.
- Compiled programs depend on the model structure, the buckets (R, P, budget, prefill batch, window)
  and the static sampling mode (greedy, top-k, whether top-p, logprobs_top_k); temperature, top-p,
  max_new_tokens within a budget bucket, EOS ids and seeds are runtime values.
- Sharding: with `mesh` and `rules`, parameters stay where they are (e.g. `load_hf_checkpoint(...,
  mesh=mesh)`, `create_sharded`); rows shard over the batch axes and KV heads over tensor (logical
  axes), every program runs inside the mesh's sharding context. A decode step's writes are per-row
  scatters, so with rows sharded its only collective is the loop condition's all-reduce.
- On a CPU, XLA runs one op at a time and keeps small ops on one thread; one device per core
  (`jax.config.update("jax_num_cpu_devices", cores)`) with rows data-parallel over a {"data": cores}
  mesh puts every core on every op (10-15% faster decode on 2 cores, `bench.generate --cpu_devices`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from pydantic import Field

from configs.schema import section
from configs.sharding_rules import DEFAULT_RULES
from models.config import ModelConfig
from models.decoder import Decoder
from models.layers import KVCache
from models.sharding import Rules, constrain, logical_sharding, sharding_context

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


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
    """Per request i (sample `sample_index[i]` of prompt `prompt_index[i]`, prompt-major): `tokens[i]`
    the generated ids (EOS included when emitted; cut after the token that completed a stop string),
    `texts[i]` their text (without EOS or the stop string; None without a tokenizer), `logprobs[i]`
    float32 [len] per-token log-probabilities (module docstring), `logprob_sums[i]`, `lengths[i] ==
    len(tokens[i])`, `finish_reasons[i]` in {"eos", "stop", "length"}, `prompt_tokens[i]` the prompt as
    fed (BOS included). `timing`: seconds in prefill and decode, tokens processed. With
    `logprobs_top_k=k`: `top_ids[i]` int32 and `top_logprobs[i]` float32, both [len, k]."""

    tokens: list[list[int]]
    texts: list[str] | None
    logprobs: list[np.ndarray]
    logprob_sums: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    prompt_tokens: list[list[int]]
    timing: dict[str, float]
    prompt_index: np.ndarray | None = None
    sample_index: np.ndarray | None = None
    top_ids: list[np.ndarray] | None = None
    top_logprobs: list[np.ndarray] | None = None


class DecodeState(NamedTuple):
    """The device state of R rows. cache: stack name -> one KVCache [1, R, K, S, H] per layer (own
    buffers, so that a decode loop reads each layer's slots in place; `_layer_windows`); tokens, logprobs:
    [R, N] each row's generated tokens so far; top_ids, top_logprobs: [R, N, k]; steps: [R] tokens
    generated by the row; last_token, position: [R] the token to feed next and its position (= its
    slot); done: [R] (rows without a request are done); keys: [R, 2] the row's sample key; iterations:
    [] decode steps run (for timing)."""

    cache: dict[str, tuple[KVCache, ...]]
    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    steps: jax.Array
    last_token: jax.Array
    position: jax.Array
    done: jax.Array
    keys: jax.Array
    iterations: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of the sampling parameters (each distinct value compiles once)."""

    greedy: bool
    top_k: int  # 0: no top-k truncation
    top_p: bool  # whether nucleus truncation is applied (its threshold is a runtime value)
    logprobs_top_k: int = 0  # how many most likely tokens' log-probabilities to return per step


@dataclasses.dataclass(frozen=True)
class Placement:
    """The static sharding of a program: None (one device) or a mesh with its rules (hashable)."""

    mesh: Mesh | None
    rules: tuple[tuple[str, Any], ...]

    def context(self) -> contextlib.AbstractContextManager:
        return sharding_context(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def window_bucket(n: int, minimum: int, limit: int) -> int:
    """The attention window for positions < n: the smallest of 2^k and 3 * 2^(k-1) >= max(n, minimum),
    at most `limit` (the cache length)."""
    size = bucket(n, minimum)
    if size // 4 * 3 >= max(n, minimum) and size >= 4:
        size = size // 4 * 3
    return min(size, limit)


# ---- sampling one token per row ------------------------------------------------------------------------


def max_and_first_argmax(x: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """x [R, V] -> (each row's maximum [R], the first index holding it [R] int32, as `jnp.argmax`).

    Plain reductions over blocks of `block` entries: the blocks' maxima (one pass over x), the
    first block holding the row's maximum, then the first entry of that block holding it. XLA:CPU
    runs argmax as one variadic (value, index) reduction that it does not vectorise, ~40x slower
    over an 8192 vocabulary (results/sampler_profile); a maximum, then an index pass over the whole
    row costs one more pass over [R, V] than the blocks."""
    rows, size = x.shape
    blocks = jnp.pad(x, ((0, 0), (0, -size % block)), constant_values=-jnp.inf).reshape(rows, -1, block)
    block_max = jnp.max(blocks, axis=-1)  # [R, V / block]
    top = jnp.max(block_max, axis=-1)
    count = block_max.shape[1]
    first = jnp.min(jnp.where(block_max == top[:, None], jnp.arange(count, dtype=jnp.int32), count), axis=-1)
    first = jnp.minimum(first, count - 1)  # a row of NaNs has no maximum
    within = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]  # [R, block]
    offset = jnp.min(jnp.where(within == top[:, None], jnp.arange(block, dtype=jnp.int32), block), axis=-1)
    return top, jnp.minimum(first * block + offset, size - 1)


def inverse_cdf_sample(logits: jax.Array, uniform: jax.Array, block: int = 128) -> jax.Array:
    """logits [R, M] (-inf: excluded), uniform [R] in [0, 1) -> [R] int32 drawn from softmax(logits).

    Inverse-CDF sampling: the first index whose cumulative mass reaches (1 - u) x the total mass, so a
    row needs one uniform instead of the M Gumbel draws of `jax.random.categorical` (threefry bits and
    a variadic argmax over the vocabulary, the costliest part of a sampled decode step on CPU). Two
    levels keep it one pass over [R, M]: block masses and their running sum choose a block of `block`
    entries, whose own running sum chooses the entry. Excluded entries (mass 0) are never chosen: the
    first entry reaching a positive target has positive mass, and a target past the block's float
    sum (rounding) falls back to the block's last entry of positive mass.
    """
    rows, size = logits.shape
    mass = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised, 1 at the maximum
    blocks = jnp.pad(mass, ((0, 0), (0, -size % block))).reshape(rows, -1, block)
    reached = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [R, blocks] mass up to each block's end
    target = (1.0 - uniform) * reached[:, -1]  # in (0, total]
    chosen = jnp.minimum(jnp.sum(reached < target[:, None], axis=-1), reached.shape[1] - 1)
    before = jnp.where(chosen > 0, jnp.take_along_axis(reached, jnp.maximum(chosen - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    within = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [R, block]
    entry = jnp.sum(jnp.cumsum(within, axis=-1) < (target - before)[:, None], axis=-1)
    last_positive = jnp.max(jnp.where(within > 0, jnp.arange(block), 0), axis=-1)
    return (chosen * block + jnp.minimum(entry, last_positive)).astype(jnp.int32)


def sample_tokens(
    logits: jax.Array, keys: jax.Array, steps: jax.Array, temperature: jax.Array, top_p: jax.Array, mode: SamplingMode
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [R, V] float32, keys [R, 2] (each row's sample key), steps [R] (the index of the token in
    its sample) -> (tokens [R] int32, their log-probabilities [R], top ids [R, k], top log-probs [R, k]).

    Truncation as in transformers' logits processors: temperature, then top-k (keep the k largest),
    then top-p (keep the smallest set of most likely tokens whose probability reaches top_p). Row r
    draws its uniform with fold_in(keys[r], steps[r]), so its token does not depend on the other rows.
    Log-probabilities are logit - log Z from one log-partition per row (no [R, V] log-softmax array).
    """
    scaled = logits if mode.greedy else logits / temperature
    if mode.greedy:
        top, token = max_and_first_argmax(scaled)
    else:
        top = jnp.max(scaled, axis=-1)
        uniform = jax.vmap(lambda key, step: jax.random.uniform(jax.random.fold_in(key, step)))(keys, steps)
        values, indices = scaled, None
        if mode.top_k or mode.top_p:
            values, indices = jax.lax.top_k(scaled, mode.top_k or scaled.shape[-1])  # sorted, descending
            if mode.top_p:
                probs = jax.nn.softmax(values, axis=-1)
                mass_before = jnp.cumsum(probs, axis=-1) - probs
                values = jnp.where(mass_before < top_p, values, -jnp.inf)
        choice = inverse_cdf_sample(values, uniform)
        token = choice if indices is None else jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
        token = token.astype(jnp.int32)
    log_mass = jnp.log(jnp.sum(jnp.exp(scaled - top[:, None]), axis=-1))  # log Z - max
    log_z = top + log_mass
    if mode.greedy:  # the token holds the maximum
        token_logp = -log_mass
    else:
        token_logp = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - log_z
    top_values, top_ids = jax.lax.top_k(scaled, mode.logprobs_top_k)
    return token, token_logp, top_ids.astype(jnp.int32), top_values - log_z[:, None]


# ---- compiled programs ---------------------------------------------------------------------------------


def _constrain_kv(cache: KVCache) -> KVCache:
    """Rows over the data axes, KV heads over tensor (no-op outside a sharding context)."""
    axes = ("layers", "batch", "activation_kv_heads", None, None)
    return KVCache(constrain(cache.k, axes), constrain(cache.v, axes))


def _constrain_cache(cache: dict[str, tuple[KVCache, ...]]) -> dict[str, tuple[KVCache, ...]]:
    return {name: tuple(map(_constrain_kv, layers)) for name, layers in cache.items()}


def _per_layer(cache: dict[str, KVCache]) -> dict[str, tuple[KVCache, ...]]:
    """Each stack's cache [L, B, K, S, H] -> one KVCache [1, B, K, S, H] per layer."""
    return {name: tuple(KVCache(c.k[i : i + 1], c.v[i : i + 1]) for i in range(c.k.shape[0])) for name, c in cache.items()}


def _layer_windows(cache: dict[str, tuple[KVCache, ...]], window: int) -> dict[str, tuple[KVCache, ...]]:
    """Every layer's slots [0, window) [1, B, K, window, H]: the buffers a decode loop carries
    (`LayerStack.decode`). A copy once per loop when window < S (none when window = S): reading a
    window of a larger buffer at every step is a copy on XLA:CPU."""
    return _constrain_cache({name: tuple(KVCache(c.k[..., :window, :], c.v[..., :window, :]) for c in layers)
                             for name, layers in cache.items()})


def _write_windows(cache: dict[str, tuple[KVCache, ...]], windows: dict[str, tuple[KVCache, ...]]) -> dict[str, tuple[KVCache, ...]]:
    """`_layer_windows`' inverse: the windows written back into slots [0, window) of the cache (in
    place when the cache is donated)."""
    def write(buffer: jax.Array, window: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(buffer, window, (0,) * buffer.ndim)

    return _constrain_cache({name: tuple(KVCache(write(c.k, w.k), write(c.v, w.v)) for c, w in zip(layers, windows[name]))
                             for name, layers in cache.items()})


@functools.cache
def _unrolled_twin(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and abstract state of `cfg`'s model built with its layers unrolled."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0))))


def _stacked_source(path: tuple[Any, ...]) -> tuple[tuple[Any, ...], int | None]:
    """An unrolled model's parameter path -> (the scanned model's path, index on its layers axis).

    Unrolled stacks hold their blocks in lists ([repeat], or [pattern position][repeat]) where scanned
    ones stack them: the repeat is the last list index of the path's first run of indices."""
    first = next((i for i, key in enumerate(path) if isinstance(key, int)), None)
    if first is None:
        return path, None
    last = first
    while last + 1 < len(path) and isinstance(path[last + 1], int):
        last += 1
    return path[:last] + path[last + 1:], path[last]


def unrolled(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """The model (graphdef, params) with its scanned layer stacks unrolled: one array per layer cut from
    each stacked parameter (unchanged when the model is not scanned).

    For the decode loop: a scan over stacked weights slices (copies) every layer's weights at every
    step, and XLA does not hoist those slices out of the loop (~8% of a CPU decode step of the
    `tiny` shape, results/sampler_profile); cut once per `generate` call (`_cut_layers`), before the
    decode loops, each step reads them in place.
    """
    cfg = nnx.merge(graphdef, params).cfg
    if not cfg.scan_layers:
        return graphdef, params
    twin_graphdef, abstract = _unrolled_twin(cfg)
    stacked = dict(nnx.to_flat_state(params))
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        source, layer = _stacked_source(path)
        value = stacked[source].get_value()
        leaves.append((path, variable.replace(value if layer is None else value[layer])))
    return twin_graphdef, nnx.from_flat_state(leaves)


@functools.partial(jax.jit, static_argnames=("graphdef", "placement"))
def _cut_layers(graphdef: nnx.GraphDef, params: nnx.State, *, placement: Placement) -> nnx.State:
    """`unrolled`'s parameters (the graph is `_unrolled_twin`'s): once per `generate` call."""
    with placement.context():
        return unrolled(graphdef, params)[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "cache_len", "budget", "cache_dtype", "top_k", "placement"))
def _init_state(
    graphdef: nnx.GraphDef, params: nnx.State, *, rows: int, cache_len: int, budget: int, cache_dtype: str, top_k: int,
    placement: Placement,
) -> DecodeState:
    """R = `rows` empty (done) rows with caches of `cache_len` slots and room for `budget` tokens."""
    with placement.context():
        model = nnx.merge(graphdef, params)

        def per_row(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
            return constrain(jnp.zeros(shape, dtype), ("batch",) + (None,) * (len(shape) - 1))

        return DecodeState(
            cache=_constrain_cache(_per_layer(model.init_kv_cache(rows, cache_len, cache_dtype))),
            tokens=per_row((rows, budget), jnp.int32),
            logprobs=per_row((rows, budget), jnp.float32),
            top_ids=per_row((rows, budget, top_k), jnp.int32),
            top_logprobs=per_row((rows, budget, top_k), jnp.float32),
            steps=per_row((rows,), jnp.int32),
            last_token=per_row((rows,), jnp.int32),
            position=per_row((rows,), jnp.int32),
            done=constrain(jnp.ones((rows,), bool), ("batch",)),
            keys=per_row((rows, 2), jnp.uint32),
            iterations=jnp.zeros((), jnp.int32),
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype", "placement"))
def _prefill(
    graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, lengths: jax.Array, *, cache_dtype: str,
    placement: Placement,
) -> tuple[dict[str, KVCache], jax.Array]:
    """Prompts tokens [G, P] (right-padded; real lengths [G]) -> (their cache [L, G, K, P, H] per
    stack, float32 logits [G, V] after each prompt's last token)."""
    with placement.context():
        model = nnx.merge(graphdef, params)
        g, p = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (g, p))
        cache = {name: _constrain_kv(c) for name, c in model.init_kv_cache(g, p, cache_dtype).items()}
        hidden, cache = model.decode(tokens, positions, cache, window=p)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [G, 1, D]
        return cache, model.logits(last)[:, 0]


@functools.partial(jax.jit, static_argnames=("mode", "placement"), donate_argnames=("state",))
def _insert(
    state: DecodeState,
    prefix: dict[str, KVCache],
    prefix_logits: jax.Array,
    slots: jax.Array,
    source: jax.Array,
    prompt_lengths: jax.Array,
    keys: jax.Array,
    eos_mask: jax.Array,
    max_new: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    mode: SamplingMode,
    placement: Placement,
) -> DecodeState:
    """Starts M requests: request m goes to row slots[m] (slots >= R: filler, ignored) with prompt
    source[m] of the prefill (prefix [L, G, K, P, H], logits [G, V]) of length prompt_lengths[m] and
    sample key keys[m] [2]; its first token is sampled here."""
    with placement.context():
        def put(buffer: jax.Array, new: jax.Array) -> jax.Array:  # [1, R, K, S, H] <- [1, G, K, P, H]
            return buffer.at[:, slots, :, : new.shape[3]].set(new[:, source], mode="drop")

        prefix = _per_layer(prefix)
        cache = {name: tuple(KVCache(put(c.k, p.k), put(c.v, p.v)) for c, p in zip(layers, prefix[name]))
                 for name, layers in state.cache.items()}
        zero = jnp.zeros_like(slots)
        token, logp, top_ids, top_logp = sample_tokens(prefix_logits[source], keys, zero, temperature, top_p, mode)
        done = eos_mask[token] | (max_new <= 1)
        return state._replace(
            cache=_constrain_cache(cache),
            tokens=state.tokens.at[slots, 0].set(token, mode="drop"),
            logprobs=state.logprobs.at[slots, 0].set(logp, mode="drop"),
            top_ids=state.top_ids.at[slots, 0].set(top_ids, mode="drop"),
            top_logprobs=state.top_logprobs.at[slots, 0].set(top_logp, mode="drop"),
            steps=state.steps.at[slots].set(1, mode="drop"),
            last_token=state.last_token.at[slots].set(token, mode="drop"),
            position=state.position.at[slots].set(prompt_lengths, mode="drop"),
            done=state.done.at[slots].set(done, mode="drop"),
            keys=state.keys.at[slots].set(keys, mode="drop"),
        )


def _write_at(buffer: jax.Array, at: jax.Array, values: jax.Array) -> jax.Array:
    """buffer [R, N, ...] with values[r] written at buffer[r, at[r]] (at >= N dropped), a scatter batched
    over rows like `models.layers.write_slots` (no collective when rows are sharded)."""
    return jax.vmap(lambda row, i, value: row.at[i].set(value, mode="drop"))(buffer, at, values)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "window", "placement"), donate_argnames=("state",))
def _decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: DecodeState,
    max_steps: jax.Array,
    done_target: jax.Array,
    eos_mask: jax.Array,
    max_new: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    mode: SamplingMode,
    window: int,
    placement: Placement,
) -> DecodeState:
    """Decodes all unfinished rows, one token per step, for `max_steps` steps or until `done_target`
    rows are done (one device loop, no host round trips). Attention reads cache slots [0, window):
    every unfinished row's position must stay below `window` for `max_steps` steps.

    (graphdef, params) is the model with its layers unrolled (`unrolled`: per-layer weights, cut from
    the stacked ones once per `generate` call, `_Run`), so that each step reads every layer's weights
    in place; the loop carries one cache buffer per layer holding slots [0, window) only
    (`_layer_windows`, written back after the loop): each step reads and writes every layer's buffer
    in place. The parameters ride in the loop carry unchanged: NNX modules must be built from values
    of the trace they run in, and XLA passes loop-invariant carries through without copies.
    """
    budget = state.tokens.shape[1]
    cache, state = state.cache, state._replace(cache={})
    Loop = tuple[nnx.State, DecodeState, dict[str, tuple[KVCache, ...]], jax.Array]

    def keep_going(loop: Loop) -> jax.Array:
        _, s, _, i = loop
        return (i < max_steps) & (jnp.sum(s.done) < done_target)

    def one_token(loop: Loop) -> Loop:
        params, s, layers, i = loop
        model = nnx.merge(graphdef, params)
        active = ~s.done
        slot = jnp.where(active, s.position, window)  # finished rows write nothing (slots >= window are dropped)
        hidden, layers = model.decode(s.last_token[:, None], slot[:, None], layers, window)
        token, logp, top_ids, top_logp = sample_tokens(model.logits(hidden)[:, 0], s.keys, s.steps, temperature, top_p, mode)
        at = jnp.where(active, s.steps, budget)
        steps = s.steps + active
        return params, s._replace(
            tokens=_write_at(s.tokens, at, token),
            logprobs=_write_at(s.logprobs, at, logp),
            top_ids=_write_at(s.top_ids, at, top_ids),
            top_logprobs=_write_at(s.top_logprobs, at, top_logp),
            steps=steps,
            last_token=jnp.where(active, token, s.last_token),
            position=s.position + active,
            done=s.done | (active & (eos_mask[token] | (steps >= max_new))),
            iterations=s.iterations + 1,
        ), layers, i + 1

    with placement.context():
        loop = (params, state, _layer_windows(cache, window), jnp.zeros((), jnp.int32))
        _, state, layers, _ = jax.lax.while_loop(keep_going, one_token, loop)
        return state._replace(cache=_write_windows(cache, layers))


@functools.partial(jax.jit, static_argnames=("placement",))
def _take_rows(state: DecodeState, rows: jax.Array, valid: jax.Array, *, placement: Placement) -> DecodeState:
    """The state of R' rows whose row i is row rows[i] of `state` (of R rows), empty and done where
    valid[i] is False."""
    with placement.context():
        def take(x: jax.Array) -> jax.Array:
            return constrain(x[rows], ("batch",) + (None,) * (x.ndim - 1))

        per_row = {field: take(getattr(state, field)) for field in DecodeState._fields if field not in ("cache", "iterations")}
        per_row["done"] = per_row["done"] | ~valid
        cache = {name: tuple(KVCache(c.k[:, rows], c.v[:, rows]) for c in layers) for name, layers in state.cache.items()}
        return DecodeState(cache=_constrain_cache(cache), iterations=state.iterations, **per_row)


@functools.partial(jax.jit, static_argnames=("graphdef", "placement"))
def _score(
    graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, segment_ids: jax.Array, temperature: jax.Array, *,
    placement: Placement,
) -> jax.Array:
    """Full forward pass over tokens [B, T] (segment 0: padding) -> log-probability of each next token
    [B, T - 1] under log softmax(logits / temperature)."""
    with placement.context():
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids).logits[:, :-1] / temperature
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@jax.jit
def _request_keys(prompt_keys: jax.Array, samples: jax.Array) -> jax.Array:
    """prompt_keys [G, 2], samples [n] -> keys [G, n, 2]: fold_in(prompt key, sample index)."""
    return jax.vmap(lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(samples))(prompt_keys)


# ---- the sampler ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Request:
    prompt: int  # index into the call's prompts
    sample: int  # sample index within its prompt
    key: np.ndarray  # [2] uint32


@dataclasses.dataclass
class _Result:
    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class Sampler:
    """Generates continuations of prompts with a Decoder (dense or MoE); see the module docstring.

    model: the Decoder, already placed (e.g. `load_hf_checkpoint(..., mesh=mesh)`); mesh / rules:
      the mesh it lives on and the logical-axis rules (rows and KV cache are sharded by them).
    tokenizer: needed for string prompts, texts and stop strings; its EOS id(s) end a sequence
      (`eos_ids` if it has them, else `eos_id`).
    max_len: longest prompt + generation (default the model's max_seq_len).
    add_bos: prepend BOS to string prompts (default: the tokenizer's `add_bos` if it has one, else
      whether it has a BOS id). Token-id prompts are used as given.
    max_rows: rows decoded at once (requests beyond it wait for finished rows: continuous batching).
    decode_chunk: most decode steps per device loop (between refills and window changes).
    share_prefill: prefill a prompt once for all its samples (False: once per sample).
    drain_rows: the drain tail (no request pending) moves the live rows to a batch of half the rows
      or fewer whenever they fit, down to this many rows (0: never), so finished rows stop costing.
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
        max_rows: int = 256,
        decode_chunk: int = 32,
        share_prefill: bool = True,
        drain_rows: int = 16,
    ):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_len = max_len or model.cfg.max_seq_len
        self.mesh, self.rules = mesh, tuple(rules or DEFAULT_RULES)
        self.placement = Placement(mesh, self.rules if mesh is not None else ())
        self.cache_dtype = cache_dtype or model.cfg.dtype
        self.min_bucket, self.stop_check_interval = min_bucket, stop_check_interval
        self.max_rows, self.decode_chunk, self.share_prefill = max_rows, decode_chunk, share_prefill
        self.drain_rows = drain_rows
        bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
        self.add_bos = (getattr(tokenizer, "add_bos", bos is not None) if add_bos is None else add_bos) and bos is not None
        self.eos_ids: tuple[int, ...] = ()
        if tokenizer is not None:
            self.eos_ids = tuple(getattr(tokenizer, "eos_ids", None) or (() if tokenizer.eos_id is None else (tokenizer.eos_id,)))
        self.pad_id = _pad_id(tokenizer)

    # -- parameters

    def set_params(self, params: nnx.State | nnx.Module) -> None:
        """Samples with `params` from now on (see `generate`'s `params`)."""
        self.state = self._params(params)

    def _params(self, params: nnx.State | nnx.Module | None) -> nnx.State:
        if params is None:
            return self.state
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        def signature(state: nnx.State) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
            return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]

        if signature(params) != signature(self.state):
            raise ValueError("params: the state's structure, shapes or dtypes differ from the sampler model's")
        return params

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

    def _rows(self, n: int, limit: int) -> int:
        """n rounded up to a power of two (at most `limit`'s) and a multiple of the batch shards."""
        multiple = self._batch_multiple()
        return -(-min(bucket(n, 1), bucket(limit, 1)) // multiple) * multiple

    def _put(self, array: np.ndarray, axes: tuple[str | None, ...]) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, logical_sharding(axes, self.mesh, self.rules, array.shape))

    def _prompt_keys(self, seed: int | Sequence[int], count: int) -> jax.Array:
        if isinstance(seed, (int, np.integer)):
            return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(int(seed)), jnp.arange(count))
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise ValueError(f"seed: got {len(seeds)} seeds for {count} prompts")
        return jnp.stack([jax.random.PRNGKey(s) for s in seeds])

    # -- generation

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        seed: int | Sequence[int] = 0,
        params: nnx.State | nnx.Module | None = None,
        logprobs_top_k: int = 0,
        max_rows: int | None = None,
    ) -> SampleOutput:
        """`n` continuations of every prompt, each up to `max_new_tokens` tokens (see `SampleOutput`
        and the module docstring).

        temperature 0 is greedy decoding. top_k 0 and top_p 1 disable those truncations. stop:
        strings that end a sequence (the text is cut before them); stop_token_ids: ids that end a
        sequence like EOS. seed: one int, or one per prompt. params: the weights to sample with.
        logprobs_top_k: also return the k most likely tokens' log-probabilities. max_rows: overrides
        the sampler's.
        """
        if max_new_tokens < 1 or n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {max_new_tokens}, {n}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or logprobs_top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        params = self._params(params)
        eos = sorted(set(self.eos_ids) | {int(t) for t in stop_token_ids})
        prompts_ids = self.encode_prompts(prompts)
        longest = max(len(p) for p in prompts_ids)
        if longest + max_new_tokens > self.max_len:
            raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_len={self.max_len}")
        prompt_len = min(bucket(longest, self.min_bucket), self.max_len - max_new_tokens)
        budget = min(bucket(max_new_tokens, self.min_bucket), self.max_len - prompt_len)
        rows = self._rows(len(prompts_ids) * n, max_rows or self.max_rows)
        mode = SamplingMode(greedy=temperature == 0, top_k=min(top_k, self.cfg.vocab_size), top_p=top_p < 1,
                            logprobs_top_k=min(logprobs_top_k, self.cfg.vocab_size))
        eos_mask = np.zeros((self.cfg.vocab_size,), bool)
        eos_mask[[t for t in eos if 0 <= t < self.cfg.vocab_size]] = True
        keys = np.asarray(_request_keys(self._prompt_keys(seed, len(prompts_ids)), jnp.arange(n)))
        run = _Run(
            self, params, prompts_ids, [_Request(g, j, keys[g, j]) for g in range(len(prompts_ids)) for j in range(n)],
            rows=rows, prompt_len=prompt_len, budget=budget, mode=mode, stop=tuple(stop),
            scalars=dict(eos_mask=jnp.asarray(eos_mask), max_new=jnp.int32(max_new_tokens),
                         temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p)),
        )
        results = run.loop()
        return self._finish(prompts_ids, run.requests, results, set(eos), stop, mode)._replace(timing=run.timing)

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        params: nnx.State | nnx.Module | None = None,
    ) -> list[np.ndarray]:
        """Log-probabilities [len(completions[i])] of each completion's tokens after its prompt under
        log softmax(logits / temperature), from one full forward pass of the model (what the learner
        computes), batched and padded to buckets."""
        params = self._params(params)
        sequences = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
        length = bucket(max(map(len, sequences)), self.min_bucket)
        batch = self._rows(len(sequences), len(sequences))
        tokens = np.full((batch, length), self.pad_id, np.int32)
        segments = np.zeros((batch, length), np.int32)
        for row, sequence in enumerate(sequences):
            tokens[row, : len(sequence)], segments[row, : len(sequence)] = sequence, 1
        logp = np.asarray(_score(self.graphdef, params, self._put(tokens, ("batch", None)), self._put(segments, ("batch", None)),
                                 jnp.float32(temperature), placement=self.placement))
        return [logp[row, len(p) - 1 : len(s) - 1].astype(np.float32) for row, (p, s) in enumerate(zip(prompts, sequences))]

    # -- outputs

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
        requests: list[_Request],
        results: list[_Result],
        eos: set[int],
        stop: Sequence[str],
        mode: SamplingMode,
    ) -> SampleOutput:
        out_tokens, out_logprobs, texts, reasons, top_ids, top_logprobs = [], [], [], [], [], []
        for request, result in zip(requests, results):
            prompt = prompts[request.prompt]
            generated = result.tokens.tolist()
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
            out_logprobs.append(result.logprobs[: len(generated)].astype(np.float32))
            top_ids.append(result.top_ids[: len(generated)])
            top_logprobs.append(result.top_logprobs[: len(generated)])
            texts.append(text)
            reasons.append(reason)
        return SampleOutput(
            tokens=out_tokens,
            texts=texts if self.tokenizer is not None else None,
            logprobs=out_logprobs,
            logprob_sums=np.array([lp.sum() for lp in out_logprobs], np.float32),
            lengths=np.array([len(t) for t in out_tokens], np.int32),
            finish_reasons=reasons,
            prompt_tokens=[prompts[r.prompt] for r in requests],
            timing={},
            prompt_index=np.array([r.prompt for r in requests], np.int32),
            sample_index=np.array([r.sample for r in requests], np.int32),
            top_ids=top_ids if mode.logprobs_top_k else None,
            top_logprobs=top_logprobs if mode.logprobs_top_k else None,
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


class _Run:
    """One `generate` call's host loop: refill free rows with pending requests, decode a chunk, read
    back the rows that finished (and check stop strings), until every request has its result."""

    def __init__(
        self, sampler: Sampler, params: nnx.State, prompts: list[list[int]], requests: list[_Request], *, rows: int,
        prompt_len: int, budget: int, mode: SamplingMode, stop: tuple[str, ...], scalars: dict[str, jax.Array],
    ):
        self.s, self.params, self.prompts, self.requests = sampler, params, prompts, requests
        self.rows, self.prompt_len, self.budget, self.mode, self.stop = rows, prompt_len, budget, mode, stop
        self.scalars = scalars
        self.cache_len = prompt_len + budget
        self.timing = dict(prefill_seconds=0.0, decode_seconds=0.0, prompt_tokens=0.0, generated_tokens=0.0,
                           decode_steps=0.0, rows=float(rows), row_steps=0.0, shrinks=0.0)
        self.decode_graphdef, self.decode_params = sampler.graphdef, params  # the unrolled model `_decode` runs
        if sampler.cfg.scan_layers:  # cut once per call (counted as decode time)
            start = time.perf_counter()
            self.decode_graphdef = _unrolled_twin(sampler.cfg)[0]
            self.decode_params = jax.block_until_ready(_cut_layers(sampler.graphdef, params, placement=sampler.placement))
            self.timing["decode_seconds"] += time.perf_counter() - start

    def loop(self) -> list[_Result]:
        s = self.s
        state = _init_state(s.graphdef, self.params, rows=self.rows, cache_len=self.cache_len, budget=self.budget,
                            cache_dtype=s.cache_dtype, top_k=self.mode.logprobs_top_k, placement=s.placement)
        pending = collections.deque(range(len(self.requests)))
        row_request = [-1] * self.rows  # request decoded in each row, -1: free
        row_position = np.zeros(self.rows, np.int64)  # host bound on each row's next position
        results: list[_Result | None] = [None] * len(self.requests)
        chunk = min(s.decode_chunk, s.stop_check_interval) if self.stop else s.decode_chunk
        while pending or any(r >= 0 for r in row_request):
            free = [row for row, r in enumerate(row_request) if r < 0]
            if pending and free:
                start = time.perf_counter()
                taken = [pending.popleft() for _ in range(min(len(free), len(pending)))]
                state = self._insert(state, list(zip(free, taken)))
                for row, r in zip(free, taken):
                    row_request[row], row_position[row] = r, len(self.prompts[self.requests[r].prompt])
                jax.block_until_ready(state.done)
                self.timing["prefill_seconds"] += time.perf_counter() - start
            start = time.perf_counter()
            busy = [row for row, r in enumerate(row_request) if r >= 0]
            window = window_bucket(int(row_position[busy].max()) + chunk, s.min_bucket, self.cache_len)
            if pending:  # refill once an eighth of the rows are free
                target = min(self.rows, self.rows - len(busy) + max(1, self.rows // 8))
            else:  # the drain tail: shrink the batch once half of it is free, if it can shrink
                target = self.rows - self.rows // 2 if self._drain_rows(self.rows // 2) < self.rows else self.rows
            state = _decode(self.decode_graphdef, self.decode_params, state, jnp.int32(chunk), jnp.int32(target), **self.scalars,
                            mode=self.mode, window=window, placement=s.placement)
            done, steps, iterations = jax.device_get((state.done, state.steps, state.iterations))
            self.timing["row_steps"] += float(self.rows * (iterations - self.timing["decode_steps"]))
            self.timing["decode_steps"] = float(iterations)
            self.timing["decode_seconds"] += time.perf_counter() - start
            for row in busy:
                row_position[row] = len(self.prompts[self.requests[row_request[row]].prompt]) + steps[row]
            stopped = self._stop_strings(state, row_request, done, steps) if self.stop else set()
            if stopped:
                done = done.copy()
                done[list(stopped)] = True
                state = state._replace(done=s._put(done, ("batch",)))
            finished = [row for row in busy if done[row]]
            if finished:
                tokens, logprobs, top_ids, top_logprobs = jax.device_get(
                    (state.tokens, state.logprobs, state.top_ids, state.top_logprobs))
                for row in finished:
                    n = steps[row]
                    results[row_request[row]] = _Result(tokens[row, :n], logprobs[row, :n], top_ids[row, :n],
                                                        top_logprobs[row, :n])
                    row_request[row] = -1
            live = [row for row, r in enumerate(row_request) if r >= 0]
            if not pending and live and self._drain_rows(len(live)) < self.rows:
                state, row_request, row_position = self._shrink(state, live, row_request, row_position)
        self.timing["generated_tokens"] = float(sum(len(r.tokens) for r in results if r is not None))
        return [r for r in results if r is not None]

    def _drain_rows(self, live: int) -> int:
        """The rows to decode `live` rows with once no request is pending: a bucket of at most half the
        current rows that holds them (at least `drain_rows`), else the current rows."""
        s = self.s
        rows = s._rows(max(live, s.drain_rows), self.rows)
        return rows if s.drain_rows and rows <= self.rows // 2 else self.rows

    def _shrink(
        self, state: DecodeState, live: list[int], row_request: list[int], row_position: np.ndarray
    ) -> tuple[DecodeState, list[int], np.ndarray]:
        """Moves the `live` rows to the first rows of a smaller batch (`_drain_rows`)."""
        start = time.perf_counter()
        rows = self._drain_rows(len(live))
        take = np.zeros((rows,), np.int32)
        take[: len(live)] = live
        valid = np.arange(rows) < len(live)
        state = _take_rows(state, self.s._put(take, ("batch",)), self.s._put(valid, ("batch",)), placement=self.s.placement)
        self.rows = rows
        jax.block_until_ready(state.done)
        self.timing["shrinks"] += 1
        self.timing["decode_seconds"] += time.perf_counter() - start
        return state, [row_request[row] for row in live] + [-1] * (rows - len(live)), row_position[take]

    def _insert(self, state: DecodeState, assignments: list[tuple[int, int]]) -> DecodeState:
        """Prefills the prompts of `assignments` (row, request) once each (or once per request without
        `share_prefill`) and starts the requests in their rows."""
        s = self.s
        if s.share_prefill:
            prompt_ids = list(dict.fromkeys(self.requests[r].prompt for _, r in assignments))
            source = [prompt_ids.index(self.requests[r].prompt) for _, r in assignments]
        else:
            prompt_ids = [self.requests[r].prompt for _, r in assignments]
            source = list(range(len(assignments)))
        count = s._rows(len(prompt_ids), max(len(prompt_ids), 1))
        tokens = np.full((count, self.prompt_len), s.pad_id, np.int32)
        lengths = np.ones((count,), np.int32)
        for i, g in enumerate(prompt_ids):
            prompt = self.prompts[g]
            tokens[i, : len(prompt)], lengths[i] = prompt, len(prompt)
        self.timing["prompt_tokens"] += float(lengths[: len(prompt_ids)].sum())
        prefix, logits = _prefill(s.graphdef, self.params, s._put(tokens, ("batch", None)), s._put(lengths, ("batch",)),
                                  cache_dtype=s.cache_dtype, placement=s.placement)
        m = bucket(len(assignments), 1)
        slots = np.full((m,), self.rows, np.int32)  # filler entries point past the last row: dropped
        sources, prompt_lengths, keys = np.zeros((m,), np.int32), np.zeros((m,), np.int32), np.zeros((m, 2), np.uint32)
        for i, ((row, r), src) in enumerate(zip(assignments, source)):
            request = self.requests[r]
            slots[i], sources[i], keys[i] = row, src, request.key
            prompt_lengths[i] = len(self.prompts[request.prompt])
        return _insert(state, prefix, logits, jnp.asarray(slots), jnp.asarray(sources), jnp.asarray(prompt_lengths),
                       jnp.asarray(keys), **self.scalars, mode=self.mode, placement=s.placement)

    def _stop_strings(self, state: DecodeState, row_request: list[int], done: np.ndarray, steps: np.ndarray) -> set[int]:
        """Rows still running whose text so far contains a stop string."""
        running = [row for row, r in enumerate(row_request) if r >= 0 and not done[row]]
        if not running:
            return set()
        tokens = jax.device_get(state.tokens)
        s = self.s
        return {row for row in running
                if _find_stop(s._text(self.prompts[self.requests[row_request[row]].prompt], tokens[row, : steps[row]]),
                              self.stop) is not None}


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

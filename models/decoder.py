"""The decoder: embed -> stacks of blocks -> norm -> LM head.

Every layer has a `LayerSpec` (its sliding window, dense or MoE feed-forward; `layer_specs`). The
layers are cut into consecutive segments, each one `pattern` of specs repeated (`plan_stacks`), and
each segment is a `LayerStack`; with `scan_layers` the parameters of each pattern position are stacked
along a leading "layers" axis and the stack runs as one `nnx.scan` over the repeats, so XLA compiles
one pattern body however deep the model is. A uniform model is one stack ("dense"); a model with MoE
layers after a dense prefix two ("dense", "moe"); Gemma 2's alternating sliding and global layers one
stack of a two-layer pattern; Gemma 3's five sliding to one global a six-layer pattern plus the
remainder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, Attention, KVCache, LayerCache, dtype_of, make_norm, normal, param
from models.lora import add_adapters
from models.mla import MultiHeadLatentAttention, mla_kv_cache, mla_layer_cache
from models.sharding import constrain

Aux = dict[str, jax.Array]

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerSpec(NamedTuple):
    """What distinguishes one layer from another: its sliding window (0: full attention) and whether
    its feed-forward is the MoE layer. Layers with equal specs have equal parameter shapes."""

    window: int
    moe: bool


def layer_specs(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec(cfg.layer_window(i), cfg.is_moe_layer(i)) for i in range(cfg.n_layers))


class StackPlan(NamedTuple):
    """Layers [first_layer, first_layer + len(pattern) * repeats): `pattern` repeated `repeats` times."""

    name: str
    first_layer: int
    pattern: tuple[LayerSpec, ...]
    repeats: int

    @property
    def n_layers(self) -> int:
        return len(self.pattern) * self.repeats

    def layer(self, repeat: int, position: int) -> int:
        """The model layer at `position` of the pattern's `repeat`-th copy."""
        return self.first_layer + repeat * len(self.pattern) + position


def _segments(specs: Sequence[LayerSpec]) -> list[tuple[int, int, int]]:
    """(start, period, repeats) covering `specs` in order: from each start, the period that repeats
    (at least twice) over the most layers, the shortest such; a single layer when none repeats."""
    segments, start, n = [], 0, len(specs)
    while start < n:
        best = (1, 1)
        for period in range(1, (n - start) // 2 + 1):
            repeats = 1
            while start + (repeats + 1) * period <= n and all(
                specs[start + repeats * period + j] == specs[start + j] for j in range(period)
            ):
                repeats += 1
            if repeats > 1 and period * repeats > best[0] * best[1]:
                best = (period, repeats)
        segments.append((start, *best))
        start += best[0] * best[1]
    return segments


def plan_stacks(cfg: ModelConfig) -> list[StackPlan]:
    """The decoder's stacks, in layer order. Names: "dense" / "moe" by feed-forward, with "_sliding" /
    "_full" when the model's layers differ in window, joined by "-" for a pattern of several layers
    (e.g. "dense_sliding-dense_full"); a repeated name gets "_2", "_3", ..."""
    specs = layer_specs(cfg)
    mixed_windows = len({s.window for s in specs}) > 1

    def kind(spec: LayerSpec) -> str:
        ffn = "moe" if spec.moe else "dense"
        return f"{ffn}_{'sliding' if spec.window else 'full'}" if mixed_windows else ffn

    plans, seen = [], {}
    for start, period, repeats in _segments(specs):
        pattern = tuple(specs[start:start + period])
        name = "-".join(kind(s) for s in pattern)
        seen[name] = seen.get(name, 0) + 1
        plans.append(StackPlan(name if seen[name] == 1 else f"{name}_{seen[name]}", start, pattern, repeats))
    return plans


def make_attention(cfg: ModelConfig, window: int, rngs: nnx.Rngs) -> nnx.Module:
    """Grouped-query attention, or multi-head latent attention when `cfg.mla` is set; both map
    (x [B, T, D], positions, segment ids, cache) -> ([B, T, D], cache) and have the `decode` path."""
    if cfg.mla is not None:
        return MultiHeadLatentAttention(cfg, window=window, rngs=rngs)
    return Attention(cfg, window=window, rngs=rngs)


def empty_layer_cache(cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> LayerCache:
    """One layer's empty `LayerCache` (MLA: the latent and RoPE key, `models.mla`)."""
    if cfg.mla is not None:
        return mla_layer_cache(cfg.mla, batch, length, dtype)
    return LayerCache.empty(batch, length, cfg, dtype)


def empty_kv_cache(cfg: ModelConfig, layers: int, batch: int, length: int, dtype: jnp.dtype) -> KVCache:
    """An empty slot cache of `layers` layers (MLA: the latent and RoPE key, `models.mla`)."""
    if cfg.mla is not None:
        return mla_kv_cache(cfg.mla, layers, batch, length, dtype)
    return KVCache.empty(layers, batch, length, cfg, dtype)


def make_feed_forward(cfg: ModelConfig, moe: bool, rngs: nnx.Rngs) -> nnx.Module:
    """A dense MLP, or the MoE layer. Both map x [B, T, D] -> (y [B, T, D], aux metrics)."""
    if moe:
        from models.moe import MoEFeedForward  # noqa: PLC0415  (moe imports layers; avoid a cycle)

        return MoEFeedForward(cfg, rngs=rngs)
    return DenseFeedForward(cfg, rngs=rngs)


class DenseFeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.mlp = MLP(cfg, cfg.d_ff, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Aux]:
        return self.mlp(x), {}


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)). With `cfg.post_norms`
    (Gemma 2/3) each output is normalised again before the residual add: x + norm(attn(norm(x)))."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, cfg.d_model, rngs)
        self.attn = make_attention(cfg, spec.window, rngs)
        self.ffn_norm = make_norm(cfg, cfg.d_model, rngs)
        self.ffn = make_feed_forward(cfg, spec.moe, rngs)
        if cfg.post_norms:
            self.post_attn_norm = make_norm(cfg, cfg.d_model, rngs)
            self.post_ffn_norm = make_norm(cfg, cfg.d_model, rngs)

    def _post_norm(self, name: str, y: jax.Array) -> jax.Array:
        return getattr(self, name)(y) if hasattr(self, name) else y

    def _feed_forward(self, x: jax.Array) -> tuple[jax.Array, Aux]:
        """The second residual branch: x [B, T, D] -> (x + ffn(norm(x)), aux)."""
        y, aux = self.ffn(self.ffn_norm(x))
        return x + self._post_norm("post_ffn_norm", y), aux

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, cache: LayerCache | None
    ) -> tuple[jax.Array, Aux, LayerCache | None]:
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
        x, aux = self._feed_forward(x + self._post_norm("post_attn_norm", h))
        return x, aux, cache

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache, layer: jax.Array | int, window: int
    ) -> tuple[jax.Array, KVCache]:
        """The sampling path (`Attention.decode`): x [B, T, D] -> (x, cache with layer `layer` written)."""
        h, cache = self.attn.decode(self.attn_norm(x), positions, cache, layer, window)
        x, _ = self._feed_forward(x + self._post_norm("post_attn_norm", h))
        return x, cache


StackCache = LayerCache | tuple[LayerCache, ...]


class LayerStack(nnx.Module):
    """The layers of one `StackPlan`: its pattern of blocks, repeated, scanned or unrolled.

    Parameters: a one-layer pattern keeps its blocks in `blocks` (stacked on a leading "layers" axis
    when scanned, else a list); a longer pattern has one such entry per position, `blocks[j]`. A
    scanned stack runs one `nnx.scan` step per repeat, the pattern's blocks unrolled inside it.
    Aux outputs get a leading [repeats] axis, and "<j>/" in front of their names for a longer pattern.
    The `LayerCache` of a stack is one cache [repeats, ...] per pattern position (a tuple for a longer
    pattern); its `KVCache` holds every layer of the stack in order, [n_layers, ...].
    """

    def __init__(self, cfg: ModelConfig, plan: StackPlan, *, rngs: nnx.Rngs):
        self.cfg, self.plan = cfg, plan
        self.n = plan.n_layers
        positions = [self._make_position(cfg, spec, plan.repeats, rngs) for spec in plan.pattern]
        self.blocks = positions[0] if len(positions) == 1 else nnx.List(positions)

    @staticmethod
    def _make_position(cfg: ModelConfig, spec: LayerSpec, repeats: int, rngs: nnx.Rngs) -> nnx.Module:
        if cfg.scan_layers:

            @nnx.split_rngs(splits=repeats)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, spec, rngs=rngs)

            return make_blocks(rngs)
        return nnx.List([Block(cfg, spec, rngs=rngs) for _ in range(repeats)])

    @property
    def _period(self) -> int:
        return len(self.plan.pattern)

    def _positions(self) -> tuple[nnx.Module, ...]:
        return (self.blocks,) if self._period == 1 else tuple(self.blocks)

    def _split(self, per_position: tuple[Any, ...]) -> Any:
        return per_position[0] if self._period == 1 else per_position

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, cache: StackCache | None
    ) -> tuple[jax.Array, Aux, StackCache | None]:
        """x [B, T, D], positions/segment_ids [B, T] (segment_ids None: one document per row) -> (x, aux
        with a leading [repeats] axis, cache)."""
        period = self._period

        def body(blocks: tuple[Block, ...], x: jax.Array, caches: tuple[LayerCache | None, ...]) -> tuple[jax.Array, tuple[Aux, Any]]:
            aux: Aux = {}
            new_caches = []
            for j, (block, cache) in enumerate(zip(blocks, caches)):
                x, block_aux, cache = block(x, positions, segment_ids, cache)
                aux.update({(f"{j}/{k}" if period > 1 else k): v for k, v in block_aux.items()})
                new_caches.append(cache)
            return x, (aux, tuple(new_caches))

        if self.cfg.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)

        caches = (None,) * period if cache is None else (cache,) if period == 1 else tuple(cache)
        if self.cfg.scan_layers:
            scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            x, (aux, new_caches) = scan(self._positions(), x, caches)
            return x, aux, None if cache is None else self._split(new_caches)

        per_repeat = []
        for i in range(self.plan.repeats):
            blocks = tuple(position[i] for position in self._positions())
            layer_caches = tuple(None if c is None else jax.tree.map(lambda a, i=i: a[i], c) for c in caches)
            x, out = body(blocks, x, layer_caches)
            per_repeat.append(out)
        aux, new_caches = jax.tree.map(lambda *xs: jnp.stack(xs), *per_repeat)
        return x, aux, None if cache is None else self._split(new_caches)

    def empty_cache(self, batch: int, length: int, dtype: jnp.dtype) -> StackCache:
        one = empty_layer_cache(self.cfg, batch, length, dtype)
        stacked = jax.tree.map(lambda c: jnp.broadcast_to(c, (self.plan.repeats, *c.shape)), one)
        return self._split((stacked,) * self._period)

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache | tuple[KVCache, ...], window: int
    ) -> tuple[jax.Array, KVCache | tuple[KVCache, ...]]:
        """The sampling path: x [B, T, D], cache k/v [n, B, K, S, H] -> (x, cache).

        Scanned stacks carry the whole cache through the layer scan and each layer writes its slots
        in place (a scatter into the carried buffer), instead of emitting a new stacked cache as scan
        outputs; with the buffer donated to the surrounding program, no step copies the cache.
        Unrolled stacks also take one KVCache [1, B, K, S, H] per layer (a tuple, returned as one):
        each layer then reads its own buffer whole, where a layer's window of a stacked buffer is a
        slice that XLA:CPU copies (the sampler's decode loop; results/sampler_profile).
        """
        period = self._period
        if self.cfg.scan_layers:

            def body(blocks: tuple[Block, ...], carry: tuple[jax.Array, KVCache, jax.Array]) -> tuple[jax.Array, KVCache, jax.Array]:
                x, cache, first = carry
                for j, block in enumerate(blocks):
                    x, cache = block.decode(x, positions, cache, first + j, window)
                return x, cache, first + period

            scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            x, cache, _ = scan(self._positions(), (x, cache, jnp.zeros((), jnp.int32)))
            return x, cache
        split = not isinstance(cache, KVCache)
        caches = list(cache) if split else [cache]
        for i in range(self.plan.repeats):
            for j, position in enumerate(self._positions()):
                layer = i * period + j
                at = layer if split else 0
                x, caches[at] = position[i].decode(x, positions, caches[at], 0 if split else layer, window)
        return x, tuple(caches) if split else caches[0]


class DecoderOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    aux: Aux  # "<stack>/<name>" -> [n_layers_in_stack, ...] per-layer values (MoE losses, loads)
    cache: dict[str, StackCache] | None


class Decoder(nnx.Module):
    """Decoder-only transformer language model described by a `ModelConfig`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        self.stacks = nnx.Dict({plan.name: LayerStack(cfg, plan, rngs=rngs) for plan in plan_stacks(cfg)})
        self.final_norm = make_norm(cfg, cfg.d_model, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
        if cfg.mtp_depth:  # training-only heads, run by the loss (train/step.py); inference never calls them
            from models.mtp import MultiTokenPrediction  # noqa: PLC0415  (mtp builds decoder blocks; avoid a cycle)

            self.mtp = MultiTokenPrediction(cfg, rngs=rngs)
        if cfg.lora is not None:  # after the base weights, which are then the same as without LoRA
            add_adapters(self, cfg.lora, rngs)

    def ordered_stacks(self) -> list[tuple[str, LayerStack]]:
        """The stacks in layer order. Not `self.stacks`' order: `nnx.merge` rebuilds the dict with sorted
        keys, and pattern stack names need not sort in layer order."""
        return [(plan.name, self.stacks[plan.name]) for plan in plan_stacks(self.cfg)]

    def init_cache(self, batch: int, length: int, dtype: str | None = None) -> dict[str, StackCache]:
        """An empty KV cache of `length` slots per sequence for every layer."""
        dt = dtype_of(dtype or self.cfg.dtype)
        return {name: stack.empty_cache(batch, length, dt) for name, stack in self.stacks.items()}

    def init_kv_cache(self, batch: int, length: int, dtype: str | None = None) -> dict[str, KVCache]:
        """An empty slot cache (`KVCache`, for `decode`) of `length` slots per row, per stack."""
        dt = dtype_of(dtype or self.cfg.dtype)
        return {name: empty_kv_cache(self.cfg, stack.n, batch, length, dt) for name, stack in self.stacks.items()}

    def decode(
        self, tokens: jax.Array, positions: jax.Array, cache: dict[str, KVCache], window: int
    ) -> tuple[jax.Array, dict[str, KVCache]]:
        """The sampling path: tokens [B, T] at positions [B, T] (= their cache slots) -> (final-normed
        hidden states [B, T, D], the cache with their keys/values written). Queries attend over cache
        slots [0, window) up to their own position (`Attention.decode`); prefill is T = prompt length
        at positions 0..T-1, a decode step T = 1 at each row's own position."""
        x = self.embed_tokens(tokens)
        new_cache = {}
        for name, stack in self.ordered_stacks():
            x, new_cache[name] = stack.decode(x, positions, cache[name], window)
        return self.final_norm(x), new_cache

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, StackCache] | None = None,
    ) -> DecoderOutput:
        """tokens [B, T] int -> logits [B, T, V].

        positions [B, T]: position of each token within its document (default 0..T-1).
        segment_ids [B, T]: document number of each token in a packed row, 0 for padding (default 1).
        cache: from `init_cache`; the new tokens are written at its index and attend to all it holds.
        """
        x, aux, new_cache = self.hidden_states(tokens, positions, segment_ids, cache)
        return DecoderOutput(self.logits(x), aux, new_cache)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, StackCache] | None = None,
    ) -> tuple[jax.Array, Aux, dict[str, StackCache] | None]:
        """The final-normed hidden states [B, T, D] that `logits` maps to the vocabulary; arguments as
        `__call__`. Separate so that callers can take logits at a few positions only (sampling)."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed_tokens(tokens)
        aux: Aux = {}
        new_cache = {} if cache is not None else None
        for name, stack in self.ordered_stacks():
            x, stack_aux, stack_cache = stack(x, positions, segment_ids, None if cache is None else cache[name])
            aux.update({f"{name}/{k}": v for k, v in stack_aux.items()})
            if new_cache is not None:
                new_cache[name] = stack_cache
        return self.final_norm(x), aux, new_cache

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> embeddings [B, T, D] in the compute dtype, times sqrt(d_model) with
        `cfg.scale_embeddings` (the factor rounded to the compute dtype first, as Gemma does)."""
        dtype = dtype_of(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        if self.cfg.scale_embeddings:
            x = x * jnp.asarray(self.cfg.d_model**0.5, dtype)
        return constrain(x, ("batch", "activation_length", "activation_embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V]."""
        cfg = self.cfg
        weight = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]  # [D, V]
        logits = head_logits(x, weight.astype(x.dtype))
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        return constrain(logits, ("batch", "activation_length", "activation_vocab"))


@jax.custom_vjp
def head_logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [B, T, D] @ w [D, V] -> float32 logits [B, T, V], with its own backward pass.

    Autodiff's transposed product computes the weight gradient as a dot of the logits' gradient with x,
    and XLA:CPU then copies that [B*T, V] gradient, the largest array of a train step, into transposed
    layout. Contracting x and the gradient over their tokens directly needs no copy: the LM head and
    loss take 30% less CPU time on bench.train_step_vs_torch's reference shape (vocabulary 8192).
    """
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)


def _head_logits_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return head_logits(x, w), (x, w)


def _head_logits_bwd(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    dx = jnp.einsum("btv,dv->btd", grad, w, preferred_element_type=jnp.float32)
    tokens_x, tokens_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # [B*T, D], [B*T, V]
    dw = jnp.einsum("kd,kv->dv", tokens_x, tokens_grad, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def count_params(model: nnx.Module) -> int:
    """Number of parameters a built module actually holds."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

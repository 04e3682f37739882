"""The decoder: embed -> stacks of blocks -> norm -> LM head.

Blocks of one kind live in a `LayerStack`; with `scan_layers` their parameters are stacked along a
leading "layers" axis and the stack runs as one `nnx.scan`, so XLA compiles a single block body however
deep the model is. A model with MoE layers has two stacks: the first `moe.first_dense_layers` blocks
with dense MLPs, then the MoE blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import MLP, Attention, KVCache, LayerCache, dtype_of, make_norm, normal, param
from models.lora import add_adapters
from models.sharding import constrain

Aux = dict[str, jax.Array]

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


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
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, cfg.d_model, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = make_norm(cfg, cfg.d_model, rngs)
        self.ffn = make_feed_forward(cfg, moe, rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: LayerCache | None
    ) -> tuple[jax.Array, Aux, LayerCache | None]:
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
        x = x + h
        y, aux = self.ffn(self.ffn_norm(x))
        return x + y, aux, cache

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache, layer: jax.Array | int, window: int
    ) -> tuple[jax.Array, KVCache]:
        """The sampling path (`Attention.decode`): x [B, T, D] -> (x, cache with layer `layer` written)."""
        h, cache = self.attn.decode(self.attn_norm(x), positions, cache, layer, window)
        x = x + h
        y, _ = self.ffn(self.ffn_norm(x))
        return x + y, cache


class LayerStack(nnx.Module):
    """`n` blocks of one kind, scanned (parameters stacked on a leading "layers" axis) or unrolled."""

    def __init__(self, cfg: ModelConfig, n: int, *, moe: bool, rngs: nnx.Rngs):
        self.cfg, self.n = cfg, n
        if cfg.scan_layers:

            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, moe=moe, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, moe=moe, rngs=rngs) for _ in range(n)])

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: LayerCache | None
    ) -> tuple[jax.Array, Aux, LayerCache | None]:
        """x [B, T, D] -> (x, aux with a leading [n] layer axis, cache with a leading [n] axis)."""

        def body(block: Block, x: jax.Array, cache: LayerCache | None) -> tuple[jax.Array, tuple[Aux, Any]]:
            x, aux, cache = block(x, positions, segment_ids, cache)
            return x, (aux, cache)

        if self.cfg.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)

        if self.cfg.scan_layers:
            scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            x, (aux, cache) = scan(self.blocks, x, cache)
            return x, aux, cache

        per_layer = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
            x, out = body(block, x, layer_cache)
            per_layer.append(out)
        aux, cache = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else ({}, None)
        return x, aux, cache

    def decode(self, x: jax.Array, positions: jax.Array, cache: KVCache, window: int) -> tuple[jax.Array, KVCache]:
        """The sampling path: x [B, T, D], cache k/v [n, B, K, S, H] -> (x, cache).

        Scanned stacks carry the whole cache through the layer scan and each layer writes its slots
        in place (a scatter into the carried buffer), instead of emitting a new stacked cache as scan
        outputs; with the buffer donated to the surrounding program, no step copies the cache.
        """
        if self.cfg.scan_layers:

            def body(block: Block, carry: tuple[jax.Array, KVCache, jax.Array]) -> tuple[jax.Array, KVCache, jax.Array]:
                x, cache, layer = carry
                x, cache = block.decode(x, positions, cache, layer, window)
                return x, cache, layer + 1

            scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            x, cache, _ = scan(self.blocks, (x, cache, jnp.zeros((), jnp.int32)))
            return x, cache
        for layer, block in enumerate(self.blocks):
            x, cache = block.decode(x, positions, cache, layer, window)
        return x, cache


class DecoderOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    aux: Aux  # "<stack>/<name>" -> [n_layers_in_stack, ...] per-layer values (MoE losses, loads)
    cache: dict[str, LayerCache] | None


class Decoder(nnx.Module):
    """Decoder-only transformer language model described by a `ModelConfig`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        self.embed = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        self.stacks = nnx.Dict()
        if cfg.n_dense_layers:
            self.stacks["dense"] = LayerStack(cfg, cfg.n_dense_layers, moe=False, rngs=rngs)
        if cfg.n_moe_layers:
            self.stacks["moe"] = LayerStack(cfg, cfg.n_moe_layers, moe=True, rngs=rngs)
        self.final_norm = make_norm(cfg, cfg.d_model, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pdt)
        if cfg.lora is not None:  # after the base weights, which are then the same as without LoRA
            add_adapters(self, cfg.lora, rngs)

    def init_cache(self, batch: int, length: int, dtype: str | None = None) -> dict[str, LayerCache]:
        """An empty KV cache of `length` slots per sequence for every layer."""
        dt = dtype_of(dtype or self.cfg.dtype)
        return {
            name: jax.tree.map(lambda c, n=stack.n: jnp.broadcast_to(c, (n, *c.shape)), LayerCache.empty(batch, length, self.cfg, dt))
            for name, stack in self.stacks.items()
        }

    def init_kv_cache(self, batch: int, length: int, dtype: str | None = None) -> dict[str, KVCache]:
        """An empty slot cache (`KVCache`, for `decode`) of `length` slots per row, per stack."""
        dt = dtype_of(dtype or self.cfg.dtype)
        return {name: KVCache.empty(stack.n, batch, length, self.cfg, dt) for name, stack in self.stacks.items()}

    def decode(
        self, tokens: jax.Array, positions: jax.Array, cache: dict[str, KVCache], window: int
    ) -> tuple[jax.Array, dict[str, KVCache]]:
        """The sampling path: tokens [B, T] at positions [B, T] (= their cache slots) -> (final-normed
        hidden states [B, T, D], the cache with their keys/values written). Queries attend over cache
        slots [0, window) up to their own position (`Attention.decode`); prefill is T = prompt length
        at positions 0..T-1, a decode step T = 1 at each row's own position."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype_of(self.cfg.dtype))
        x = constrain(x, ("batch", "activation_length", "activation_embed"))
        new_cache = {}
        for name, stack in self.stacks.items():
            x, new_cache[name] = stack.decode(x, positions, cache[name], window)
        return self.final_norm(x), new_cache

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, LayerCache] | None = None,
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
        cache: dict[str, LayerCache] | None = None,
    ) -> tuple[jax.Array, Aux, dict[str, LayerCache] | None]:
        """The final-normed hidden states [B, T, D] that `logits` maps to the vocabulary; arguments as
        `__call__`. Separate so that callers can take logits at a few positions only (sampling)."""
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype_of(cfg.dtype))
        x = constrain(x, ("batch", "activation_length", "activation_embed"))

        aux: Aux = {}
        new_cache = {} if cache is not None else None
        for name, stack in self.stacks.items():
            x, stack_aux, stack_cache = stack(x, positions, segment_ids, None if cache is None else cache[name])
            aux.update({f"{name}/{k}": v for k, v in stack_aux.items()})
            if new_cache is not None:
                new_cache[name] = stack_cache
        return self.final_norm(x), aux, new_cache

    def logits(self, x: jax.Array) -> jax.Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V]."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(x.dtype), preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        return constrain(logits, ("batch", "activation_length", "activation_vocab"))


def count_params(model: nnx.Module) -> int:
    """Number of parameters a built module actually holds."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, sec. 2.1) and its compressed cache.

Keys and values come from one low-rank latent per token, c = RMSNorm(x W_dkv) [R], expanded per head
by W_ukv into a key part without position [C] and a value [V]; a RoPE key [P] shared by all heads is
projected from x beside it. Queries are [C + P] per head, through a low-rank bottleneck [Q] or not.
The cache holds only c and the RoPE key: R + P numbers per token and layer (576 for DeepSeek-V2/V3)
instead of 2 * N * H. Decoding never expands it: W_ukv's key half is absorbed into the queries
(q_nope W_uk^T scores against c directly) and its value half applied after the weighted sum.

Shape letters: B batch, T query length, S key length, D d_model, N heads, Q q_lora_rank, R kv_lora_rank,
C qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim, L layers of a stack.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention.mask import document_ids
from models.config import MLAConfig, ModelConfig
from models.layers import (
    AttentionMask,
    KVCache,
    LayerCache,
    RMSNorm,
    apply_rope,
    attention_kernel,
    dtype_of,
    normal,
    param,
    rope_frequencies,
    write_slots,
)
from models.lora import with_adapter
from models.sharding import constrain

# Logical names of the latent dims, as MaxText names them: a down-projection's output ("*_up_proj")
# stays whole (every head reads all of it), an up-projection's input is sharded like the model dim
# (configs/sharding_rules.py).


def mla_layer_cache(mla: MLAConfig, batch: int, length: int, dtype: jnp.dtype) -> LayerCache:
    """An empty `LayerCache` holding the latent as k [B, S, 1, R] and the RoPE key as v [B, S, 1, P]."""
    slots = jnp.zeros((batch, length), jnp.int32)
    return LayerCache(jnp.zeros((batch, length, 1, mla.kv_lora_rank), dtype),
                      jnp.zeros((batch, length, 1, mla.qk_rope_head_dim), dtype), slots, slots, jnp.zeros((), jnp.int32))


def mla_kv_cache(mla: MLAConfig, layers: int, batch: int, length: int, dtype: jnp.dtype) -> KVCache:
    """An empty slot cache: the latent as k [L, B, 1, S, R], the RoPE key as v [L, B, 1, S, P] (one
    "key/value head", so the sampler moves it like any other cache)."""
    return KVCache(jnp.zeros((layers, batch, 1, length, mla.kv_lora_rank), dtype),
                   jnp.zeros((layers, batch, 1, length, mla.qk_rope_head_dim), dtype))


class MultiHeadLatentAttention(nnx.Module):
    """MLA with the interface of `models.layers.Attention` (training path, `LayerCache` path, `decode`).

    Parameters (codelm layout, [in, out...]): q_proj [D, N, C + P] or q_a_proj [D, Q] + q_norm +
    q_b_proj [Q, N, C + P]; kv_a_proj [D, R + P]; kv_norm [R]; kv_b_proj [R, N, C + V]; o_proj [N, V, D].
    Scores are scaled by score_scale / sqrt(C + P); the RoPE cos/sin by rope_scaling.attention_factor when
    set (DeepSeek's YaRN). window: sliding window (0: full attention).
    """

    # kv_b_proj is left out: decoding folds it into the queries and outputs (no adapter path there).
    LORA_WEIGHTS = {"q_proj": (0, 1), "q_a_proj": (0, 1), "q_b_proj": (0, 1), "kv_a_proj": (0, 1), "o_proj": (0, 2)}

    def __init__(self, cfg: ModelConfig, *, window: int = 0, rngs: nnx.Rngs):
        assert cfg.mla is not None
        self.cfg, self.mla, self.window = cfg, cfg.mla, window
        m, d, n = cfg.mla, cfg.d_model, cfg.n_heads
        pdt = dtype_of(cfg.param_dtype)
        init = normal(cfg.init_std)
        if m.q_lora_rank:
            self.q_a_proj = param(rngs, init, (d, m.q_lora_rank), ("embed", "q_lora_up_proj"), pdt)
            self.q_norm = RMSNorm(m.q_lora_rank, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
            self.q_b_proj = param(rngs, init, (m.q_lora_rank, n, m.qk_head_dim), ("q_lora", "heads", "head_dim"), pdt)
        else:
            self.q_proj = param(rngs, init, (d, n, m.qk_head_dim), ("embed", "heads", "head_dim"), pdt)
        self.kv_a_proj = param(rngs, init, (d, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", "kv_lora_up_proj"), pdt)
        self.kv_norm = RMSNorm(m.kv_lora_rank, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.kv_b_proj = param(rngs, init, (m.kv_lora_rank, n, m.qk_nope_head_dim + m.v_head_dim),
                               ("kv_lora", "heads", "head_dim"), pdt)
        self.o_proj = param(rngs, normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), (n, m.v_head_dim, d),
                            ("heads", "head_dim", "embed"), pdt)

    def _linear(self, x: jax.Array, name: str, equation: str) -> jax.Array:
        y = jnp.einsum(equation, x, getattr(self, name)[...].astype(x.dtype))
        return with_adapter(self, name, x, y)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        scaling = self.cfg.rope_scaling
        inv_freq, scale = rope_frequencies(self.mla.qk_rope_head_dim, self.cfg.rope_theta, scaling)
        return apply_rope(x, positions, inv_freq, scaling.attention_factor or scale)

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (q_nope [B, T, N, C], q_rope [B, T, N, P] rotated)."""
        if self.mla.q_lora_rank:
            q = self._linear(self.q_norm(self._linear(x, "q_a_proj", "btd,dq->btq")), "q_b_proj", "btq,qnh->btnh")
        else:
            q = self._linear(x, "q_proj", "btd,dnh->btnh")
        q = constrain(q, ("batch", "activation_length", "activation_heads", None))
        c = self.mla.qk_nope_head_dim
        return q[..., :c], self._rope(q[..., c:], positions)

    def _latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (latent c [B, T, R] normed, RoPE key [B, T, P] rotated): what the cache holds."""
        kv = self._linear(x, "kv_a_proj", "btd,dr->btr")
        r = self.mla.kv_lora_rank
        return self.kv_norm(kv[..., :r]), self._rope(kv[..., None, r:], positions)[:, :, 0]

    def _up(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """kv_b_proj split into its key part W_uk [R, N, C] and value part W_uv [R, N, V]."""
        w = self.kv_b_proj[...].astype(dtype)
        return w[..., : self.mla.qk_nope_head_dim], w[..., self.mla.qk_nope_head_dim:]

    def _output(self, out: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """Attention output [B, T, N, V] -> [B, T, D]."""
        out = constrain(out, ("batch", "activation_length", "activation_heads", None))
        y = self._linear(out, "o_proj", "btnv,nvd->btd")
        return constrain(y.astype(dtype), ("batch", "activation_length", "activation_embed"))

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D], positions/segment_ids [B, T] (None: one document per row) -> ([B, T, D], cache or
        None); the cache (from `mla_layer_cache`) stores the latents, expanded to per-head keys and values here."""
        q_nope, q_rope = self._queries(x, positions)
        latent, k_rope = self._latents(x, positions)
        segment_ids, packed = document_ids(positions, segment_ids)
        if cache is not None:
            cache = cache.append(latent[:, :, None], k_rope[:, :, None], positions, segment_ids)
            latent, k_rope = cache.k[:, :, 0].astype(x.dtype), cache.v[:, :, 0].astype(x.dtype)
            mask = AttentionMask(positions, cache.positions, segment_ids, cache.segment_ids, self.window, packed=packed)
        else:
            mask = AttentionMask(positions, positions, segment_ids, segment_ids, self.window, causal=True, packed=packed)
        w_uk, w_uv = self._up(x.dtype)
        k_nope = jnp.einsum("bsr,rnc->bsnc", latent, w_uk)
        v = constrain(jnp.einsum("bsr,rnv->bsnv", latent, w_uv), ("batch", "activation_length", "activation_heads", None))
        b, s, n, _ = k_nope.shape
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (b, s, n, k_rope.shape[-1]))], axis=-1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        if self.mla.score_scale != 1.0:  # the kernels scale by 1 / sqrt(C + P) only
            q = q * jnp.asarray(self.mla.score_scale, q.dtype)
        k = constrain(k, ("batch", "activation_length", "activation_heads", None))
        return self._output(attention_kernel(self.cfg.attention_impl)(q, k, v, mask), x.dtype), cache

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache, layer: jax.Array | int, window: int
    ) -> tuple[jax.Array, KVCache]:
        """The sampling path over the compressed slot cache (`mla_kv_cache`), as `Attention.decode`:
        token t of row b writes its latent and RoPE key to slot positions[b, t] of layer `layer`, then
        the queries attend over slots [0, window). Scores are q_nope W_uk^T c + q_rope k_rope, the
        output (probs c) W_uv: per-head keys and values are never formed. Scores and softmax float32."""
        q_nope, q_rope = self._queries(x, positions)
        latent, k_rope = self._latents(x, positions)
        b = x.shape[0]
        write_c = write_slots(cache.k, layer, positions, latent[:, :, None])
        write_r = write_slots(cache.v, layer, positions, k_rope[:, :, None])

        def read(buffer: jax.Array) -> jax.Array:  # layer `layer`, slots [0, window): [B, W, R or P]
            start = (jnp.asarray(layer, jnp.int32), 0, 0, 0, 0)
            block = jax.lax.dynamic_slice(buffer, start, (1, b, 1, window, buffer.shape[-1]))[0, :, 0]
            return constrain(block.astype(x.dtype), ("batch", None, None))

        c_read = read(write_c)
        w_uk, w_uv = self._up(x.dtype)
        q_latent = jnp.einsum("btnc,rnc->btnr", q_nope, w_uk)
        scores = (jnp.einsum("btnr,bsr->bnts", q_latent, c_read, preferred_element_type=jnp.float32)
                  + jnp.einsum("btnp,bsp->bnts", q_rope, read(write_r), preferred_element_type=jnp.float32))
        slots = jnp.arange(window, dtype=positions.dtype)[None, None, :]
        mask = slots <= positions[:, :, None]  # [B, T, W]
        if self.window:
            mask &= positions[:, :, None] - slots < self.window
        scale = self.mla.score_scale / math.sqrt(self.mla.qk_head_dim)
        scores = jnp.where(mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("btnr,rnv->btnv", jnp.einsum("bnts,bsr->btnr", probs, c_read), w_uv)
        return self._output(out, x.dtype), KVCache(write_c, write_r)

"""Decoder building blocks: parameters with logical axes, norms, RoPE, attention, MLPs.

Shape letters: B batch, T query length, S key/value length, D d_model, N query heads, K key/value
heads, H head_dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import (  # noqa: F401  (the attention seam, re-exported where it used to live)
    ATTENTION_KERNELS,
    AttentionFn,
    AttentionMask,
    attention_kernel,
    attention_mask,
    available_attention_kernels,
    chunked_attention,
    register_attention_kernel,
    soft_cap,
)
from models.attention.mask import document_ids, grouped_sinks, softmax_with_sinks
from models.config import GATED_MLPS, ModelConfig, RopeScaling
from models.lora import with_adapter
from models.sharding import LogicalAxes, constrain

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: LogicalAxes, dtype: jnp.dtype) -> nnx.Param:
    """A parameter tagged with logical axis names (placed on a mesh by `models.sharding`)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


def normal(std: float) -> Initializer:
    return nnx.initializers.normal(stddev=std)


zeros: Initializer = nnx.initializers.zeros_init()
ones: Initializer = nnx.initializers.ones_init()


# ---- norms -----------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale), computed in float32 (Zhang & Sennrich 2019).

    offset: Gemma stores its scales as (scale - 1) and adds the 1 in float32 (offset 1.0), which keeps
    bfloat16 checkpoints exact; the scale starts at 1 - offset, so the product starts at 1.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs, offset: float = 0.0):
        self.eps, self.offset = eps, offset
        self.scale = param(rngs, nnx.initializers.constant(1.0 - offset), (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, computed in float32 (StarCoder2)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, dim: int, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    if cfg.norm == "rms":
        return RMSNorm(dim, cfg.norm_eps, param_dtype=dtype_of(cfg.param_dtype), rngs=rngs, offset=cfg.norm_scale_offset)
    return LayerNorm(dim, cfg.norm_eps, param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)


# ---- rotary position embeddings --------------------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[np.ndarray, float]:
    """Inverse frequencies [H/2] and the attention scaling applied to cos/sin, per RoPE variant.

    linear: frequencies / factor (equivalently positions / factor). llama3: low frequencies divided by
    `factor`, high ones kept, a smooth blend between (Llama 3.1). yarn: NTK-by-parts interpolation
    between extrapolated and interpolated frequencies with a ramp over [beta_slow, beta_fast]
    rotations (whole dimensions unless `truncate` is off), and cos/sin scaled by 0.1 * ln(factor) + 1
    (Peng et al. 2023, eq. 15-20).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind, factor = scaling.kind, scaling.factor
    if kind == "none":
        return inv_freq.astype(np.float32), 1.0
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32), 1.0
    if kind == "llama3":
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_medium, blended, out).astype(np.float32), 1.0
    if kind == "yarn":

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / max(high - low, 1e-3), 0, 1)
        extrapolation_weight = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
        attention_scaling = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq.astype(np.float32), attention_scaling
    raise ValueError(f"rope_scaling.kind: unknown {kind!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_scaling: float = 1.0) -> jax.Array:
    """Rotates x [B, T, N, H] by angles positions [B, T] * inv_freq [H/2] (half-split layout, as HF)."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(inv_freq)  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---- attention ----------------------------------------------------------------------------------


class LayerCache(NamedTuple):
    """One layer's KV cache. k, v: [B, S, K, H]; positions, segment_ids: [B, S] of each slot
    (segment 0 = empty); index: [] next slot to write. Stacked caches carry a leading layer axis."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, batch: int, length: int, cfg: ModelConfig, dtype: jnp.dtype) -> LayerCache:
        kv = jnp.zeros((batch, length, cfg.n_kv_heads, cfg.head_dim), dtype)
        slots = jnp.zeros((batch, length), jnp.int32)
        return cls(kv, kv, slots, slots, jnp.zeros((), jnp.int32))

    def append(self, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> LayerCache:
        """Writes T new entries (k/v [B, T, K, H]) at `index`."""

        def write(buffer: jax.Array, new: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), self.index, axis=1)

        return LayerCache(
            write(self.k, k), write(self.v, v), write(self.positions, positions),
            write(self.segment_ids, segment_ids), self.index + k.shape[1],
        )


class KVCache(NamedTuple):
    """The sampler's slot cache for one stack of layers. k, v: [L, B, K, S, H] (L layers of the stack).

    Row b's token at position p lives in slot p: each row holds its own sequence from slot 0, rows
    may hold sequences of different lengths (continuous batching refills rows one by one), and which
    slots a query sees follows from its position alone (no per-slot positions or segment ids)."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, layers: int, batch: int, length: int, cfg: ModelConfig, dtype: jnp.dtype) -> KVCache:
        kv = jnp.zeros((layers, batch, cfg.n_kv_heads, length, cfg.head_dim), dtype)
        return cls(kv, kv)


def write_slots(buffer: jax.Array, layer: jax.Array | int, positions: jax.Array, new: jax.Array) -> jax.Array:
    """A slot cache buffer [L, B, K, S, X] with new [B, T, K, X] written to layer `layer`, slots
    positions [B, T] (slots >= S are dropped).

    One scatter per row, batched over rows (vmap): the row axis is then a batching dimension of the
    scatter, so with rows sharded over devices each device writes its own rows, where a scatter
    indexed by (row, slot) pairs makes GSPMD all-gather the indices and updates at every step."""

    def write_row(rows: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:  # [L, K, S, X], [T], [T, K, X]
        return rows.at[layer, :, slots].set(values.astype(rows.dtype), mode="drop")

    return jax.vmap(write_row, in_axes=(1, 0, 0), out_axes=1)(buffer, positions, new)


def slot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, logit_softcap: float = 0.0,
                   sinks: jax.Array | None = None) -> jax.Array:
    """Attention over cache slots: q [B, T, N, H], k/v [B, K, W, H], mask [B, T, W] -> [B, T, N, H].

    Query head j*G + g uses KV head j (G = N / K), as the kernels do. Scores and softmax are float32;
    scaled scores are soft-capped at cap * tanh(score / cap) when `logit_softcap` (static) is set;
    `sinks` [N] join each head's softmax denominator (`models.attention.mask.AttentionMask.sinks`).
    A decode step (T = 1) runs each of the G query heads of a KV head as its own matrix-vector
    product: XLA lowers those to fused multiply-reduce loops, where the batched [G, W] x [W, H]
    products of the general form run ~2.5x slower on CPU at a decode batch (results/sampler_profile).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, t, kv_heads, n // kv_heads, h)
    sink = None if sinks is None else grouped_sinks(sinks, kv_heads)  # [K, G]

    def softmax(scores: jax.Array, mask: jax.Array, sink: jax.Array | None) -> jax.Array:
        scores = soft_cap(scores / math.sqrt(h), logit_softcap)
        return softmax_with_sinks(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), sink).astype(v.dtype)

    if t == 1:
        heads = []
        for g in range(n // kv_heads):
            scores = jnp.einsum("bkh,bksh->bks", grouped[:, 0, :, g], k, preferred_element_type=jnp.float32)
            probs = softmax(scores, mask[:, :1], None if sink is None else sink[:, g, None])
            heads.append(jnp.einsum("bks,bksh->bkh", probs, v))
        return jnp.stack(heads, axis=2).reshape(b, 1, n, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", grouped, k, preferred_element_type=jnp.float32)
    probs = softmax(scores, mask[:, None, None], None if sink is None else sink[:, :, None, None])
    return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, n, h)


class Attention(nnx.Module):
    """Multi-head / grouped-query / multi-query attention with RoPE, optional QKV bias and QK-norm.

    window: this layer's sliding window (0: full attention; None: `cfg.sliding_window`), so that a
    model's layers can differ (`ModelConfig.layer_window`). Scores are q.k / sqrt(head_dim), or
    / sqrt(cfg.query_pre_attn_scalar) (Gemma), soft-capped when cfg.attn_logit_softcap is set. RoPE has
    base cfg.rope_theta and cfg.rope_scaling, or in sliding-window layers cfg.sliding_rope_theta when set.
    With cfg.attention_sinks, a learned logit per head [N] joins every softmax denominator (gpt-oss).
    """

    LORA_WEIGHTS = {"q_proj": (0, 1), "k_proj": (0, 1), "v_proj": (0, 1), "o_proj": (0, 2)}  # models/lora.py

    def __init__(self, cfg: ModelConfig, *, window: int | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.window = cfg.sliding_window if window is None else window
        pdt = dtype_of(cfg.param_dtype)
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        init = normal(cfg.init_std)
        out_init = normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.q_proj = param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pdt)
        self.k_proj = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_proj = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        self.o_proj = param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), pdt)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), pdt)
            self.k_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pdt)
            self.v_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pdt)
        if cfg.out_bias:
            self.o_bias = param(rngs, zeros, (d,), ("embed",), pdt)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.norm_eps, param_dtype=pdt, rngs=rngs, offset=cfg.norm_scale_offset)
            self.k_norm = RMSNorm(h, cfg.norm_eps, param_dtype=pdt, rngs=rngs, offset=cfg.norm_scale_offset)
        if cfg.attention_sinks:
            self.sinks = param(rngs, zeros, (n,), ("heads",), pdt)

    def _sinks(self) -> jax.Array | None:
        return self.sinks[...] if self.cfg.attention_sinks else None

    def _project(self, x: jax.Array, name: str, axes: LogicalAxes) -> jax.Array:
        dtype = x.dtype
        y = jnp.einsum("btd,dnh->btnh", x, getattr(self, f"{name}_proj")[...].astype(dtype))
        y = with_adapter(self, f"{name}_proj", x, y)
        if self.cfg.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dtype)
        return constrain(y, axes)

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D], positions [B, T] -> q [B, T, N, H], k and v [B, T, K, H], RoPE applied to q and k."""
        q = self._project(x, "q", ("batch", "activation_length", "activation_heads", None))
        k = self._project(x, "k", ("batch", "activation_length", "activation_kv_heads", None))
        v = self._project(x, "v", ("batch", "activation_length", "activation_kv_heads", None))
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.query_pre_attn_scalar:  # every kernel divides by sqrt(head_dim): rescale the queries
            q = q * jnp.asarray(math.sqrt(self.cfg.head_dim / self.cfg.query_pre_attn_scalar), q.dtype)
        theta, scaling = self.cfg.rope_theta, self.cfg.rope_scaling
        if self.window and self.cfg.sliding_rope_theta:  # Gemma 3's local layers: their own base, unscaled
            theta, scaling = self.cfg.sliding_rope_theta, RopeScaling()
        inv_freq, rope_scale = rope_frequencies(self.cfg.head_dim, theta, scaling)
        return apply_rope(q, positions, inv_freq, rope_scale), apply_rope(k, positions, inv_freq, rope_scale), v

    def _attend_and_project(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, dtype: jnp.dtype) -> jax.Array:
        """q [B, T, N, H], k/v [B, S, K, H] -> output projection [B, T, D]."""
        return self._output(attention_kernel(self.cfg.attention_impl)(q, k, v, mask), dtype)

    def _output(self, out: jax.Array, dtype: jnp.dtype, flat: bool = False) -> jax.Array:
        """Attention output [B, T, N, H] -> [B, T, D].

        flat (the decode path): one [B T, N H] x [N H, D] matmul. In the decode loop XLA:CPU lays the
        einsum's operands out so that it transposes o_proj at every step (a [N H, D] copy per layer
        and step, results/sampler_profile); the flat matmul reads o_proj in place."""
        out = constrain(out, ("batch", "activation_length", "activation_heads", None))
        if flat:
            b, t, n, h = out.shape
            y = (out.reshape(b * t, n * h) @ self.o_proj[...].astype(dtype).reshape(n * h, -1)).reshape(b, t, -1)
        else:
            y = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(dtype))
        y = with_adapter(self, "o_proj", out, y)
        if self.cfg.out_bias:
            y = y + self.o_bias[...].astype(dtype)
        return constrain(y, ("batch", "activation_length", "activation_embed"))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        cache: LayerCache | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D], positions/segment_ids [B, T] (None: one document per row) -> ([B, T, D], updated
        cache or None)."""
        q, k, v = self._qkv(x, positions)
        window = self.window
        segment_ids, packed = document_ids(positions, segment_ids)
        if cache is not None:
            cache = cache.append(k, v, positions, segment_ids)
            k, v = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
            mask = AttentionMask(positions, cache.positions, segment_ids, cache.segment_ids, window,
                                 logit_softcap=self.cfg.attn_logit_softcap, packed=packed, sinks=self._sinks())
        else:  # the row attends to itself, in order
            mask = AttentionMask(positions, positions, segment_ids, segment_ids, window, causal=True,
                                 logit_softcap=self.cfg.attn_logit_softcap, packed=packed, sinks=self._sinks())
        return self._attend_and_project(q, k, v, mask, x.dtype), cache

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache, layer: jax.Array | int, window: int
    ) -> tuple[jax.Array, KVCache]:
        """The sampling path over a slot cache (`KVCache`): x [B, T, D], positions [B, T] -> ([B, T, D], cache).

        Token t of row b has position p = positions[b, t] and its key/value go to slot p of layer
        `layer` (slots >= S are not written: finished or filler rows). The queries then attend over
        slots [0, window) of that layer, to those at or before their own position (and inside the
        sliding window), so only `window` slots are read, not the whole cache. A row's slots must hold
        its own tokens at every position below the queries' (prefill, then one token per step).
        Scores and softmax are float32; the cache layout [L, B, K, S, H] feeds both attention
        products without transposing the cache.
        """
        q, k, v = self._qkv(x, positions)
        b, t, n, h = q.shape
        kv_heads = k.shape[2]
        write_k, write_v = write_slots(cache.k, layer, positions, k), write_slots(cache.v, layer, positions, v)

        def read(buffer: jax.Array) -> jax.Array:  # layer `layer`, slots [0, window): [B, K, W, H]
            start = (jnp.asarray(layer, jnp.int32), 0, 0, 0, 0)
            block = jax.lax.dynamic_slice(buffer, start, (1, b, kv_heads, window, h))[0]
            return constrain(block.astype(x.dtype), ("batch", "activation_kv_heads", None, None))

        slots = jnp.arange(window, dtype=positions.dtype)[None, None, :]
        mask = slots <= positions[:, :, None]  # [B, T, W]
        if self.window:
            mask &= positions[:, :, None] - slots < self.window
        out = slot_attention(q, read(write_k), read(write_v), mask, self.cfg.attn_logit_softcap, self._sinks())
        return self._output(out, x.dtype, flat=True), KVCache(write_k, write_v)


# ---- feed-forward ----------------------------------------------------------------------------------


class MLP(nnx.Module):
    """SwiGLU (Shazeer 2020: down(silu(gate x) * up x)), GeGLU (down(gelu_tanh(gate x) * up x), Gemma) or
    GELU (down(gelu(up x + b)) + b) MLP; GELUs use the tanh approximation."""

    LORA_WEIGHTS = {"gate_proj": (0, 1), "up_proj": (0, 1), "down_proj": (0, 1)}  # models/lora.py

    def __init__(self, cfg: ModelConfig, d_ff: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        d = cfg.d_model
        init = normal(cfg.init_std)
        out_init = normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        if cfg.mlp in GATED_MLPS:
            self.gate_proj = param(rngs, init, (d, d_ff), ("embed", "mlp"), pdt)
        self.up_proj = param(rngs, init, (d, d_ff), ("embed", "mlp"), pdt)
        self.down_proj = param(rngs, out_init, (d_ff, d), ("mlp", "embed"), pdt)
        if cfg.mlp_bias:
            if cfg.mlp in GATED_MLPS:
                self.gate_bias = param(rngs, zeros, (d_ff,), ("mlp",), pdt)
            self.up_bias = param(rngs, zeros, (d_ff,), ("mlp",), pdt)
            self.down_bias = param(rngs, zeros, (d,), ("embed",), pdt)

    def _linear(self, x: jax.Array, name: str) -> jax.Array:
        y = with_adapter(self, f"{name}_proj", x, x @ getattr(self, f"{name}_proj")[...].astype(x.dtype))
        if self.cfg.mlp_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D], computed on the tokens flattened to [tokens, D].

        Flat, because with the batch and length axes apart XLA:CPU writes the activation (and its
        gradient) transposed for the weight-gradient dots, a slow transposing fusion per matrix
        (~13% of the CPU time of a 4-layer step; results/train_step_profile)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        up = self._linear(x, "up")
        if self.cfg.mlp == "swiglu":
            hidden = jax.nn.silu(self._linear(x, "gate")) * up
        elif self.cfg.mlp == "geglu":
            hidden = jax.nn.gelu(self._linear(x, "gate"), approximate=True) * up
        else:
            hidden = jax.nn.gelu(up, approximate=True)
        if len(lead) == 2:
            hidden = constrain(hidden.reshape(*lead, -1), ("batch", "activation_length", "activation_mlp"))
            hidden = hidden.reshape(-1, hidden.shape[-1])
        return self._linear(hidden, "down").reshape(*lead, -1)

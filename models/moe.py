"""Mixture-of-experts feed-forward layer: router, routed and shared experts, two execution paths,
expert parallelism, balancing losses and load metrics.

Shape letters: B batch, T length, D d_model, F expert MLP width, E experts, K experts per token,
N tokens on one device (B * T there), M routed rows (N * K), C capacity slots per expert and
sequence, S sequences on one device, P expert-parallel shards, L experts per shard (E / P), G groups
of a grouped matmul.

Execution paths (`MoEConfig.impl`), equal whenever no token is dropped:
  dropless  assignments sorted by expert, every expert MLP run as a grouped matmul over its rows
            (kernel seam: `register_grouped_matmul`); nothing is dropped.
  capacity  every expert gets C = ceil(capacity_factor * T * K / E) slots per sequence (at most T;
            GShard's groups are sequences here); within a sequence assignments are served in (choice
            rank, token) order, i.e. every token's first choice before any second choice, and those
            past an expert's C-th slot are dropped. Capacity is per sequence, not per device, so which
            tokens are dropped does not depend on the mesh or on how the batch is sharded.
Expert parallelism: under `models.sharding.sharding_context` the experts run per device inside
`jax.shard_map`; when the "experts" logical axis maps to mesh axes of size P > 1, each device sends
its tokens to the shards holding their experts with `all_to_all` and gets the results back the same
way. Expert weights are all-gathered over fsdp at the shard_map boundary; an "expert_mlp" axis on
tensor splits F, and the partial outputs are summed over it.

Aux outputs of `MoEFeedForward` (per layer; the decoder prefixes "<stack>/" and stacks a leading
[n_layers_in_stack] axis). Keys starting with "loss_" are already multiplied by their coefficients:
  loss_load_balancing  []   aux_loss_coef * E * sum_e f_e * p_e (Switch Transformer, Fedus et al. 2021,
                            eq. 4): f_e = expert_load, p_e = mean router probability of expert e
                            (sigmoid routers: scores normalised over experts). Equals the coefficient
                            when balanced; Hugging Face's Mixtral `load_balancing_loss_func` is K times it.
  loss_router_z        []   router_z_loss_coef * mean over tokens of logsumexp(logits)^2 (ST-MoE,
                            Zoph et al. 2022, eq. 5).
  expert_load          [E]  fraction of the N * K routed assignments that chose each expert (sums to 1),
                            counted before capacity drops; input to the DeepSeek-V3 bias update.
  load_max_mean_ratio  []   max_e expert_load / mean_e expert_load: 1 when balanced, at most E / K.
  dropped_fraction     []   fraction of assignments dropped for lack of capacity (0 when dropless).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models import sharding
from models.config import ConfigError, ModelConfig, MoEConfig
from models.layers import MLP, dtype_of, normal, param, zeros

Aux = dict[str, jax.Array]

# ---- grouped matmul kernels ------------------------------------------------------------------------

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""lhs [M, K] with rows sorted by group, rhs [G, K, N], group_sizes [G] int32 (sum <= M) -> [M, N]:
the g-th block of group_sizes[g] rows is multiplied by rhs[g]; rows past sum(group_sizes) give zeros."""


def ragged_dot_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """XLA's ragged dot. A native grouped GEMM on TPU; XLA:CPU computes it as G masked dense dots."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _tile_rows(m: int, groups: int) -> int:
    """Tile height: large tiles for few big groups, small ones when many groups would waste padding.

    Padding is at most groups * (tile - 1) rows; the tile is the largest power of two in [8, 128]
    keeping it under about a quarter of m.
    """
    tile = 128
    while tile > 8 and groups * tile > m // 4:
        tile //= 2
    return tile


def tiled_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul from dense batched matmuls: each group padded to whole tiles, one weight per tile.

    Costs about (M + G * tile) * K * N multiply-adds instead of G * M * K * N for XLA:CPU's ragged
    dot, and holds n_tiles copies of a [K, N] weight slice; for CPUs and small models.
    """
    m, k = lhs.shape
    groups, _, n = rhs.shape
    tile = _tile_rows(m, groups)
    n_tiles = -(-m // tile) + groups
    group_ends = jnp.cumsum(group_sizes)
    group_starts = group_ends - group_sizes
    group_tiles = -(-group_sizes // tile)
    group_first_tile = jnp.cumsum(group_tiles) - group_tiles

    rows = jnp.arange(m)
    row_group = jnp.searchsorted(group_ends, rows, side="right")  # == groups past the last group
    safe_group = jnp.minimum(row_group, groups - 1)
    padded_row = group_first_tile[safe_group] * tile + rows - group_starts[safe_group]
    padded_row = jnp.where(row_group < groups, padded_row, n_tiles * tile)  # out of range: dropped

    padded = jnp.zeros((n_tiles * tile, k), lhs.dtype).at[padded_row].set(lhs, mode="drop", unique_indices=True)
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_tiles), jnp.arange(n_tiles), side="right"), groups - 1)
    out = jnp.einsum(
        "atk,akn->atn", padded.reshape(n_tiles, tile, k), rhs[tile_group], preferred_element_type=jnp.float32
    )
    return out.reshape(n_tiles * tile, n).at[padded_row].get(mode="fill", fill_value=0).astype(lhs.dtype)


GROUPED_MATMUL_KERNELS: dict[str, GroupedMatmul] = {"ragged_dot": ragged_dot_matmul, "tiled": tiled_matmul}


def register_grouped_matmul(name: str, fn: GroupedMatmul) -> None:
    """Registers a grouped-matmul kernel (e.g. a Pallas megablox GMM) for `moe.grouped_matmul`."""
    GROUPED_MATMUL_KERNELS[name] = fn


def grouped_matmul_kernel(name: str) -> GroupedMatmul:
    """The kernel registered as `name`; "auto" is ragged_dot on TPU and the tiled kernel elsewhere."""
    if name == "auto":
        name = "ragged_dot" if jax.default_backend() == "tpu" else "tiled"
    if name not in GROUPED_MATMUL_KERNELS:
        raise ConfigError(
            f"moe.grouped_matmul: no kernel registered under {name!r}; "
            f"available: auto, {', '.join(sorted(GROUPED_MATMUL_KERNELS))}"
        )
    return GROUPED_MATMUL_KERNELS[name]


# ---- routing ---------------------------------------------------------------------------------------


class RouterBias(nnx.Variable):
    """Per-expert bias added to the router scores for expert selection only (DeepSeek-V3's
    auxiliary-loss-free balancing). Not a Param: gradients and optimizers never see it."""


class Routing(NamedTuple):
    expert_ids: jax.Array  # [..., K] int32, chosen experts in descending score order
    weights: jax.Array  # [..., K] float32 combine weights
    logits: jax.Array  # [..., E] float32 router logits
    probs: jax.Array  # [..., E] float32 router probabilities (sum to 1 over E), for the balancing loss


def limit_to_groups(choice: jax.Array, moe: MoEConfig) -> jax.Array:
    """Group-limited routing (DeepSeek-V2 sec. 2.2.2, V3 sec. 2.1.2): choice scores [..., E] with the
    experts outside each token's best `topk_groups` of `num_groups` groups set to -inf.

    A group's score is its best expert's (softmax routers, DeepSeek-V2's group_limited_greedy) or the
    sum of its best two (sigmoid routers, DeepSeek-V3), on the same biased scores the top-k uses.
    """
    grouped = choice.reshape(*choice.shape[:-1], moe.num_groups, moe.num_experts // moe.num_groups)
    best = jax.lax.top_k(grouped, 1 if moe.router == "softmax" else min(2, grouped.shape[-1]))[0]
    _, groups = jax.lax.top_k(jnp.sum(best, axis=-1), moe.topk_groups)  # [..., topk_groups]
    keep = jnp.any(groups[..., :, None] == jnp.arange(moe.num_groups), axis=-2)  # [..., num_groups]
    return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(choice.shape)


def route(logits: jax.Array, selection_bias: jax.Array, moe: MoEConfig) -> Routing:
    """Top-K routing from logits [..., E].

    softmax: scores = softmax(logits) (Mixtral, Qwen3-MoE, DeepSeek-V2). sigmoid: scores =
    sigmoid(logits) (DeepSeek-V3). Experts are chosen by scores + selection_bias, within the best
    groups when `num_groups` > 1 (`limit_to_groups`); their weights are the unbiased scores,
    renormalised over the chosen K when `normalize_top_k`, times `routed_scaling`.
    """
    logits = logits.astype(jnp.float32)
    if moe.router == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    choice = scores + jax.lax.stop_gradient(selection_bias)
    if moe.num_groups > 1:
        choice = limit_to_groups(choice, moe)
    _, expert_ids = jax.lax.top_k(choice, moe.experts_per_token)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if moe.normalize_top_k:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(expert_ids.astype(jnp.int32), weights * moe.routed_scaling, logits, probs)


class Router(nnx.Module):
    """logits = x @ kernel (+ logit_bias with `moe.router_bias`) in float32, then `route`. The kernel is
    [D, E], logit_bias [E] a learned Param; the bias [E] is the selection-only RouterBias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.moe is not None
        self.moe = cfg.moe
        num_experts = cfg.moe.num_experts
        pdt = dtype_of(cfg.param_dtype)
        self.kernel = param(rngs, normal(cfg.init_std), (cfg.d_model, num_experts), ("embed", None), pdt)
        self.logit_bias = param(rngs, zeros, (num_experts,), (None,), pdt) if cfg.moe.router_bias else None
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))

    def __call__(self, x: jax.Array) -> Routing:
        """x [..., D] -> Routing over the leading dimensions."""
        logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        if self.logit_bias is not None:
            logits = logits + self.logit_bias[...].astype(jnp.float32)
        return route(logits, self.bias[...], self.moe)

    def update_bias(self, expert_load: jax.Array, rate: float) -> None:
        """DeepSeek-V3 (Liu et al. 2024, sec. 2.1.2): b_e += rate * sign(mean load - load_e).

        expert_load has the bias's shape ([E], or [n_layers, E] for a scanned stack).
        """
        bias = self.bias.get_value()
        if expert_load.shape != bias.shape:
            raise ValueError(f"expert_load shape {expert_load.shape} does not match the router bias {bias.shape}")
        mean_load = jnp.mean(expert_load, axis=-1, keepdims=True)
        self.bias.set_value(bias + rate * jnp.sign(mean_load - expert_load).astype(bias.dtype))


def routing_aux(routing: Routing, kept: jax.Array | None, moe: MoEConfig) -> Aux:
    """The per-layer aux dict documented at the top of this module. kept [..., K]: assignments that
    got a capacity slot (None: dropless)."""
    num_experts = moe.num_experts
    ids = routing.expert_ids.reshape(-1)
    load = jnp.zeros((num_experts,), jnp.float32).at[ids].add(1.0) / ids.size
    mean_probs = jnp.mean(routing.probs.reshape(-1, num_experts), axis=0)
    load_balancing = num_experts * jnp.sum(jax.lax.stop_gradient(load) * mean_probs)
    z = jax.nn.logsumexp(routing.logits, axis=-1)
    dropped = jnp.zeros((), jnp.float32) if kept is None else jnp.mean(jnp.logical_not(kept).astype(jnp.float32))
    return {
        "loss_load_balancing": moe.aux_loss_coef * load_balancing,
        "loss_router_z": moe.router_z_loss_coef * jnp.mean(jnp.square(z)),
        "expert_load": load,
        "load_max_mean_ratio": jnp.max(load) * num_experts,
        "dropped_fraction": dropped,
    }


# ---- expert MLPs -----------------------------------------------------------------------------------


class ProjectionLoRA(NamedTuple):
    """LoRA factors of one expert projection (models/lora.py) in compute dtype: a [G, in, r],
    b [G, r, out] with the alpha / r scale folded in; dropout_key and dropout_rate [] when training
    with dropout, else None."""

    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: jax.Array | None = None


class ExpertLoRA(NamedTuple):
    """Adapters of the expert projections; None where a projection has none."""

    gate: ProjectionLoRA | None
    up: ProjectionLoRA | None
    down: ProjectionLoRA | None


class ExpertWeights(NamedTuple):
    """Stacked expert weights in compute dtype: gate/up [G, D, F] (gate None for GELU; for the clamped
    SwiGLU, gate None and up [G, D, 2F], see `clamped_swiglu`), down [G, F, D]; lora: their LoRA
    adapters (None without); gate_bias/up_bias [G, F] (or [G, 2F]): biases of the input projections
    (None without; the output bias is added after the combine, `expert_output_bias`)."""

    gate: jax.Array | None
    up: jax.Array
    down: jax.Array
    lora: ExpertLoRA | None = None
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None


Activation = Callable[[jax.Array | None, jax.Array], jax.Array]
"""(gate projection or None, up projection) -> hidden [..., F]: the experts' MLP nonlinearity."""

CLAMPED_SWIGLU_ALPHA = 1.702  # gpt-oss's sigmoid gain (x * sigmoid(1.702 x) approximates GELU)


def _hidden(gate: jax.Array | None, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up if gate is not None else jax.nn.gelu(up, approximate=True)


def clamped_swiglu(gate: None, gate_up: jax.Array, limit: float) -> jax.Array:
    """gpt-oss's expert activation: gate_up [..., 2F] holds (gate, up) pairs interleaved on the last
    axis (HF's `gate_up_proj`; a split of F over devices keeps pairs together) -> [..., F] =
    (clip(up, -limit, limit) + 1) * g * sigmoid(1.702 g) with g = min(gate, limit)."""
    del gate
    g = jnp.minimum(gate_up[..., ::2], limit)
    up = jnp.clip(gate_up[..., 1::2], -limit, limit)
    return (up + 1) * g * jax.nn.sigmoid(CLAMPED_SWIGLU_ALPHA * g)


def expert_activation(mlp: str, swiglu_limit: float) -> Activation:
    """The experts' nonlinearity for ModelConfig.mlp (and swiglu_limit)."""
    if mlp == "clamped_swiglu":
        return functools.partial(clamped_swiglu, limit=swiglu_limit)
    return _hidden


def _adapter(w: ExpertWeights, name: str) -> ProjectionLoRA | None:
    return None if w.lora is None else getattr(w.lora, name)


def _adapter_input(x: jax.Array, p: ProjectionLoRA) -> jax.Array:
    """Inverted dropout on the adapter's input when training with dropout."""
    if p.dropout_key is None:
        return x
    keep = jax.random.bernoulli(p.dropout_key, 1.0 - p.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - p.dropout_rate).astype(x.dtype), jnp.zeros((), x.dtype))


def _input_bias(w: ExpertWeights, name: str) -> jax.Array | None:
    return getattr(w, f"{name}_bias") if name in ("gate", "up") else None


def grouped_expert_mlp(rows: jax.Array, group_sizes: jax.Array, w: ExpertWeights, matmul: GroupedMatmul,
                       activation: Activation = _hidden) -> jax.Array:
    """rows [M, D] sorted by expert, group_sizes [G] -> [M, D]: each row through its expert's MLP
    (plus dropout(x) A B per expert for adapted projections, through the same kernel)."""
    row_expert = None  # each row's expert, for the input biases; rows past the groups get any (down zeroes them)
    if w.gate_bias is not None or w.up_bias is not None:
        row_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right"),
                                 group_sizes.shape[0] - 1)

    def project(x: jax.Array, name: str) -> jax.Array:
        y = matmul(x, getattr(w, name), group_sizes)
        p = _adapter(w, name)
        if p is not None:
            y = y + matmul(matmul(_adapter_input(x, p), p.a, group_sizes), p.b, group_sizes)
        bias = _input_bias(w, name)
        return y if bias is None else y + bias[row_expert]

    gate = None if w.gate is None else project(rows, "gate")
    return project(activation(gate, project(rows, "up")), "down")


def batched_expert_mlp(slots: jax.Array, w: ExpertWeights, activation: Activation = _hidden) -> jax.Array:
    """slots [G, C, D] -> [G, C, D]: the C slots of expert g through expert g's MLP (and adapters)."""

    def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum("gcd,gdf->gcf", x, kernel, preferred_element_type=jnp.float32).astype(x.dtype)

    def project(x: jax.Array, name: str) -> jax.Array:
        y = matmul(x, getattr(w, name))
        p = _adapter(w, name)
        if p is not None:
            y = y + matmul(matmul(_adapter_input(x, p), p.a), p.b)
        bias = _input_bias(w, name)
        return y if bias is None else y + bias[:, None]

    gate = None if w.gate is None else project(slots, "gate")
    return project(activation(gate, project(slots, "up")), "down")


class Experts(nnx.Module):
    """E MLPs (SwiGLU, GELU or gpt-oss's clamped SwiGLU, as cfg.mlp; biases with moe.expert_bias) with
    weights stacked on a leading "experts" axis. The clamped SwiGLU keeps its gate and up projections
    interleaved in `up` [E, D, 2F] (`clamped_swiglu`)."""

    LORA_WEIGHTS = {"gate": (1, 1), "up": (1, 1), "down": (1, 1)}  # models/lora.py: per-expert adapters

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        assert cfg.moe is not None
        e, d, f = cfg.moe.num_experts, cfg.d_model, cfg.moe.expert_d_ff or cfg.d_ff
        up_width = 2 * f if cfg.mlp == "clamped_swiglu" else f
        pdt = dtype_of(cfg.param_dtype)
        init = normal(cfg.init_std)
        in_axes = ("experts", "embed", "expert_mlp")
        self.gate = param(rngs, init, (e, d, f), in_axes, pdt) if cfg.mlp == "swiglu" else None
        self.up = param(rngs, init, (e, d, up_width), in_axes, pdt)
        self.down = param(rngs, normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), (e, f, d),
                          ("experts", "expert_mlp", "embed"), pdt)
        bias = cfg.moe.expert_bias
        self.gate_bias = param(rngs, zeros, (e, f), ("experts", "expert_mlp"), pdt) if bias and self.gate is not None else None
        self.up_bias = param(rngs, zeros, (e, up_width), ("experts", "expert_mlp"), pdt) if bias else None
        self.down_bias = param(rngs, zeros, (e, d), ("experts", "embed"), pdt) if bias else None

    def weights(self, dtype: jnp.dtype) -> ExpertWeights:
        def cast(p: nnx.Param | None) -> jax.Array | None:
            return None if p is None else p[...].astype(dtype)

        return ExpertWeights(cast(self.gate), cast(self.up), cast(self.down), self._lora(dtype),
                             cast(self.gate_bias), cast(self.up_bias))

    def _lora(self, dtype: jnp.dtype) -> ExpertLoRA | None:
        def projection(name: str) -> ProjectionLoRA | None:
            adapter = getattr(self, f"{name}_lora", None)
            if adapter is None:
                return None
            a = adapter.a[...].astype(dtype)
            b = (adapter.b[...] * adapter.scale).astype(dtype)
            key = adapter.dropout_key()
            if key is None:
                return ProjectionLoRA(a, b)
            return ProjectionLoRA(a, b, key, jnp.asarray(adapter.dropout.rate, jnp.float32))

        lora = ExpertLoRA(projection("gate"), projection("up"), projection("down"))
        return None if all(p is None for p in lora) else lora


# ---- dispatch and combine on one device --------------------------------------------------------------


class SortedAssignments(NamedTuple):
    order: jax.Array  # [M] flat assignment index (token * K + choice) of each expert-sorted row
    experts: jax.Array  # [M] expert of each sorted row (non-decreasing)
    group_sizes: jax.Array  # [E] rows per expert


def sort_by_expert(expert_ids: jax.Array, num_experts: int) -> SortedAssignments:
    """Sorts the N * K assignments of expert_ids [N, K] by expert (stable, so token order within one)."""
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return SortedAssignments(order, flat[order], jnp.bincount(flat, length=num_experts).astype(jnp.int32))


def combine_sorted(rows: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """rows [M, D] in sorted order, weights [N, K] -> [N, D] = sum_k weights[n, k] * row of (n, k)."""
    n, k = weights.shape
    unsorted = jnp.zeros_like(rows).at[order].set(rows, unique_indices=True).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", unsorted, weights.astype(rows.dtype), preferred_element_type=jnp.float32).astype(rows.dtype)


def expert_capacity(n_tokens: int, moe: MoEConfig) -> int:
    """Slots per expert: ceil(capacity_factor * N * K / E), at least 1 and at most N (a token
    chooses an expert at most once)."""
    c = math.ceil(moe.capacity_factor * n_tokens * moe.experts_per_token / moe.num_experts)
    return max(1, min(c, n_tokens))


def capacity_slots(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Queue position [N, K] of every assignment at its expert, served in (choice rank, token) order."""
    n, k = expert_ids.shape
    rank_major = expert_ids.T.reshape(-1)
    order = jnp.argsort(rank_major, stable=True)
    sizes = jnp.bincount(rank_major, length=num_experts)
    starts = jnp.cumsum(sizes) - sizes
    position = jnp.arange(n * k) - starts[rank_major[order]]
    return jnp.zeros_like(position).at[order].set(position, unique_indices=True).reshape(k, n).T


def dispatch_to_slots(x: jax.Array, expert_ids: jax.Array, slots: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """x [N, D] -> [E, C, D]: token n copied to (expert_ids[n, k], slots[n, k]); slots >= C are dropped."""
    n, k = expert_ids.shape
    updates = jnp.broadcast_to(x[:, None, :], (n, k, x.shape[-1]))
    buffer = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    return buffer.at[expert_ids, slots].set(updates, mode="drop", unique_indices=True)


def combine_slots(out: jax.Array, expert_ids: jax.Array, slots: jax.Array, weights: jax.Array) -> jax.Array:
    """out [E, C, D] -> [N, D] = sum_k weights[n, k] * out[expert, slot]; dropped slots add nothing."""
    gathered = out.at[expert_ids, slots].get(mode="fill", fill_value=0)  # [N, K, D]
    return jnp.einsum("nkd,nk->nd", gathered, weights.astype(out.dtype), preferred_element_type=jnp.float32).astype(out.dtype)


def dropless_experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w: ExpertWeights, matmul: GroupedMatmul,
                     activation: Activation = _hidden) -> jax.Array:
    """x [N, D], expert_ids/weights [N, K] -> [N, D] with every expert of w local."""
    sorted_ = sort_by_expert(expert_ids, w.up.shape[0])
    rows = x[sorted_.order // expert_ids.shape[1]]
    return combine_sorted(grouped_expert_mlp(rows, sorted_.group_sizes, w, matmul, activation), sorted_.order, weights)


def sequence_slots(expert_ids: jax.Array, num_experts: int, sequences: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """expert_ids [N, K] of S = `sequences` sequences -> (slots [N, K], kept [N, K]): each sequence
    queues at every expert separately (`capacity_slots`) and gets its own `capacity` slots, laid out
    sequence-major in a buffer of S * C slots per expert; a dropped assignment's slot is S * C."""
    n, k = expert_ids.shape
    queued = jax.vmap(capacity_slots, in_axes=(0, None))(expert_ids.reshape(sequences, n // sequences, k), num_experts)
    kept = queued < capacity
    first_slot = capacity * jnp.arange(sequences)[:, None, None]
    slots = jnp.where(kept, queued + first_slot, sequences * capacity)
    return slots.reshape(n, k), kept.reshape(n, k)


def capacity_experts(
    x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w: ExpertWeights, moe: MoEConfig, sequences: int,
    activation: Activation = _hidden,
) -> tuple[jax.Array, jax.Array]:
    """x [N, D] (S sequences), expert_ids/weights [N, K] -> (y [N, D], kept [N, K]) with every expert of w local."""
    num_experts = w.up.shape[0]
    capacity = expert_capacity(x.shape[0] // sequences, moe)
    slots, kept = sequence_slots(expert_ids, num_experts, sequences, capacity)
    out = batched_expert_mlp(dispatch_to_slots(x, expert_ids, slots, num_experts, sequences * capacity), w, activation)
    return combine_slots(out, expert_ids, slots, weights), kept


# ---- expert parallelism: the same, with experts split over P devices ---------------------------------

AxisName = str | tuple[str, ...]


def _all_to_all(x: jax.Array, axis: AxisName) -> jax.Array:
    """x [P, ...]: block p goes to shard p; returns [P, ...] with block p from shard p."""
    return jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0, tiled=True)


def capacity_experts_parallel(
    x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_local: ExpertWeights, moe: MoEConfig,
    sequences: int, axis: AxisName, shards: int, activation: Activation = _hidden,
) -> tuple[jax.Array, jax.Array]:
    """`capacity_experts` with this device holding L = E / P experts (GShard): the [E, S * C, D] slot
    buffer is exchanged so that each shard receives the [P, L, S * C, D] slots of its experts."""
    n, d = x.shape
    num_experts, local = moe.num_experts, w_local.up.shape[0]
    per_sequence = expert_capacity(n // sequences, moe)
    slots, kept = sequence_slots(expert_ids, num_experts, sequences, per_sequence)
    capacity = sequences * per_sequence
    buffer = dispatch_to_slots(x, expert_ids, slots, num_experts, capacity)
    received = _all_to_all(buffer.reshape(shards, local, capacity, d), axis)  # [P(source), L, C, D]
    per_expert = received.transpose(1, 0, 2, 3).reshape(local, shards * capacity, d)
    out = batched_expert_mlp(per_expert, w_local, activation).reshape(local, shards, capacity, d).transpose(1, 0, 2, 3)
    returned = _all_to_all(out, axis).reshape(num_experts, capacity, d)
    return combine_slots(returned, expert_ids, slots, weights), kept


def dropless_experts_parallel(
    x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_local: ExpertWeights, matmul: GroupedMatmul,
    axis: AxisName, shards: int, activation: Activation = _hidden,
) -> jax.Array:
    """`dropless_experts` with this device holding L = E / P experts.

    Rows sorted by expert are also sorted by destination shard. Each shard is sent a fixed block of
    R = N * min(K, L) rows (the most one device can route there, since a token picks an expert once)
    holding its rows first, plus the [P, L] row counts; the receiver sorts what it got by local expert,
    runs the grouped MLP and sends the rows back in the order they came.
    """
    n, k = expert_ids.shape
    d = x.shape[-1]
    local = w_local.up.shape[0]
    num_experts = shards * local
    sorted_ = sort_by_expert(expert_ids, num_experts)
    rows = x[sorted_.order // k]  # [M, D]

    block = n * min(k, local)
    send_counts = sorted_.group_sizes.reshape(shards, local).sum(axis=1)
    send_starts = jnp.cumsum(send_counts) - send_counts
    offsets = jnp.arange(block)
    send_index = jnp.where(offsets[None, :] < send_counts[:, None], send_starts[:, None] + offsets[None, :], n * k)
    send = rows.at[send_index].get(mode="fill", fill_value=0)  # [P, R, D]

    received = _all_to_all(send, axis).reshape(shards * block, d)
    received_counts = _all_to_all(sorted_.group_sizes.reshape(shards, local), axis)  # [P(source), L]
    count_ends = jnp.cumsum(received_counts, axis=1)
    local_expert = jax.vmap(lambda ends: jnp.searchsorted(ends, offsets, side="right"))(count_ends)  # L: padding
    local_order = jnp.argsort(local_expert.reshape(-1), stable=True)
    out_sorted = grouped_expert_mlp(received[local_order], received_counts.sum(axis=0), w_local, matmul, activation)
    out = jnp.zeros_like(out_sorted).at[local_order].set(out_sorted, unique_indices=True)

    returned = _all_to_all(out.reshape(shards, block, d), axis)  # [P(expert shard), R, D]
    shard = sorted_.experts // local
    out_rows = returned[shard, jnp.arange(n * k) - send_starts[shard]]
    return combine_sorted(out_rows, sorted_.order, weights)


# ---- placement ---------------------------------------------------------------------------------------


def _axes_of(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _axis_name(axes: tuple[str, ...]) -> AxisName:
    return axes[0] if len(axes) == 1 else axes


class _Placement(NamedTuple):
    tokens: P  # of x [B, T, D]
    choices: P  # of expert_ids / weights / kept [B, T, K]
    weights: ExpertWeights  # PartitionSpecs of the expert weights inside shard_map
    expert_axes: tuple[str, ...]
    expert_shards: int
    tensor_axes: tuple[str, ...]


def _placement(mesh: Mesh, rules: sharding.Rules, x_shape: Sequence[int], w: ExpertWeights) -> _Placement:
    """Where each operand of the expert computation lives, from the logical-axis rules."""
    tokens = sharding.logical_to_mesh_spec(("batch", "activation_length", None), rules, mesh, x_shape)
    w_in = sharding.logical_to_mesh_spec(("experts", None, "expert_mlp"), rules, mesh, w.up.shape)
    w_out = sharding.logical_to_mesh_spec(("experts", "expert_mlp", None), rules, mesh, w.down.shape)
    expert_axes, tensor_axes = _axes_of(w_in[0]), _axes_of(w_in[2])
    token_axes = set(_axes_of(tokens[0]) + _axes_of(tokens[1]))
    shards = math.prod(mesh.shape[a] for a in expert_axes)
    if shards > 1 and not set(expert_axes) <= token_axes:
        raise ValueError(
            f"expert parallelism over {expert_axes} needs the tokens [B, T] = {tuple(x_shape[:2])} split over those "
            f"axes too (got {tokens}); make the batch divisible by the data-parallel mesh size and keep the expert "
            "axis in the 'batch' sharding rule"
        )
    if token_axes & set(tensor_axes):
        raise ValueError(f"'expert_mlp' and the token axes share mesh axes {sorted(token_axes & set(tensor_axes))}")
    def bias_spec(bias: jax.Array | None) -> P | None:
        return None if bias is None else sharding.logical_to_mesh_spec(("experts", "expert_mlp"), rules, mesh, bias.shape)

    weight_specs = ExpertWeights(None if w.gate is None else w_in, w_in, w_out, _lora_specs(mesh, rules, w),
                                 bias_spec(w.gate_bias), bias_spec(w.up_bias))
    return _Placement(tokens, P(tokens[0], tokens[1], None), weight_specs, expert_axes, shards, tensor_axes)


def _lora_specs(mesh: Mesh, rules: sharding.Rules, w: ExpertWeights) -> ExpertLoRA | None:
    """PartitionSpecs of the expert adapters inside shard_map: split over experts like their weights,
    A of down and B of gate/up over "expert_mlp" (F) like theirs, the rank and D dims whole."""
    if w.lora is None:
        return None

    def spec(p: ProjectionLoRA | None, a_axes: tuple, b_axes: tuple) -> ProjectionLoRA | None:
        if p is None:
            return None
        key = None if p.dropout_key is None else P()
        return ProjectionLoRA(sharding.logical_to_mesh_spec(a_axes, rules, mesh, p.a.shape),
                              sharding.logical_to_mesh_spec(b_axes, rules, mesh, p.b.shape), key, key)

    into_f = (("experts", None, None), ("experts", None, "expert_mlp"))
    out_of_f = (("experts", "expert_mlp", None), ("experts", None, None))
    return ExpertLoRA(spec(w.lora.gate, *into_f), spec(w.lora.up, *into_f), spec(w.lora.down, *out_of_f))


def experts_on_device(
    x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w: ExpertWeights, moe: MoEConfig,
    placement: _Placement | None = None, sequences: int = 1, activation: Activation = _hidden,
) -> tuple[jax.Array, jax.Array]:
    """One device's tokens x [N, D] (`sequences` sequences of N / S tokens), expert_ids/weights [N, K]
    through the routed experts, with the experts of w all local (placement None or one expert shard)
    or split over the expert axes. Returns (y [N, D], kept [N, K]; all True when dropless)."""
    shards = 1 if placement is None else placement.expert_shards
    axis = None if shards == 1 else _axis_name(placement.expert_axes)
    if moe.impl == "dropless":
        matmul = grouped_matmul_kernel(moe.grouped_matmul)
        if axis is None:
            y = dropless_experts(x, expert_ids, weights, w, matmul, activation)
        else:
            y = dropless_experts_parallel(x, expert_ids, weights, w, matmul, axis, shards, activation)
        kept = jnp.ones(expert_ids.shape, jnp.bool_)
    elif axis is None:
        y, kept = capacity_experts(x, expert_ids, weights, w, moe, sequences, activation)
    else:
        y, kept = capacity_experts_parallel(x, expert_ids, weights, w, moe, sequences, axis, shards, activation)
    if placement is not None and placement.tensor_axes:
        y = jax.lax.psum(y, _axis_name(placement.tensor_axes))  # partial sums over the F shards
    return y, kept


def routed_experts(
    x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w: ExpertWeights, moe: MoEConfig,
    activation: Activation = _hidden,
) -> tuple[jax.Array, jax.Array | None]:
    """x [B, T, D], expert_ids/weights [B, T, K] -> (y [B, T, D], kept [B, T, K] or None when dropless).

    Without a sharding context everything runs here; with one, per device in shard_map, exchanging
    tokens over the expert axes when they have size > 1. Capacity is per sequence either way, so
    the result does not depend on the context (only where the work runs does).
    """

    def flat(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w: ExpertWeights,
             placement: _Placement | None) -> tuple[jax.Array, jax.Array]:
        b, t, d = x.shape
        y, kept = experts_on_device(x.reshape(b * t, d), expert_ids.reshape(b * t, -1), weights.reshape(b * t, -1),
                                    w, moe, placement, sequences=b, activation=activation)
        return y.reshape(b, t, d), kept.reshape(b, t, -1)

    ctx = sharding.current_sharding()
    if ctx is None:
        y, kept = flat(x, expert_ids, weights, w, None)
    else:
        mesh, rules = ctx
        placement = _placement(mesh, rules, x.shape, w)
        y, kept = jax.shard_map(
            functools.partial(flat, placement=placement),
            mesh=mesh,
            in_specs=(placement.tokens, placement.choices, placement.choices, placement.weights),
            out_specs=(placement.tokens, placement.choices),
        )(x, expert_ids, weights, w)
    return y, (None if moe.impl == "dropless" else kept)


# ---- the layer -----------------------------------------------------------------------------------------


def expert_output_bias(routing: Routing, kept: jax.Array | None, bias: jax.Array) -> jax.Array:
    """sum_k weight_k * bias[expert_k] [..., D] over the kept assignments (kept None: all), for bias
    [E, D]: the experts' output-projection bias, added once after the combine, not per expert shard."""
    weights = routing.weights if kept is None else jnp.where(kept, routing.weights, 0.0)
    return jnp.einsum("...k,...kd->...d", weights.astype(bias.dtype), bias[routing.expert_ids])


class MoEFeedForward(nnx.Module):
    """Router + E routed experts (+ optional always-on shared experts).

    x [B, T, D] -> (y [B, T, D], aux): y = sum over the K chosen experts of weight * expert(x)
    + shared(x). The shared experts run as one MLP of width num_shared_experts * expert_d_ff, as
    DeepSeekMoE does.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.moe is None:
            raise ConfigError("moe: MoEFeedForward needs a model config with `moe` set")
        if cfg.mlp_bias:
            raise ConfigError("mlp_bias: MoE layers take moe.expert_bias for the experts' biases; set mlp_bias=False")
        self.moe = cfg.moe
        self.mlp, self.swiglu_limit = cfg.mlp, cfg.swiglu_limit
        self.router = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        shared_width = cfg.moe.num_shared_experts * (cfg.moe.expert_d_ff or cfg.d_ff)
        self.shared_experts = MLP(cfg, shared_width, rngs=rngs) if shared_width else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Aux]:
        routing = self.router(x)
        y, kept = routed_experts(x, routing.expert_ids, routing.weights, self.experts.weights(x.dtype), self.moe,
                                 expert_activation(self.mlp, self.swiglu_limit))
        if self.experts.down_bias is not None:
            y = y + expert_output_bias(routing, kept, self.experts.down_bias[...].astype(x.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, routing_aux(routing, kept, self.moe)


# ---- auxiliary-loss-free balancing ---------------------------------------------------------------------


def _expert_load_for(path: tuple[Any, ...], aux: Aux) -> jax.Array:
    """The expert_load entry of aux for the MoE layer at `path` in the module graph.

    Decoder layers sit at ("stacks", <stack>, "blocks", [j,] [r,] "ffn") (`models.decoder.LayerStack`:
    j, the pattern position, only in stacks whose pattern has several layers; r, the repeat, only
    when unrolled); their loads are aux["<stack>/[<j>/]expert_load"] [repeats, E] (row r when
    unrolled). A bare layer uses aux["expert_load"] [E].
    """
    indices: list[int] = []
    if "stacks" in path:
        stack = path[path.index("stacks") + 1]
        indices = [p for p in path[path.index("stacks") + 2:] if isinstance(p, int)]
        if indices and f"{stack}/{indices[0]}/expert_load" in aux:
            key, indices = f"{stack}/{indices[0]}/expert_load", indices[1:]
        else:
            key = f"{stack}/expert_load"
    else:
        key = "expert_load"
    if key not in aux:
        raise KeyError(f"apply_bias_updates: aux has no {key!r} for the MoE layer at {'/'.join(map(str, path))}")
    load = aux[key]
    return load[indices[-1]] if indices else load


def apply_bias_updates(model: nnx.Module, aux: Aux) -> None:
    """Updates every MoE layer's router bias in place from the expert loads in `aux` (the forward's
    aux output), at each layer's `moe.bias_update_rate`; layers with rate 0 are left alone."""
    for path, module in nnx.iter_graph(model):
        if isinstance(module, MoEFeedForward) and module.moe.bias_update_rate > 0:
            module.router.update_bias(jax.lax.stop_gradient(_expert_load_for(path, aux)), module.moe.bias_update_rate)

"""LoRA (Hu et al. 2021): low-rank adapters on the decoder's projections and expert weights, and
merging them back into the base weights for export.

A targeted weight W [G..., I..., O...] (G: group dims, the experts of an MoE layer; I: the dims x
contracts with; O: output dims) gets the `nnx.LoRAParam`s A [G..., I..., r] and B [G..., r, O...]
in an `Adapter` stored next to it as `<weight>_lora` (e.g. `attn.q_proj_lora`), and the layer computes

    y = x W + dropout(x) A B * alpha / r

on the explicit path: dense projections through `with_adapter`, MoE experts through the same grouped
matmul kernel or capacity einsum as their base weights (`models.moe.ExpertLoRA`), inside and outside
expert parallelism. B starts at zero, so an adapted model starts equal to its base. In scanned stacks
A and B carry the stack's leading "layers" axis like every other parameter there.

Which weights a module has and how many of their dims are groups and inputs, it declares in a class
attribute `LORA_WEIGHTS = {name: (group_dims, input_dims)}`; `add_adapters` matches their paths
against `LoRAConfig.targets`.

Training only the adapters: `nnx.split(model, nnx.LoRAParam, ...)` puts A and B in the first state
and every base weight (a plain `nnx.Param`) in the rest. Dropout (`LoRAConfig.dropout` > 0) draws
from an `nnx.Rngs` stream kept in each adapter and is off until `model.train()` (`model.eval()` turns
it off again); `reseed_dropout` sets the streams from one key, e.g. fold_in(seed, step) per step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ConfigError, LoRAConfig, ModelConfig

ADAPTER_SUFFIX = "_lora"
_LAYERS = "layers"  # the logical axis scanned stacks put first (models.decoder.LayerStack)


def _initializer(name: str, n_group: int, n_in: int) -> Any:
    """He/Kaiming (He et al. 2015) over the input dims of A [G..., I..., r]: variance 2 / prod(I)."""
    distribution = "uniform" if name == "he_uniform" else "truncated_normal"
    return jax.nn.initializers.variance_scaling(
        2.0, "fan_in", distribution, in_axis=tuple(range(n_group, n_group + n_in)), out_axis=-1,
        batch_axis=tuple(range(n_group)),
    )


class Adapter(nnx.Module):
    """The LoRA factors of one weight W [G..., I..., O...]: A [G..., I..., r], B [G..., r, O...].

    `__call__` is the dense case (no group dims): x [..., I...] -> dropout(x) A B * scale [..., O...].
    """

    def __init__(self, cfg: LoRAConfig, shape: tuple[int, ...], axes: tuple[str | None, ...], n_group: int, n_in: int,
                 *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        r = cfg.rank
        groups, inputs, outputs = shape[:n_group], shape[n_group:n_group + n_in], shape[n_group + n_in:]
        g_axes, in_axes, out_axes = axes[:n_group], axes[n_group:n_group + n_in], axes[n_group + n_in:]
        self.n_group, self.n_in, self.scale = n_group, n_in, cfg.scale
        a_init = _initializer(cfg.init, n_group, n_in)
        self.a = nnx.LoRAParam(a_init(rngs.params(), (*groups, *inputs, r), param_dtype),
                               out_sharding=(*g_axes, *in_axes, None), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((*groups, r, *outputs), param_dtype),
                               out_sharding=(*g_axes, None, *out_axes), eager_sharding=False)
        # Off until model.train(); rate 0 keeps no random state at all.
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=True, rngs=rngs) if cfg.dropout > 0 else None

    def dropout_key(self) -> jax.Array | None:
        """A fresh dropout key when training with dropout, else None."""
        if self.dropout is None or self.dropout.deterministic:
            return None
        return self.dropout.rngs()

    def __call__(self, x: jax.Array) -> jax.Array:
        assert self.n_group == 0, "grouped (expert) adapters run inside the expert kernels"
        if self.dropout is not None:
            x = self.dropout(x)
        h = jnp.tensordot(x, self.a[...].astype(x.dtype), axes=self.n_in) * jnp.asarray(self.scale, x.dtype)
        return jnp.tensordot(h, self.b[...].astype(x.dtype), axes=1)

    def delta(self) -> jax.Array:
        """scale * A B in float32, shaped like W (with any leading layer axis A and B carry)."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        batch = a.ndim - self.n_in - 1  # layers and groups
        inputs, outputs = a.shape[batch:-1], b.shape[batch + 1:]
        a2 = a.reshape(*a.shape[:batch], math.prod(inputs), a.shape[-1])
        b2 = b.reshape(*b.shape[:batch], b.shape[batch], math.prod(outputs))
        product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
        return (product * self.scale).reshape(*a.shape[:batch], *inputs, *outputs)


def with_adapter(module: nnx.Module, weight: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y (= x `module.<weight>`) plus the weight's LoRA delta on x, or y itself when it has no adapter."""
    adapter = getattr(module, weight + ADAPTER_SUFFIX, None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


# ---- adding, finding, merging ---------------------------------------------------------------------


class Target(NamedTuple):
    path: str  # "stacks/dense/blocks/attn/q_proj": the weight's graph path without layer indices
    module: nnx.Module
    weight: str
    n_group: int
    n_in: int


def targetable(model: nnx.Module) -> Iterator[Target]:
    """Every weight of `model` LoRA can adapt (declared by its module's `LORA_WEIGHTS`)."""
    for path, module in nnx.iter_graph(model):
        declared = getattr(type(module), "LORA_WEIGHTS", None)
        if not declared or not isinstance(module, nnx.Module):
            continue
        prefix = "/".join(str(p) for p in path if not isinstance(p, int))
        for weight, (n_group, n_in) in declared.items():
            if isinstance(getattr(module, weight, None), nnx.Param):
                yield Target(f"{prefix}/{weight}" if prefix else weight, module, weight, n_group, n_in)


def _matches(pattern: str, path: str) -> bool:
    return re.fullmatch(f"(?:.*/)?(?:{pattern})", path) is not None


def select_targets(model: nnx.Module, cfg: LoRAConfig) -> list[Target]:
    """The weights `cfg.targets` select; a pattern that matches none is a ConfigError."""
    candidates = list(targetable(model))
    for pattern in cfg.targets:
        if not any(_matches(pattern, t.path) for t in candidates):
            paths = sorted({t.path for t in candidates})
            raise ConfigError(f"model.lora.targets: {pattern!r} matches no weight; the weights LoRA can adapt are "
                              f"{', '.join(paths)} (patterns match whole path components at the end)")
    return [t for t in candidates if any(_matches(p, t.path) for p in cfg.targets)]


def _set_model_config(model: nnx.Module, lora: LoRAConfig | None) -> None:
    """Sets `lora` in the ModelConfig every module of `model` keeps as `cfg`."""
    for _, module in nnx.iter_graph(model):
        cfg = getattr(module, "cfg", None)
        if isinstance(module, nnx.Module) and isinstance(cfg, ModelConfig):
            module.cfg = cfg.replace(lora=lora)


def add_adapters(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> None:
    """Adds an `Adapter` to every weight `cfg.targets` selects, in place (`Decoder` calls this when
    its config has `lora`). A weight in a scanned stack (leading "layers" axis) gets adapters with
    that axis too, each layer its own random A."""
    for target in select_targets(model, cfg):
        weight = getattr(target.module, target.weight)
        axes = tuple(weight.get_metadata().get("out_sharding") or (None,) * weight.ndim)
        value = weight.get_value()
        setattr(target.module, target.weight + ADAPTER_SUFFIX, _make_adapter(cfg, target, value, axes, rngs))


def _make_adapter(cfg: LoRAConfig, target: Target, value: jax.Array, axes: tuple, rngs: nnx.Rngs) -> Adapter:
    """The adapter of one weight; for a stacked weight [L, ...] (axes "layers", ...) L adapters
    stacked the same way, as `LayerStack` builds its blocks."""
    if not (axes and axes[0] == _LAYERS):
        return Adapter(cfg, value.shape, axes, target.n_group, target.n_in, param_dtype=value.dtype, rngs=rngs)

    @nnx.split_rngs(splits=value.shape[0])
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: _LAYERS})
    def make(rngs: nnx.Rngs) -> Adapter:
        return Adapter(cfg, value.shape[1:], axes[1:], target.n_group, target.n_in, param_dtype=value.dtype, rngs=rngs)

    return make(rngs)


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> nnx.Module:
    """A copy of `model` (e.g. from `load_hf_checkpoint`) with adapters on the weights `cfg` targets
    and `cfg` as its config's `lora`; the base weights are shared with `model`."""
    if adapters(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora them first)")
    model = nnx.merge(*nnx.split(model), copy=True)
    _set_model_config(model, cfg)
    add_adapters(model, cfg, rngs)
    return model


def adapters(model: nnx.Module) -> list[tuple[nnx.Module, str, Adapter]]:
    """(module, weight name, adapter) for every adapted weight of `model`."""
    found = []
    for _, module in nnx.iter_graph(model):
        for weight in getattr(type(module), "LORA_WEIGHTS", {}):
            adapter = getattr(module, weight + ADAPTER_SUFFIX, None)
            if isinstance(adapter, Adapter):
                found.append((module, weight, adapter))
    return found


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its weight, W + scale * A B (computed in float32,
    stored in W's dtype), and no adapters left: config `lora=None`, the parameters of the base
    architecture only, ready for `save_hf_checkpoint`. `model` itself is left as it was."""
    merged = nnx.merge(*nnx.split(model), copy=True)
    for module, weight, adapter in adapters(merged):
        base = getattr(module, weight)
        value = base.get_value()
        base.set_value((value.astype(jnp.float32) + adapter.delta()).astype(value.dtype))
        delattr(module, weight + ADAPTER_SUFFIX)
    _set_model_config(merged, None)
    return merged


def reseed_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Sets every adapter's dropout stream from `key` (each adapter and layer its own key), in place.

    The train step can call this on the model it builds for each step with fold_in(seed, step), so
    masks change from step to step however the step treats the streams' counters."""
    for i, (_, _, adapter) in enumerate(adapters(model)):
        if adapter.dropout is None:
            continue
        stream = adapter.dropout.rngs
        old = stream.key.get_value()
        fresh = jax.random.fold_in(key, i)
        stream.key.set_value(jax.random.split(fresh, old.shape) if old.shape else fresh)
        stream.count.set_value(jnp.zeros_like(stream.count.get_value()))


def lora_param_count(model: nnx.Module) -> int:
    """Number of adapter parameters (what LoRA trains)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))

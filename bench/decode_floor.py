"""What a decode step cannot go below on this machine: the step's own matmuls, and one pass of its two
attention products over the KV cache, with nothing else a decode step does (no norms, RoPE, masking,
softmax, sampling, cache writes or loop bookkeeping), run by XLA:CPU and by torch.

`python -m bench.generate --workloads=floor` runs these beside the decode workload (codelm and
`transformers.generate`, same weights) and reports them per decode step, so that a goal such as "2x
transformers' decode tokens/s" can be set against what the kernels themselves take.

A stand-in step of batch B over L layers (per layer: q/k/v/o projections, gate/up/down, and with
`attention` the scores and weighted values of every query head over all S cache slots, in the
matrix-vector form `models.layers.slot_attention` uses for a decode step), then the LM head. Each step
feeds the next (x -> tanh(x + logits[:, :D])), so that no step can be hoisted out of the loop. XLA runs
64 steps in one `fori_loop`, rows split over the local devices as the sampler's (`--cpu_devices`); torch
runs them from Python, as `transformers` does.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class StepShape(NamedTuple):
    batch: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    layers: int
    slots: int  # cache slots attended per step (the decode window)

    @property
    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        d, n, k, h, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        return {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d), "gate": (d, f), "up": (d, f), "down": (f, d)}

    @property
    def matmul_params(self) -> int:
        """The layers' projection and MLP weights and the LM head."""
        return self.layers * sum(a * b for a, b in self.weight_shapes.values()) + self.d_model * self.vocab

    def matmul_flops(self) -> float:
        return 2.0 * self.batch * self.matmul_params

    def weight_bytes(self) -> int:
        return 4 * self.matmul_params

    def cache_bytes(self) -> int:
        """Keys and values of every layer, float32: what one pass of the attention products reads."""
        return 4 * 2 * self.layers * self.batch * self.n_kv_heads * self.slots * self.head_dim


def random_inputs(shape: StepShape, seed: int = 0) -> dict[str, Any]:
    """Float32 numpy arrays: per-layer weights, the LM head, per-layer caches k/v [B, K, S, H], x [B, D]."""
    rng = np.random.default_rng(seed)

    def normal(*dims: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    cache = (shape.batch, shape.n_kv_heads, shape.slots, shape.head_dim)
    return {
        "layers": [{name: normal(*dims) for name, dims in shape.weight_shapes.items()} for _ in range(shape.layers)],
        "head": normal(shape.d_model, shape.vocab),
        "cache": [(normal(*cache, std=1.0), normal(*cache, std=1.0)) for _ in range(shape.layers)],
        "x": normal(shape.batch, shape.d_model, std=1.0),
    }


def jax_step(shape: StepShape, attention: bool, x: jax.Array, layers: list[dict[str, jax.Array]], head: jax.Array,
             cache: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """One stand-in step: x [B, D] -> x [B, D]."""
    b, kv, groups, h = shape.batch, shape.n_kv_heads, shape.n_heads // shape.n_kv_heads, shape.head_dim
    for w, (keys, values) in zip(layers, cache):
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
        if attention:  # per query group: [B, K, H] . [B, K, S, H] -> [B, K, S], then [B, K, S] . [B, K, S, H]
            grouped = q.reshape(b, kv, groups, h)
            heads = [jnp.einsum("bks,bksh->bkh", jnp.einsum("bkh,bksh->bks", grouped[:, :, g], keys), values)
                     for g in range(groups)]
            q = jnp.stack(heads, axis=2).reshape(b, -1)
        x = x + (q + jnp.tile(k + v, groups)) @ w["o"]
        x = x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    return jnp.tanh(x + (x @ head)[:, : shape.d_model])


def torch_step(shape: StepShape, attention: bool, x: torch.Tensor, layers: list[dict[str, torch.Tensor]],
               head: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`jax_step` in torch (batched matmuls for the attention products, as eager torch runs them)."""
    b, kv, groups, h = shape.batch, shape.n_kv_heads, shape.n_heads // shape.n_kv_heads, shape.head_dim
    for w, (keys, values) in zip(layers, cache):
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
        if attention:  # [B, K, G, H] @ [B, K, H, S] -> [B, K, G, S]; @ [B, K, S, H] -> [B, K, G, H]
            scores = q.reshape(b, kv, groups, h) @ keys.transpose(2, 3)
            q = (scores @ values).reshape(b, -1)
        x = x + (q + (k + v).repeat(1, groups)) @ w["o"]
        x = x + (torch.nn.functional.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    return torch.tanh(x + (x @ head)[:, : shape.d_model])


def torch_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """`random_inputs`' arrays as tensors sharing their memory, as `torch_step` takes them (x left out)."""
    return {"layers": [{n: torch.from_numpy(w) for n, w in layer.items()} for layer in inputs["layers"]],
            "head": torch.from_numpy(inputs["head"]),
            "cache": [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in inputs["cache"]]}


def best_seconds(run: Any, repeats: int) -> float:
    """The fastest of `repeats` calls of `run` after one warm-up call (which compiles)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def xla_ms_per_step(shape: StepShape, attention: bool, steps: int = 64, repeats: int = 7) -> float:
    """Best of `repeats` runs of `steps` stand-in steps in one compiled loop, ms per step. With several
    local devices, rows (x and the caches) are split over them and the weights replicated, as the
    sampler runs a data-parallel batch (on as many devices as divide the batch)."""
    devices = math.gcd(shape.batch, jax.device_count())
    local = shape._replace(batch=shape.batch // devices)
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("rows",))
    specs = {"layers": P(), "head": P(), "cache": P("rows")}
    inputs = random_inputs(shape)
    x = jax.device_put(inputs.pop("x"), NamedSharding(mesh, P("rows")))
    inputs = {name: jax.device_put(value, NamedSharding(mesh, specs[name])) for name, value in inputs.items()}

    def loop(x: jax.Array, args: dict[str, Any]) -> jax.Array:
        return jax.lax.fori_loop(0, steps, lambda _, x: jax_step(local, attention, x, **args), x)

    run = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=(P("rows"), specs), out_specs=P("rows")))
    return 1e3 * best_seconds(lambda: jax.block_until_ready(run(x, inputs)), repeats) / steps


def torch_ms_per_step(shape: StepShape, attention: bool, steps: int = 64, repeats: int = 7) -> float:
    inputs = random_inputs(shape)
    args = torch_inputs(inputs)

    def run() -> None:
        x = torch.from_numpy(inputs["x"])
        for _ in range(steps):
            x = torch_step(shape, attention, x, **args)

    with torch.inference_mode():
        return 1e3 * best_seconds(run, repeats) / steps


def memory_read_gb_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Reading `megabytes` of float32 once (a compiled sum): the main-memory bandwidth a step's cache
    and weights stream at when they do not fit the last-level cache."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / best_seconds(lambda: jax.block_until_ready(total(x)), repeats) / 1e9


def floor_report(shape: StepShape, repeats: int = 7) -> dict[str, Any]:
    """The stand-in's ms per step by XLA and torch, with and without the attention products, and what a
    step moves and computes."""
    report: dict[str, Any] = {"shape": shape._asdict(), "xla_devices": math.gcd(shape.batch, jax.device_count())}
    for name, attention in (("matmuls", False), ("matmuls_and_attention", True)):
        report[f"xla_{name}_ms_per_step"] = xla_ms_per_step(shape, attention, repeats=repeats)
        report[f"torch_{name}_ms_per_step"] = torch_ms_per_step(shape, attention, repeats=repeats)
    flops = shape.matmul_flops()
    report.update(
        matmul_gflop_per_step=flops / 1e9,
        xla_matmul_gflops_per_s=flops / report["xla_matmuls_ms_per_step"] / 1e6,
        weight_megabytes=shape.weight_bytes() / 1e6,
        cache_megabytes=shape.cache_bytes() / 1e6,
        memory_read_gb_per_s=memory_read_gb_per_s(),
    )
    report["cache_read_ms_at_memory_bandwidth"] = shape.cache_bytes() / report["memory_read_gb_per_s"] / 1e6
    return report

"""Training-step throughput: forward + backward + AdamW update of a preset on whatever devices exist.

    python -m bench.train_step --preset=tiny --batch=16 --seq=256
    python -m bench.train_step --preset=llama-1.5b --batch=64 --seq=2048 --mesh=fsdp=-1 --dtype=bfloat16

Prints one JSON object: step time, tokens/s (total and per device) and MFU, where
MFU = flops_per_token(seq) * tokens/s / (devices * peak FLOP/s per device) and flops_per_token is
`ModelConfig.flops_per_token`: 6 * N_matmul + 12 * layers * heads * head_dim * seq (PaLM appendix B).
Peak FLOP/s comes from the device's datasheet (train/metrics.py) or --peak_tflops; a CPU has none
published, so its MFU is null unless given.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from configs import base
from configs.sharding_rules import RULE_SETS
from models.config import ModelConfig, get_preset
from models.decoder import Decoder
from models.sharding import make_mesh, sharding_context
from train.metrics import peak_flops_per_device
from train.optimizer import make_optimizer
from train.state import init_train_state
from train.step import make_train_step, next_token_loss


def parse_mesh(spec: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in spec.split(",") if part)}


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(1, batch, seq + 1), dtype=np.int32)
    return {
        "inputs": tokens[..., :-1], "targets": tokens[..., 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (1, batch, seq)).copy(),
        "segment_ids": np.ones((1, batch, seq), np.int32), "loss_mask": np.ones((1, batch, seq), np.float32),
    }


def time_train_step(cfg: ModelConfig, mesh: Mesh, rules: Any, *, batch: int, seq: int, steps: int, warmup: int,
                    trainable: Any = nnx.Param, cpu_times: list[float] | None = None
                    ) -> tuple[float, list[float], dict[str, Any]]:
    """Runs the jitted train step (AdamW over `trainable`, donated state) of `cfg` on `mesh` on one
    synthetic batch: (compile + first step seconds, per-step seconds after `warmup`, last metrics).
    `cpu_times`, when given, gets each timed step's process CPU seconds (all threads) appended: on a
    shared machine, less sensitive to other work than the wall time."""
    optim = base.get_config().optim
    graphdef, state, tx, shardings = init_train_state(
        lambda: Decoder(cfg, rngs=nnx.Rngs(0)), lambda p: make_optimizer(optim, 1000, p)[0], mesh, rules,
        trainable=trainable,
    )
    with sharding_context(mesh, rules):
        step = jax.jit(make_train_step(graphdef, tx, next_token_loss, trainable=trainable), donate_argnums=0,
                       in_shardings=(shardings, None), out_shardings=(shardings, None))
        inputs = jax.device_put(synthetic_batch(batch, seq, cfg.vocab_size))
        start = time.perf_counter()
        state, metrics = step(state, inputs)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = step(state, inputs)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            state, metrics = step(state, inputs)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - cpu_start)
    return compile_s, times, metrics


def measure(cfg: ModelConfig, mesh: Mesh, rules: Any, *, batch: int, seq: int, steps: int, warmup: int,
            peak_tflops: float = 0.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Times the jitted train step (AdamW, donated state) of `cfg` on `mesh`.

    Returns (figures, the last step's metrics): compile time, median and p90 step time, tokens/s,
    achieved TFLOP/s per device from `cfg.flops_per_token(seq)`, and MFU when the peak is known.
    """
    compile_s, times, metrics = time_train_step(cfg, mesh, rules, batch=batch, seq=seq, steps=steps, warmup=warmup)
    step_s = float(np.median(times))
    tokens_per_s = batch * seq / step_s
    n_dev = mesh.size
    peak = peak_flops_per_device(peak_tflops)
    achieved = cfg.flops_per_token(seq) * tokens_per_s
    figures = {
        "compile_plus_first_step_s": round(compile_s, 2),
        "step_time_s": round(step_s, 4),
        "step_time_p90_s": round(float(np.percentile(times, 90)), 4),
        "tokens_per_sec": round(tokens_per_s, 1),
        "tokens_per_sec_per_device": round(tokens_per_s / n_dev, 1),
        "flops_per_token": cfg.flops_per_token(seq),
        "achieved_tflops_per_device": round(achieved / n_dev / 1e12, 4),
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": round(achieved / (n_dev * peak), 4) if peak else None,
        "final_loss": round(float(metrics["loss"]), 4),
    }
    return figures, jax.device_get(metrics)


def run(args: argparse.Namespace) -> dict:
    overrides = {k: v for k, v in {"dtype": args.dtype, "remat": args.remat, "attention_impl": args.attention}.items() if v}
    cfg = get_preset(args.preset, **overrides)
    mesh = make_mesh(parse_mesh(args.mesh))
    figures, _ = measure(cfg, mesh, RULE_SETS[args.rules], batch=args.batch, seq=args.seq, steps=args.steps,
                         warmup=args.warmup, peak_tflops=args.peak_tflops)
    return {
        "benchmark": "train_step",
        "preset": cfg.name,
        "params": cfg.param_count(),
        "dtype": cfg.dtype,
        "remat": cfg.remat,
        "batch": args.batch,
        "seq": args.seq,
        "mesh": {k: v for k, v in mesh.shape.items() if v > 1},
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "flop_formula": "6*N_matmul + 12*n_layers*n_heads*head_dim*seq",
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mesh", default="fsdp=-1", help="ICI axis sizes, e.g. fsdp=4,tensor=2")
    parser.add_argument("--rules", default="default", choices=sorted(RULE_SETS))
    parser.add_argument("--dtype", default="", help="compute dtype override (float32, bfloat16)")
    parser.add_argument("--remat", default="", help="remat policy override")
    parser.add_argument("--attention", default="", help="attention kernel override (xla, cudnn)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak TFLOP/s per device, for MFU on CPUs")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()

"""MoE training-step speed: an MoE preset under both execution paths against a dense model with the
same active parameters, each a full forward + backward + AdamW step.

    python -m bench.moe_step --preset=mixtral-tiny --batch=8 --seq=256
    python -m bench.moe_step --preset=qwen3-30b-a3b --batch=16 --seq=4096 --mesh=fsdp=-1,expert=8 --dtype=bfloat16

The dense twin keeps every shape of the MoE model except its feed-forward: each layer gets one MLP
whose width makes the model's active parameter count match (MoE active = K routed + shared experts
+ router per MoE layer). MFU = flops_per_token(seq) * tokens/s / (devices * peak FLOP/s), where
`ModelConfig.flops_per_token` counts active parameters (6 * N_active_matmul + attention). Peak FLOP/s
comes from the device's datasheet (train/metrics.py) or --peak_tflops; a CPU has none published, so
MFU is null there unless given. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import jax
import numpy as np

from bench.train_step import measure, parse_mesh
from configs.sharding_rules import RULE_SETS
from models.config import ModelConfig, get_preset
from models.sharding import make_mesh


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The MoE model with every feed-forward replaced by one dense MLP of equal active parameters."""
    params_per_unit_width = (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model  # per layer, bias-free MLP
    non_ffn = cfg.replace(moe=None, d_ff=1).param_count() - cfg.n_layers * params_per_unit_width
    active_ffn = cfg.param_count(active=True) - non_ffn
    d_ff = round(active_ffn / (cfg.n_layers * params_per_unit_width))
    return cfg.replace(name=f"{cfg.name}-dense-twin", moe=None, d_ff=d_ff)


def time_steps(cfg: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Median step time and what it means for one model config."""
    mesh = make_mesh(parse_mesh(args.mesh))
    figures, metrics = measure(cfg, mesh, RULE_SETS[args.rules], batch=args.batch, seq=args.seq, steps=args.steps,
                               warmup=args.warmup, peak_tflops=args.peak_tflops)
    result = {
        "model": cfg.name,
        "impl": cfg.moe.impl if cfg.moe else "dense",
        "total_params": cfg.param_count(),
        "active_params": cfg.param_count(active=True),
        **figures,
    }
    if cfg.moe:
        result.update(grouped_matmul=cfg.moe.grouped_matmul if cfg.moe.impl == "dropless" else None,
                      capacity_factor=cfg.moe.capacity_factor if cfg.moe.impl == "capacity" else None,
                      dropped_fraction=round(float(np.mean(metrics["moe/dropped_fraction"])), 4),
                      load_max_mean_ratio=round(float(np.mean(metrics["moe/load_max_mean_ratio"])), 3))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mixtral-tiny", help="an MoE preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mesh", default="fsdp=-1", help="ICI axis sizes, e.g. fsdp=2,expert=4")
    parser.add_argument("--rules", default="default", choices=sorted(RULE_SETS))
    parser.add_argument("--dtype", default="", help="compute dtype override (float32, bfloat16)")
    parser.add_argument("--grouped_matmul", default="", help="dropless kernel override (auto, ragged_dot, tiled)")
    parser.add_argument("--capacity_factor", type=float, default=0.0, help="capacity path override")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="peak TFLOP/s per device, for MFU on CPUs")
    args = parser.parse_args()

    cfg = get_preset(args.preset, **({"dtype": args.dtype} if args.dtype else {}))
    if cfg.moe is None:
        parser.error(f"--preset={args.preset} has no MoE layers")
    moe_overrides = {k: v for k, v in {"grouped_matmul": args.grouped_matmul, "capacity_factor": args.capacity_factor}.items() if v}
    variants = [dense_twin(cfg)] + [
        cfg.replace(moe=dataclasses.replace(cfg.moe, impl=impl, **moe_overrides)) for impl in ("dropless", "capacity")
    ]
    results = []
    for variant in variants:
        results.append(time_steps(variant, args))
        print(f"[moe_step] {results[-1]['model']} {results[-1]['impl']}: {results[-1]['step_time_s']} s/step", flush=True)
    dense_s = results[0]["step_time_s"]
    print(json.dumps({
        "benchmark": "moe_step",
        "preset": cfg.name,
        "dtype": cfg.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "mesh": args.mesh,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "flop_formula": "flops_per_token(seq) = 6*N_active_matmul + sum over layers of 6*n_heads*(qk_head_dim + v_head_dim)*min(seq, window)",
        "results": results,
        "step_time_vs_dense": {r["impl"]: round(r["step_time_s"] / dense_s, 2) for r in results[1:]},
    }, indent=2))


if __name__ == "__main__":
    main()

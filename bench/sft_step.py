"""SFT step throughput, full fine-tuning vs LoRA, side by side in one run.

    python -m bench.sft_step --preset=tiny --batch=8 --seq=256 --rank=16

Both variants run the shared train step (`train.step.make_train_step`, AdamW, donated state) on the
same model and batch; full trains every nnx.Param, LoRA only the adapters (`nnx.LoRAParam`, default
targets: every projection and expert matrix). Prints one JSON object with tokens/s and MFU of each.

FLOPs per token (N = `ModelConfig.matmul_params_per_token()`, active base weights with the LM head;
N_lora = the adapter parameters a token uses, routed experts' adapters counted for the K chosen of E;
attention = 12 * n_layers * n_heads * head_dim * seq, PaLM appendix B):
  full: 6 N + attention                 (forward 2N, backward 2N for activations + 2N for weights)
  lora: 4 N + 6 N_lora + attention      (the frozen weights need activation gradients but no weight
                                         gradients, so LoRA's backward skips 2N; the adapters cost 6 N_lora)
`mfu` uses each variant's own count (the work the step has to do); `mfu_6n` uses 6 N + attention for
both, the usual model-FLOPs convention, so LoRA's `mfu_6n` shows the speedup as if it were work.
Peak FLOP/s: the datasheet value (train/metrics.py) or --peak_tflops; on a CPU, which has no
published peak, it is measured here as the best float32 [2048, 2048] matmul rate over all devices.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.train_step import parse_mesh, time_train_step
from configs.sharding_rules import RULE_SETS
from models import lora
from models.config import LoRAConfig, ModelConfig, get_preset
from models.decoder import Decoder
from models.sharding import make_mesh
from train.metrics import peak_flops_per_device


def measured_cpu_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 matmul FLOP/s of one device (used as the peak where no datasheet exists)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def adapter_params_per_token(model: nnx.Module, cfg: ModelConfig) -> float:
    """Adapter parameters one token multiplies by: all dense adapters, K / E of each expert adapter."""
    total = 0.0
    for _, _, adapter in lora.adapters(model):
        size = adapter.a.get_value().size + adapter.b.get_value().size
        if adapter.n_group and cfg.moe is not None:
            size *= cfg.moe.experts_per_token / cfg.moe.num_experts
        total += size
    return total


def time_steps(cfg: ModelConfig, trainable: Any, mesh: Any, rules: Any, batch: int, seq: int, steps: int,
               warmup: int) -> tuple[float, float, float]:
    """(compile + first step s, median step s, final loss) of the train step training `trainable`."""
    compile_s, times, metrics = time_train_step(cfg, mesh, rules, batch=batch, seq=seq, steps=steps, warmup=warmup,
                                                trainable=trainable)
    return compile_s, float(np.median(times)), float(metrics["loss"])


def run(args: argparse.Namespace) -> dict:
    cfg = get_preset(args.preset, **({"dtype": args.dtype} if args.dtype else {}))
    lora_cfg = cfg.replace(lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    mesh = make_mesh(parse_mesh(args.mesh))
    rules = RULE_SETS[args.rules]
    peak = peak_flops_per_device(args.peak_tflops)
    peak_source = "datasheet or --peak_tflops"
    if peak is None:
        peak, peak_source = measured_cpu_peak_flops(), "measured float32 2048^3 matmul on this device"

    n = cfg.matmul_params_per_token()
    attention = cfg.flops_per_token(args.seq) - 6.0 * n
    abstract_lora = nnx.eval_shape(lambda: Decoder(lora_cfg, rngs=nnx.Rngs(0)))
    n_lora = adapter_params_per_token(abstract_lora, cfg)
    variants = {  # name: (config, trainable filter, trainable parameters, FLOPs per token)
        "full": (cfg, nnx.Param, cfg.param_count(), 6.0 * n + attention),
        "lora": (lora_cfg, nnx.LoRAParam, lora.lora_param_count(abstract_lora), 4.0 * n + 6.0 * n_lora + attention),
    }
    results = {}
    for name, (model_cfg, trainable, n_trainable, flops_per_token) in variants.items():
        compile_s, step_s, loss = time_steps(model_cfg, trainable, mesh, rules, args.batch, args.seq, args.steps,
                                             args.warmup)
        tokens_per_s = args.batch * args.seq / step_s
        results[name] = {
            "trainable_params": n_trainable,
            "compile_plus_first_step_s": round(compile_s, 2),
            "step_time_s": round(step_s, 4),
            "tokens_per_sec": round(tokens_per_s, 1),
            "flops_per_token": flops_per_token,
            "mfu": round(flops_per_token * tokens_per_s / (mesh.size * peak), 4),
            "mfu_6n": round(cfg.flops_per_token(args.seq) * tokens_per_s / (mesh.size * peak), 4),
            "final_loss": round(loss, 4),
        }
    return {
        "benchmark": "sft_step",
        "preset": cfg.name,
        "params": cfg.param_count(),
        "lora_rank": args.rank,
        "lora_targets": list(lora_cfg.lora.targets),
        "dtype": cfg.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "devices": mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "peak_tflops_per_device": round(peak / 1e12, 4),
        "peak_source": peak_source,
        "flop_formula": {"full": "6*N + 12*n_layers*n_heads*head_dim*seq",
                         "lora": "4*N + 6*N_lora + 12*n_layers*n_heads*head_dim*seq"},
        **results,
        "lora_speedup": round(results["full"]["step_time_s"] / results["lora"]["step_time_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="")
    parser.add_argument("--mesh", default="fsdp=-1")
    parser.add_argument("--rules", default="default")
    parser.add_argument("--peak_tflops", type=float, default=0.0)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()

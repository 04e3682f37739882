"""codelm's train step vs PyTorch `transformers` on the same Llama-style model, from one run.

    python -m bench.train_step_vs_torch                      # the reference shape, 3 rounds
    python -m bench.train_step_vs_torch --shape=quickstart   # the quickstart's model and batch

Both sides train the same model (same parameter count, checked) on random tokens in float32 with
AdamW: codelm's jitted shared train step (`bench.train_step.time_train_step`, donated state) and
`transformers.LlamaForCausalLM` (its default SDPA attention) with `torch.optim.AdamW`, forward +
backward + update per step. Each measurement runs in a fresh process and the two alternate round by
round (codelm, torch, codelm, torch, ...), so load from other work on a shared machine falls on both;
the ratio is of the medians over rounds. Each side also reports its process CPU seconds per step
(all threads; median over rounds): their ratio, as tokens per CPU second of codelm over torch, is
distorted less by other work on a shared machine than the wall-clock one. Prints one JSON object
with the per-round figures, the medians, the ratios and the 1-minute load average before and after.

Shapes:
  reference   vocab 8192 untied, d_model 256, SwiGLU 704, 4 layers, 8 heads / 4 KV heads, RMSNorm,
              seq 512, batch 8 (7,145,728 parameters)
  quickstart  the `tiny` preset (configs/quickstart.py): tied vocab 8192, d_model 256, SwiGLU 768,
              4 layers, 4 heads / 2 KV heads, seq 256, batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

SHAPES: dict[str, dict[str, Any]] = {
    "reference": {"vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "d_ff": 704,
                  "tie_embeddings": False, "batch": 8, "seq": 512},
    "quickstart": {"vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 768,
                   "tie_embeddings": True, "batch": 16, "seq": 256},
}
NORM_EPS = 1e-6
ROPE_THETA = 10000.0


def _model_fields(shape: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in shape.items() if k not in ("batch", "seq")}


def run_codelm(shape: dict[str, Any], steps: int, warmup: int, overrides: dict[str, Any]) -> dict[str, Any]:
    from bench.train_step import time_train_step  # noqa: PLC0415  (the torch worker never imports JAX)
    from configs.sharding_rules import RULE_SETS  # noqa: PLC0415
    from models.config import ModelConfig  # noqa: PLC0415
    from models.sharding import make_mesh  # noqa: PLC0415

    cfg = ModelConfig(name="bench", **_model_fields(shape), norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
                      max_seq_len=shape["seq"], dtype="float32", param_dtype="float32", remat="none")
    cfg = cfg.replace(**overrides)
    cpu_times: list[float] = []
    compile_s, times, metrics = time_train_step(cfg, make_mesh({"fsdp": -1}), RULE_SETS["default"],
                                                batch=shape["batch"], seq=shape["seq"], steps=steps, warmup=warmup,
                                                cpu_times=cpu_times)
    return {"params": cfg.param_count(), "compile_plus_first_step_s": round(compile_s, 2), "step_times_s": times,
            "step_cpu_s": cpu_times, "final_loss": float(metrics["loss"])}


def run_torch(shape: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], tie_word_embeddings=shape["tie_embeddings"],
        max_position_embeddings=shape["seq"], rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, shape["vocab_size"], (shape["batch"], shape["seq"]), dtype=np.int64))

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"params": sum(p.numel() for p in model.parameters()), "compile_plus_first_step_s": round(first_s, 2),
            "step_times_s": times, "step_cpu_s": cpu_times, "final_loss": loss,
            "torch_threads": torch.get_num_threads()}


def _worker(args: argparse.Namespace) -> None:
    shape = SHAPES[args.shape]
    if args.worker == "codelm":
        out = run_codelm(shape, args.steps, args.warmup, json.loads(args.overrides))
    else:
        out = run_torch(shape, args.steps, args.warmup)
    print(json.dumps(out))


def _spawn(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.train_step_vs_torch", f"--worker={impl}", f"--shape={args.shape}",
           f"--steps={args.steps}", f"--warmup={args.warmup}", f"--overrides={args.overrides}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{impl} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    per_round = [tokens_per_step / float(np.median(r["step_times_s"])) for r in runs]
    return {
        "tokens_per_sec": round(float(np.median(per_round)), 1),
        "tokens_per_sec_per_round": [round(x, 1) for x in per_round],
        "step_time_s": round(tokens_per_step / float(np.median(per_round)), 4),
        "step_cpu_s": round(float(np.median([np.median(r["step_cpu_s"]) for r in runs])), 4),
        "compile_plus_first_step_s": runs[-1]["compile_plus_first_step_s"],
        "params": runs[-1]["params"],
        "final_loss": round(runs[-1]["final_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="reference", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process pairs (codelm then torch)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--overrides", default="{}", help='codelm ModelConfig overrides as JSON, e.g. {"scan_layers": false}')
    parser.add_argument("--worker", choices=("codelm", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    shape = SHAPES[args.shape]
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {"codelm": [], "torch": []}
    for _ in range(args.rounds):
        for impl in runs:
            runs[impl].append(_spawn(impl, args))
    tokens = shape["batch"] * shape["seq"]
    codelm, torch_ = _summary(runs["codelm"], tokens), _summary(runs["torch"], tokens)
    if codelm["params"] != torch_["params"]:
        raise RuntimeError(f"parameter counts differ: codelm {codelm['params']}, torch {torch_['params']}")
    print(json.dumps({
        "benchmark": "train_step_vs_torch",
        "shape": {"name": args.shape, **shape},
        "codelm_overrides": json.loads(args.overrides),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "codelm": codelm,
        "torch": {**torch_, "threads": runs["torch"][-1]["torch_threads"]},
        "ratio_codelm_over_torch": round(codelm["tokens_per_sec"] / torch_["tokens_per_sec"], 3),
        "cpu_ratio_codelm_over_torch": round(torch_["step_cpu_s"] / codelm["step_cpu_s"], 3),
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()

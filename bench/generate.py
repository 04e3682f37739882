"""Generation speed: codelm's sampler against `transformers`' own `generate`, same weights, same
workloads, same machine, one run.

    python -m bench.generate                                  # tiny Llama, CPU: ~5 minutes
    python -m bench.generate --workloads=decode --family=qwen3_moe --d_model=512 --n_layers=8 --prompt_len=256
    python -m bench.generate --workloads=profile --profile_out=results/sampler_profile   # per-op decode step
    taskset -c 0 python -m bench.generate --workloads=ab --ab_base=HEAD                 # this checkout vs HEAD
    python -m bench.generate --workloads=floor --cpu_devices=2   # decode beside the bare matmuls / attention of its step

A random model of `--family` is built with transformers, saved as an HF checkpoint and imported into
codelm (so both run identical float32 weights). Workloads (`--workloads`):

decode  `--batch` prompts of random tokens, lengths drawn from [prompt_len / 2, prompt_len], greedy,
        exactly `--new_tokens` new tokens each (no EOS). Prefill tokens/s = real prompt tokens /
        prefill time; decode tokens/s = generated tokens / decode time. transformers' prefill is one
        forward pass over the left-padded batch with a cache; its decode time is `generate`'s time
        minus that. Also: the fraction of sequences whose greedy tokens agree exactly (float32
        rounding can flip near-ties).
rl      RL rollouts: `--rl_prompts` prompts x `--rl_samples` samples each (temperature 1, no top-k /
        top-p), at most `--rl_new_tokens` new tokens, prompt lengths as above. Response lengths vary:
        1 / `--rl_eos_every` of the vocabulary are EOS ids (passed to both: `stop_token_ids`, and
        `eos_token_id` for transformers), and the model's LM head is scaled so that its next-token
        distribution is broad (logit std ~1, like a policy early in RL); the generated-length
        distribution is reported. samples/s = prompts x samples / wall time of the whole call;
        transformers runs `generate(num_return_sequences=samples)` over all prompts at once.

ab      Before / after a sampler change: the decode workload's sampler as of git `--ab_base` (A, from a
        `git archive` of configs/, data/, models/ imported beside this checkout's) against this
        checkout's (B), same weights and prompts, `--ab_rounds` calls each, interleaved (A B, B A, ...)
        in one process, so that the machine's load hits both alike: process CPU and wall seconds in
        the decode programs (and the per-call weight cut) per decode step (medians), B / A, and whether
        the greedy tokens agree. CPU seconds are the load-robust figure (under `taskset -c 0` they are
        the work; with both cores they also count the threads' parallel work and spinning).
profile Where a decode step's time goes: the decode workload (`--profile_sampling=greedy`) or the RL
        workload's sampling (`temperature`), one codelm call under `jax.profiler`; every XLA:CPU thunk
        event of the decode loop is matched to its instruction in the compiled HLO and put in a
        category by its ops and Python call stack (`bench.train_step_profile.parse_hlo`). Per-op
        times are wall times of the thunks (two CPU threads may overlap); the JSON has ms per decode
        step by category and the top ops, and `--profile_out` also writes it as a markdown table.
floor   The decode workload, then `bench.decode_floor`'s stand-in steps of the same model, batch and cache
        window: the step's bare matmuls, and those plus one pass of the attention products over the
        cache, compiled by XLA and run by torch; with ms per decode step of codelm and transformers, and
        XLA's stand-in over half of transformers' step (a 2x goal needs codelm's whole step below that).

On a GPU (JAX's platform "gpu"), transformers runs on CUDA too (`--torch_device`), with TF32 matmuls
like XLA's default float32 dots there.

`--cpu_devices=N` runs codelm on N CPU devices (`jax_num_cpu_devices`), the rows data-parallel over them
(weights replicated): XLA:CPU runs one op at a time and splits only large ones over threads, so on a
2-core machine one device per core is what puts both cores on a decode step's many small ops.

Times are medians over `--repeats` runs after a warm-up run (which compiles codelm's programs).
FLOP method: model FLOPs per generated token = 2 x (matmul parameters, LM head included, embedding
lookup excluded) + 4 x layers x query heads x head_dim x mean attended context (QK^T and PV);
achieved GFLOP/s = decode tokens/s x that. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

from bench import decode_floor
from bench.train_step_profile import parse_hlo
from configs.sharding_rules import DEFAULT_RULES
from models import sampler as sampler_module
from models.hf import load_hf_checkpoint, reference
from models.sampler import Sampler
from models.sharding import make_mesh

TORCH_DEVICE = torch.device("cpu")  # where transformers runs: set once by main() from --torch_device


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if TORCH_DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as transformers recommends for generation
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return ids.to(TORCH_DEVICE), mask.to(TORCH_DEVICE)


def flops_per_token(cfg: Any, context: float) -> float:
    """Forward FLOPs of one token attending to `context` positions (module docstring)."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
    matmul_params = cfg.n_layers * per_layer + d * cfg.vocab_size
    return 2.0 * matmul_params + 4.0 * cfg.n_layers * n * h * context


def length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths)
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "max": int(values.max()), "min": int(values.min())}


def codelm_sampler(directory: str, max_len: int) -> Sampler:
    """codelm's sampler of the checkpoint, on every local device: with several (`--cpu_devices`), rows
    are data-parallel over them and the weights replicated."""
    if jax.device_count() == 1:
        return Sampler(load_hf_checkpoint(directory, remat="none"), max_len=max_len)
    mesh = make_mesh({"data": jax.device_count()})
    return Sampler(load_hf_checkpoint(directory, remat="none", mesh=mesh), max_len=max_len, mesh=mesh, rules=DEFAULT_RULES)


# ---- decode workload ------------------------------------------------------------------------------------


def decode_codelm(directory: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    sampler = codelm_sampler(directory, max_len=max(map(len, prompts)) + new_tokens)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sampler.generate(prompts, new_tokens)  # compiles
    warmup_seconds = time.perf_counter() - start
    runs = [sampler.generate(prompts, new_tokens) for _ in range(repeats)]
    prefill = statistics.median(r.timing["prefill_seconds"] for r in runs)
    decode = statistics.median(r.timing["decode_seconds"] for r in runs)
    prompt_tokens = runs[0].timing["prompt_tokens"]
    generated = runs[0].timing["generated_tokens"]
    context = float(np.mean([len(p) for p in prompts])) + new_tokens / 2
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": generated / decode,
        "decode_gflops_per_s": generated / decode * flops_per_token(sampler.cfg, context) / 1e9,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "load_seconds": load_seconds,
        "first_call_seconds_with_compilation": warmup_seconds,
        "tokens": runs[0].tokens,
        "flops_per_token": flops_per_token(sampler.cfg, context),
    }


def decode_transformers(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    ids, mask = left_padded(prompts)
    generate_kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        output = model.generate(ids, **generate_kwargs)  # warm-up
        prefill = median_seconds(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True), repeats)
        total = median_seconds(lambda: model.generate(ids, **generate_kwargs), repeats)
    prompt_tokens = sum(map(len, prompts))
    decode = total - prefill
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": len(prompts) * new_tokens / decode,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "tokens": output[:, ids.shape[1]:].tolist(),
    }


def decode_workload(args: argparse.Namespace, shape: dict[str, int], directory: str) -> dict[str, Any]:
    hf_model = reference.random_model(args.family, **shape)
    hf_model.save_pretrained(directory)
    prompts = make_prompts(args.batch, args.prompt_len, args.vocab)
    ours = decode_codelm(directory, prompts, args.new_tokens, args.repeats)
    theirs = decode_transformers(hf_model.to(TORCH_DEVICE), prompts, args.new_tokens, args.repeats)
    agree = np.mean([a == b for a, b in zip(ours.pop("tokens"), theirs.pop("tokens"))])
    theirs["decode_gflops_per_s"] = theirs["decode_tokens_per_s"] * ours["flops_per_token"] / 1e9
    return {
        "workload": {"batch": args.batch, "prompt_tokens": sum(map(len, prompts)),
                     "prompt_len_range": [min(map(len, prompts)), max(map(len, prompts))],
                     "new_tokens_per_sequence": args.new_tokens, "sampling": "greedy", "repeats": args.repeats},
        "codelm": ours,
        "transformers": theirs,
        "ratio_codelm_over_transformers": {
            "prefill": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
            "decode": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
        },
        "greedy_sequences_identical_fraction": float(agree),
    }


def floor_workload(args: argparse.Namespace, shape: dict[str, int], directory: str) -> dict[str, Any]:
    """The decode workload beside `bench.decode_floor`'s stand-in steps of the same model and batch: ms
    per decode step of codelm, of transformers, and of the step's bare matmuls (and attention products)
    run by XLA and by torch."""
    decode = decode_workload(args, shape, directory)
    slots = decode["workload"]["prompt_len_range"][1] + args.new_tokens
    step = decode_floor.StepShape(batch=args.batch, d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                                  head_dim=args.d_model // args.n_heads, d_ff=args.d_ff, vocab=args.vocab,
                                  layers=args.n_layers, slots=slots)
    floor = decode_floor.floor_report(step)
    ms = {name: 1e3 * args.batch / decode[name]["decode_tokens_per_s"] for name in ("codelm", "transformers")}
    return {
        "decode": decode,
        "floor": floor,
        "ms_per_decode_step": {**ms, "half_of_transformers": ms["transformers"] / 2},
        "xla_floor_over_half_of_transformers": {
            name: floor[f"xla_{name}_ms_per_step"] / (ms["transformers"] / 2) for name in ("matmuls", "matmuls_and_attention")},
    }


# ---- RL workload ----------------------------------------------------------------------------------------


def rl_workload(args: argparse.Namespace, shape: dict[str, int], directory: str) -> dict[str, Any]:
    hf_model = reference.random_model(args.family, seed=1, **shape)
    with torch.no_grad():  # a broad next-token distribution: logit std ~1
        hf_model.get_output_embeddings().weight.mul_(1.0 / (0.3 * args.d_model**0.5))
    hf_model.save_pretrained(directory)
    hf_model.to(TORCH_DEVICE)
    prompts = make_prompts(args.rl_prompts, args.prompt_len, args.vocab, seed=1)
    eos = list(range(1, args.vocab, args.rl_eos_every))
    n, new_tokens = args.rl_samples, args.rl_new_tokens
    total = len(prompts) * n

    sampler = codelm_sampler(directory, max_len=max(map(len, prompts)) + new_tokens)

    def ours(seed: int) -> Any:
        return sampler.generate(prompts, new_tokens, n=n, temperature=1.0, stop_token_ids=eos, seed=seed)

    start = time.perf_counter()
    ours(0)  # compiles
    warmup = time.perf_counter() - start
    times, outputs = [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        outputs.append(ours(1 + repeat))
        times.append(time.perf_counter() - start)
    ours_seconds = statistics.median(times)
    out = outputs[0]

    ids, mask = left_padded(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  num_return_sequences=n, pad_token_id=0, eos_token_id=eos)
    hf_lengths: list[int] = []
    with torch.inference_mode():
        torch.manual_seed(0)
        model_generate = hf_model.generate(ids, **kwargs)  # warm-up
        hf_seconds = median_seconds(lambda: hf_model.generate(ids, **kwargs), args.repeats)
    eos_set = set(eos)
    for row in model_generate[:, ids.shape[1]:].tolist():
        hit = next((i for i, t in enumerate(row) if t in eos_set), None)
        hf_lengths.append(len(row) if hit is None else hit + 1)
    generated = float(out.lengths.sum())
    return {
        "workload": {"prompts": len(prompts), "samples_per_prompt": n, "max_new_tokens": new_tokens,
                     "prompt_len_range": [min(map(len, prompts)), max(map(len, prompts))],
                     "sampling": "temperature 1", "eos_ids": f"{len(eos)} of {args.vocab} (every {args.rl_eos_every}th)",
                     "repeats": args.repeats},
        "codelm": {
            "samples_per_s": total / ours_seconds,
            "generated_tokens_per_s": generated / ours_seconds,
            "seconds": ours_seconds,
            "first_call_seconds_with_compilation": warmup,
            "generated_lengths": length_stats(out.lengths.tolist()),
            "timing": out.timing,
        },
        "transformers": {
            "samples_per_s": total / hf_seconds,
            "seconds": hf_seconds,
            "generated_lengths": length_stats(hf_lengths),
        },
        "ratio_codelm_over_transformers": {"samples_per_s": hf_seconds / ours_seconds},
    }


# ---- A/B of the decode program ----------------------------------------------------------------------------

SNAPSHOT_PACKAGES = ("configs", "data", "models")  # what the sampler imports of the repository


def snapshot_modules(ref: str, directory: str) -> tuple[Any, Callable[..., Any]]:
    """(models.sampler, models.hf.load_hf_checkpoint) as of git `ref`, imported from a `git archive` of
    it into `directory` under their own names; this checkout's modules are back in sys.modules after
    (the snapshot's keep theirs: dense models only, as MoE blocks import models.moe lazily)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", ref, *SNAPSHOT_PACKAGES], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)

    def ours() -> dict[str, Any]:
        return {name: module for name, module in sys.modules.items() if name.split(".")[0] in SNAPSHOT_PACKAGES}

    saved = ours()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, directory)
    try:
        module, hf = importlib.import_module("models.sampler"), importlib.import_module("models.hf")
    finally:
        sys.path.remove(directory)
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)
    return module, hf.load_hf_checkpoint


def timed_decode_calls(module: Any, load: Callable[..., Any], directory: str, prompts: list[list[int]],
                       new_tokens: int) -> Callable[[], tuple[float, float, list[list[int]]]]:
    """A `generate` call of `module`'s Sampler (compiled here) -> (process CPU ms, wall ms inside its
    decode programs per decode step, tokens). The decode programs: `_decode`, and `_cut_layers` (the
    per-call weight cut) where the sampler has it."""
    sampler = module.Sampler(load(directory, remat="none"), max_len=max(map(len, prompts)) + new_tokens)
    spent = {"cpu": 0.0, "wall": 0.0}

    def counted(program: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            out = jax.block_until_ready(program(*args, **kwargs))
            spent["cpu"] += time.process_time() - cpu
            spent["wall"] += time.perf_counter() - wall
            return out

        return run

    for name in ("_decode", "_cut_layers"):
        if hasattr(module, name):
            setattr(module, name, counted(getattr(module, name)))

    def call() -> tuple[float, float, list[list[int]]]:
        spent["cpu"] = spent["wall"] = 0.0
        out = sampler.generate(prompts, new_tokens)
        steps = out.timing["decode_steps"]
        return spent["cpu"] / steps * 1e3, spent["wall"] / steps * 1e3, out.tokens

    call()  # compiles
    return call


def ab_workload(args: argparse.Namespace, shape: dict[str, int], directory: str) -> dict[str, Any]:
    hf_model = reference.random_model(args.family, **shape)
    hf_model.save_pretrained(directory)
    prompts = make_prompts(args.batch, args.prompt_len, args.vocab)
    with tempfile.TemporaryDirectory() as tree:
        calls = {"A": timed_decode_calls(*snapshot_modules(args.ab_base, tree), directory, prompts, args.new_tokens),
                 "B": timed_decode_calls(sampler_module, load_hf_checkpoint, directory, prompts, args.new_tokens)}
    figures: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    tokens = {}
    for round_ in range(args.ab_rounds):
        for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
            cpu, wall, tokens[name] = calls[name]()
            figures[name].append((cpu, wall))
    medians = {name: np.median(np.asarray(f), axis=0) for name, f in figures.items()}
    return {
        "workload": {"batch": args.batch, "new_tokens_per_sequence": args.new_tokens, "rounds": args.ab_rounds,
                     "A": f"git {args.ab_base}", "B": "this checkout"},
        **{name: {"decode_cpu_ms_per_step": float(m[0]), "decode_wall_ms_per_step": float(m[1]),
                  "runs_cpu_wall_ms": [[round(c, 3), round(w, 3)] for c, w in figures[name]]} for name, m in medians.items()},
        "ratio_b_over_a": {"cpu": float(medians["B"][0] / medians["A"][0]), "wall": float(medians["B"][1] / medians["A"][1])},
        "greedy_tokens_identical": tokens["A"] == tokens["B"],
    }


# ---- profile of the decode step --------------------------------------------------------------------------

PROFILE_CATEGORIES = ("LM head", "attention", "cache reads (window copies)", "cache windows (cut / written back per loop)",
                      "cache writes", "matmuls (QKV/O, MLP)", "layer weight slices", "sampling", "norms/RoPE/residual",
                      "other")
_MOVEMENT = {"parameter", "constant", "copy", "transpose", "bitcast", "broadcast", "reshape", "slice", "dynamic-slice",
             "concatenate", "tuple", "get-tuple-element", "pad", "iota", "convert"}


def profile_category(info: dict[str, Any]) -> str:
    """A decode-loop instruction's category from its ops and Python call stack."""
    ops = set(info["ops"]) or {info["opcode"]}
    where = " ".join(info["stack"])
    if "Decoder.logits" in where or "head_logits" in where:
        return "LM head"
    if any(f in where for f in ("sample_tokens", "max_and_first_argmax", "inverse_cdf_sample")):
        return "sampling"
    if any(f in where for f in ("_layer_windows", "_write_windows")):
        return "cache windows (cut / written back per loop)"
    if "scatter" in ops or "dynamic-update-slice" in ops:
        return "cache writes"
    if "read" in where and ops <= _MOVEMENT:
        return "cache reads (window copies)"
    if ("scan" in where or "unrolled" in where) and ops <= _MOVEMENT:
        return "layer weight slices"
    if info["opcode"] == "dot" and not info["stack"]:  # dots XLA rewrote from slot_attention's einsums lose their metadata
        return "attention"
    if "dot" in ops and any(f in where for f in ("_project", "_output", "MLP")):
        return "matmuls (QKV/O, MLP)"
    if "slot_attention" in where or "Attention.decode" in where:
        return "attention"
    if "dot" in ops:
        return "matmuls (QKV/O, MLP)"
    if any(f in where for f in ("RMSNorm", "LayerNorm", "apply_rope", "Block.decode")):
        return "norms/RoPE/residual"
    return "other"


def profile_workload(args: argparse.Namespace, shape: dict[str, int], directory: str) -> dict[str, Any]:
    """One codelm call of the decode (greedy) or RL-shaped (sampled) workload under the profiler."""
    hf_model = reference.random_model(args.family, **shape)
    hf_model.save_pretrained(directory)
    sampled = args.profile_sampling == "temperature"
    prompts = make_prompts(args.rl_prompts if sampled else args.batch, args.prompt_len, args.vocab)
    new_tokens = args.rl_new_tokens if sampled else args.new_tokens
    sampler = Sampler(load_hf_checkpoint(directory, remat="none"), max_len=max(map(len, prompts)) + new_tokens)
    kwargs: dict[str, Any] = dict(n=args.rl_samples, temperature=1.0, seed=1,
                                  stop_token_ids=list(range(1, args.vocab, args.rl_eos_every))) if sampled else {}
    calls: list[Any] = []
    decode = sampler_module._decode

    def recording(*a: Any, **k: Any) -> Any:  # the abstract arguments of the decode program, to lower it again
        calls.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, (a, k)))
        return decode(*a, **k)

    sampler_module._decode = recording
    try:
        sampler.generate(prompts, new_tokens, **kwargs)  # compiles
        with tempfile.TemporaryDirectory() as logdir:
            jax.profiler.start_trace(logdir)
            out = sampler.generate(prompts, new_tokens, **kwargs)
            jax.profiler.stop_trace()
            (path,) = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
            with gzip.open(path) as f:
                events = json.load(f)["traceEvents"]
    finally:
        sampler_module._decode = decode
    hlo: dict[str, dict[str, Any]] = {}
    for a, k in {repr(c): c for c in calls}.values():  # one compiled program per distinct window
        hlo.update(parse_hlo(decode.lower(*a, **k).compile().as_text()))
    steps = out.timing["decode_steps"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        op = (event.get("args") or {}).get("hlo_op")
        module = (event.get("args") or {}).get("hlo_module", "")
        if event.get("ph") == "X" and module.startswith("jit__decode") and op in hlo and hlo[op]["opcode"] not in (
                "while", "call", "conditional"):
            per_op[op] += event["dur"] / 1e3 / steps  # ms per decode step
    ops = sorted(({"op": name, "ms": ms, "category": profile_category(hlo[name]), "shape": hlo[name]["shape"][:60],
                   "where": "/".join(s.split(":")[-1] for s in hlo[name]["stack"][-2:])} for name, ms in per_op.items()),
                 key=lambda o: -o["ms"])
    total = sum(o["ms"] for o in ops)
    categories = {c: sum(o["ms"] for o in ops if o["category"] == c) for c in PROFILE_CATEGORIES}
    return {
        "workload": {"sampling": args.profile_sampling, "rows": out.timing["rows"], "decode_steps": steps,
                     "generated_tokens": out.timing["generated_tokens"], "max_new_tokens": new_tokens},
        "decode_ms_per_step_under_profiler": out.timing["decode_seconds"] / steps * 1e3,
        "op_time_sum_ms_per_step": total,
        "categories_ms_per_step": {c: round(ms, 3) for c, ms in categories.items() if ms},
        "categories_share": {c: round(ms / total, 3) for c, ms in categories.items() if ms},
        "top_ops": [{**o, "ms": round(o["ms"], 3)} for o in ops[:args.profile_top]],
    }


def profile_markdown(report: dict[str, Any], command: str) -> str:
    result = report["profile"]
    lines = [f"`{command}` (load average {report['load_average_at_start']:.2f} at the start, "
             f"{report['load_average_at_end']:.2f} at the end; {report['cpu_count']} CPUs)", "",
             f"Workload: {result['workload']}; decode {result['decode_ms_per_step_under_profiler']:.2f} ms per step under "
             f"the profiler, sum of per-op times {result['op_time_sum_ms_per_step']:.2f} ms.", "",
             "| category | ms / decode step | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {ms:.3f} | {100 * result['categories_share'][c]:.1f}% |" for c, ms in result["categories_ms_per_step"].items()]
    lines += ["", "| op | category | ms / step | shape | where |", "|---|---|---:|---|---|"]
    lines += [f"| `{o['op']}` | {o['category']} | {o['ms']:.3f} | `{o['shape']}` | {o['where']} |" for o in result["top_ops"]]
    return "\n".join(lines) + "\n"


WORKLOADS = {"decode": decode_workload, "rl": rl_workload, "ab": ab_workload, "profile": profile_workload,
             "floor": floor_workload}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="decode,rl", help=f"comma-separated, of {sorted(WORKLOADS)}")
    parser.add_argument("--family", default="llama", choices=sorted(reference.FAMILY_OPTIONS))
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--d_ff", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rl_prompts", type=int, default=64)
    parser.add_argument("--rl_samples", type=int, default=8)
    parser.add_argument("--rl_new_tokens", type=int, default=128)
    parser.add_argument("--rl_eos_every", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ab_base", default="HEAD", help="git ref of the A sampler (--workloads=ab)")
    parser.add_argument("--ab_rounds", type=int, default=6)
    parser.add_argument("--profile_sampling", default="greedy", choices=("greedy", "temperature"))
    parser.add_argument("--profile_top", type=int, default=25)
    parser.add_argument("--profile_out", default="", help="folder for profile_<sampling>.json and .md")
    parser.add_argument("--cpu_devices", type=int, default=1,
                        help="CPU devices codelm runs on (jax_num_cpu_devices), rows data-parallel over them: XLA:CPU "
                             "runs one op at a time, and a step's small ops use one core, so one device per core "
                             "puts both cores on every op")
    parser.add_argument("--torch_device", default="auto", help="transformers' device; auto: cuda when JAX runs on a GPU")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    global TORCH_DEVICE
    if args.torch_device == "auto":
        args.torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    TORCH_DEVICE = torch.device(args.torch_device)
    if TORCH_DEVICE.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision for float32 dots on GPU

    shape = dict(hidden_size=args.d_model, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                 num_key_value_heads=args.n_kv_heads, intermediate_size=args.d_ff, vocab_size=args.vocab,
                 max_position_embeddings=4 * (args.prompt_len + max(args.new_tokens, args.rl_new_tokens)))
    report: dict[str, Any] = {
        "benchmark": "generate",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "codelm_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch_device": str(TORCH_DEVICE),
        "load_average_at_start": os.getloadavg()[0],  # other processes on the machine slow both sides
        "model": {"family": args.family, **shape, "dtype": "float32"},
    }
    for name in args.workloads.split(","):
        with tempfile.TemporaryDirectory() as directory:
            report[name] = WORKLOADS[name](args, shape, directory)
    report["load_average_at_end"] = os.getloadavg()[0]
    if "profile" in report and args.profile_out:
        out = Path(args.profile_out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_{args.profile_sampling}.json").write_text(json.dumps(report, indent=2) + "\n")
        command = f"python -m bench.generate --workloads=profile --profile_sampling={args.profile_sampling}"
        (out / f"profile_{args.profile_sampling}.md").write_text(profile_markdown(report, command))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Where a train step's time goes: codelm's jitted step (jax.profiler) and the `transformers` step
(torch.profiler) on the same model, summarised by category.

    python -m bench.train_step_profile --out=results/train_step_profile           # reference shape
    python -m bench.train_step_profile --impl=codelm --overrides='{"scan_layers": false}'

codelm: the step is compiled once, run under `jax.profiler.trace`, and every XLA:CPU thunk event
(one per executed HLO instruction, named by it) is matched to the instruction in the compiled HLO;
the instruction's opcode, fused computation and Python call stack (HLO metadata stack frames) place
it in a category. torch: `torch.profiler` self CPU time per op; forward ops are placed by the module
scope they ran in (RMSNorm, rotary embedding, attention, loss; the optimizer's own step range) and
backward ops by their autograd node. Both sides sum per-op self time, which on a multi-core CPU may
exceed wall time when ops overlap; the tables give each category's share of that sum and ms per step.

Writes <out>/<impl>.json (categories, top ops, step wall time) and <out>/<impl>.md, and prints the JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.train_step_vs_torch import NORM_EPS, ROPE_THETA, SHAPES, _model_fields

CATEGORIES = ("matmuls", "attention", "softmax/cross-entropy", "norms/RoPE", "optimizer", "copies",
              "embedding", "other")

# ---- codelm: HLO text -> per-instruction (opcode, fused ops, call stack) ------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+) .*\{\s*$")
_MOVEMENT = {"parameter", "constant", "copy", "transpose", "bitcast", "broadcast", "reshape", "slice",
             "dynamic-slice", "dynamic-update-slice", "concatenate", "tuple", "get-tuple-element", "pad",
             "iota", "convert"}
_CONTAINERS = {"while", "conditional", "call"}


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """Optimized HLO text -> {instruction name: {opcode, shape, ops (of its fused computation, if
    any), stack (outermost-first Python function names from the metadata stack frame)}}."""
    sections: dict[str, list[str]] = collections.defaultdict(list)
    section = None
    computations: dict[str, list[str]] = {}
    current = None
    instructions: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section and re.match(r"^\d+ ", line):
            sections[section].append(line)
            continue
        section = None
        if (m := _COMPUTATION.match(line)) and "=" not in line.split("{")[0]:
            current = m.group(1)
            computations[current] = []
            continue
        if (m := _INSTRUCTION.match(line)) and current is not None:
            name, shape, opcode, rest = m.groups()
            computations[current].append(opcode)
            calls = re.search(r"calls=%([\w.-]+)", rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            instructions[name] = {"opcode": opcode, "shape": shape, "calls": calls and calls.group(1),
                                  "frame": int(frame.group(1)) if frame else 0, "computation": current}

    def table(name: str) -> dict[int, str]:
        return {int(row.split(" ", 1)[0]): row.split(" ", 1)[1] for row in sections[name]}

    functions = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    files = {k: v.strip('"') for k, v in table("FileNames").items()}
    locations = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in table("FileLocations").items()}
    frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in table("StackFrames").items()}

    def stack(frame_id: int) -> list[str]:
        out: list[str] = []
        while frame_id and frame_id in frames and len(out) < 64:
            loc = locations[int(frames[frame_id]["file_location_id"])]
            out.append(f"{Path(files[int(loc['file_name_id'])]).name}:{functions[int(loc['function_name_id'])]}")
            parent = int(frames[frame_id]["parent_frame_id"])
            frame_id = 0 if parent == frame_id else parent
        return out[::-1]

    for info in instructions.values():
        info["ops"] = computations.get(info["calls"], []) if info["calls"] else []
        info["stack"] = stack(info.pop("frame"))
    return instructions


def codelm_category(info: dict[str, Any]) -> str:
    ops = set(info["ops"]) or {info["opcode"]}
    where = " ".join(info["stack"])
    has_dot = bool(ops & {"dot", "convolution"})
    if "optax" in where or "apply_updates" in where or "tx.update" in where:
        return "optimizer"
    if "_select" in where or "is-finite" in ops:
        return "copies" if not ops - _MOVEMENT else "optimizer"
    if ops <= _MOVEMENT and not has_dot:
        return "copies"
    if "_attention" in where or "attention_mask" in where:
        return "attention"
    if has_dot:
        return "matmuls"
    if "RMSNorm" in where or "LayerNorm" in where or "apply_rope" in where:
        return "norms/RoPE"
    if "next_token_loss" in where and "Decoder" not in where:
        return "softmax/cross-entropy"
    if "_take" in where or "gather" in ops or "scatter" in ops:
        return "embedding"
    if "global_norm" in where or "make_train_step" in where and "objective" not in where:
        return "optimizer"
    return "other"


def profile_codelm(shape: dict[str, Any], steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from bench.train_step import synthetic_batch  # noqa: PLC0415
    from configs import base  # noqa: PLC0415
    from configs.sharding_rules import RULE_SETS  # noqa: PLC0415
    from models.config import ModelConfig  # noqa: PLC0415
    from models.decoder import Decoder  # noqa: PLC0415
    from models.sharding import make_mesh, sharding_context  # noqa: PLC0415
    from train.optimizer import make_optimizer  # noqa: PLC0415
    from train.state import init_train_state  # noqa: PLC0415
    from train.step import make_train_step, next_token_loss  # noqa: PLC0415

    cfg = ModelConfig(name="bench", **_model_fields(shape), norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
                      max_seq_len=shape["seq"], dtype="float32", param_dtype="float32", remat="none").replace(**overrides)
    mesh, rules = make_mesh({"fsdp": -1}), RULE_SETS["default"]
    optim = base.get_config().optim
    graphdef, state, tx, shardings = init_train_state(
        lambda: Decoder(cfg, rngs=nnx.Rngs(0)), lambda p: make_optimizer(optim, 1000, p)[0], mesh, rules)
    with sharding_context(mesh, rules):
        step = jax.jit(make_train_step(graphdef, tx, next_token_loss), donate_argnums=0,
                       in_shardings=(shardings, None), out_shardings=(shardings, None))
        batch = jax.device_put(synthetic_batch(shape["batch"], shape["seq"], cfg.vocab_size))
        compiled = step.lower(state, batch).compile()
        hlo = parse_hlo(compiled.as_text())
        for _ in range(2):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        with tempfile.TemporaryDirectory() as logdir:
            jax.profiler.start_trace(logdir, create_perfetto_trace=True)
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
            wall = (time.perf_counter() - start) / steps
            jax.profiler.stop_trace()
            (path,) = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
            with gzip.open(path) as f:
                events = json.load(f)["traceEvents"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op in hlo and hlo[op]["opcode"] not in _CONTAINERS:
            per_op[op] += e["dur"] / 1e3 / steps  # ms per step
    ops = [{"op": name, "ms": ms, "category": codelm_category(hlo[name]), "opcode": hlo[name]["opcode"],
            "shape": hlo[name]["shape"][:80], "where": "/".join(s.split(":")[-1] for s in hlo[name]["stack"][-3:])}
           for name, ms in per_op.items()]
    return {"impl": "codelm", "jax": jax.__version__, "params": cfg.param_count(), "step_wall_ms": wall * 1e3,
            "ops": ops}


# ---- torch ----------------------------------------------------------------------------------------

_TORCH_FORWARD_SCOPES = {"rmsnorm": "norms/RoPE", "rope": "norms/RoPE", "attention_core": "attention",
                         "loss": "softmax/cross-entropy"}


def torch_category(name: str, scope: str | None) -> str:
    if scope == "optimizer":
        return "optimizer"
    if scope in _TORCH_FORWARD_SCOPES and not name.startswith(("aten::mm", "aten::addmm", "aten::bmm")):
        return _TORCH_FORWARD_SCOPES[scope]
    low = name.lower()
    if any(k in low for k in ("scaled_dot_product", "flash_attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("aten::mm", "aten::addmm", "aten::bmm", "mmbackward", "addmmbackward", "bmmbackward")):
        return "matmuls"
    if any(k in low for k in ("log_softmax", "logsoftmax", "nll_loss", "nllloss", "cross_entropy")):
        return "softmax/cross-entropy"
    if any(k in low for k in ("rsqrt", "pow", "mean", "cat", "neg")):
        return "norms/RoPE"
    if any(k in low for k in ("embedding",)):
        return "embedding"
    if any(k in low for k in ("copy_", "clone", "contiguous", "transpose", "permute", "expand", "view", "reshape", "zero_", "fill_")):
        return "copies"
    return "other"


def profile_torch(shape: dict[str, Any], steps: int) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415
    from transformers.models.llama import modeling_llama  # noqa: PLC0415

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"], tie_word_embeddings=shape["tie_embeddings"],
        max_position_embeddings=shape["seq"], rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, shape["vocab_size"], (shape["batch"], shape["seq"])))

    def scoped(fn: Any, scope: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(scope):
                return fn(*args, **kwargs)
        return wrapper

    # Forward scopes by module/function; each wrapper only names a range, the computation is unchanged.
    modeling_llama.apply_rotary_pos_emb = scoped(modeling_llama.apply_rotary_pos_emb, "rope")
    for module in model.modules():
        if isinstance(module, modeling_llama.LlamaRMSNorm):
            module.forward = scoped(module.forward, "rmsnorm")
    for name in list(modeling_llama.ALL_ATTENTION_FUNCTIONS.keys()):
        modeling_llama.ALL_ATTENTION_FUNCTIONS[name] = scoped(modeling_llama.ALL_ATTENTION_FUNCTIONS[name], "attention_core")
    modeling_llama.eager_attention_forward = scoped(modeling_llama.eager_attention_forward, "attention_core")
    model.loss_function = scoped(model.loss_function, "loss")

    def step() -> None:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    scopes = {"rope", "rmsnorm", "attention_core", "loss", "optimizer"}
    per_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    for event in prof.events():
        if event.name in scopes or event.name.startswith(("ProfilerStep", "Optimizer.")):
            continue
        scope, parent = None, event.cpu_parent
        while parent is not None and scope is None:
            scope = parent.name if parent.name in scopes else None
            parent = parent.cpu_parent
        per_op[(event.name, scope or "")] += event.self_cpu_time_total / 1e3 / steps
    ops = [{"op": name, "ms": ms, "category": torch_category(name, scope or None), "where": scope}
           for (name, scope), ms in per_op.items() if ms > 0]
    return {"impl": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "step_wall_ms": wall * 1e3, "ops": ops}


# ---- report ---------------------------------------------------------------------------------------


def summarise(result: dict[str, Any], top: int) -> dict[str, Any]:
    ops = sorted(result.pop("ops"), key=lambda o: -o["ms"])
    total = sum(o["ms"] for o in ops)
    by_cat = {c: sum(o["ms"] for o in ops if o["category"] == c) for c in CATEGORIES}
    result["op_time_sum_ms"] = round(total, 1)
    result["categories"] = {c: {"ms": round(ms, 1), "share": round(ms / total, 3)} for c, ms in by_cat.items() if ms}
    result["top_ops"] = [{**o, "ms": round(o["ms"], 2)} for o in ops[:top]]
    return result


def markdown(result: dict[str, Any], header: str) -> str:
    lines = [f"# {result['impl']} train step profile", "", header, "",
             f"Step wall time {result['step_wall_ms']:.0f} ms; sum of per-op self time {result['op_time_sum_ms']:.0f} ms.",
             "", "| category | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {v['ms']:.1f} | {100 * v['share']:.1f}% |" for c, v in result["categories"].items()]
    lines += ["", "Top ops:", "", "| op | category | ms / step | where |", "|---|---|---:|---|"]
    lines += [f"| `{o['op']}` {o.get('shape', '')} | {o['category']} | {o['ms']:.2f} | {o.get('where') or ''} |"
              for o in result["top_ops"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="both", choices=("codelm", "torch", "both"))
    parser.add_argument("--shape", default="reference", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--overrides", default="{}", help="codelm ModelConfig overrides as JSON")
    parser.add_argument("--out", default="", help="folder for <impl>.json and <impl>.md")
    parser.add_argument("--tag", default="", help="suffix of the output file names, e.g. 'before'")
    args = parser.parse_args()
    import os  # noqa: PLC0415

    shape = SHAPES[args.shape]
    results = {}
    for impl in (("codelm", "torch") if args.impl == "both" else (args.impl,)):
        load = os.getloadavg()[0]
        raw = profile_codelm(shape, args.steps, json.loads(args.overrides)) if impl == "codelm" else profile_torch(shape, args.steps)
        result = summarise({**raw, "shape": {"name": args.shape, **shape}, "loadavg_1m": round(load, 2),
                            "codelm_overrides": json.loads(args.overrides) if impl == "codelm" else None}, args.top)
        results[impl] = result
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{impl}_{args.tag}" if args.tag else impl
            (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
            cmd = f"python -m bench.train_step_profile --impl={impl} --shape={args.shape} --steps={args.steps}"
            header = f"`{cmd}` (load average {load:.2f} on {os.cpu_count()} CPUs)"
            (out / f"{stem}.md").write_text(markdown(result, header))
    print(json.dumps({k: {kk: v[kk] for kk in ("step_wall_ms", "op_time_sum_ms", "categories")} for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()

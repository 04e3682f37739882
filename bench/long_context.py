"""Long-context memory and speed: attention kernels and whole train steps at 2K-32K tokens per row.

    python -m bench.long_context                                   # tiny and llama-100m, 2K / 8K / 32K
    python -m bench.long_context --presets=tiny --seqs=2048,8192 --run_max_seq=8192
    python -m bench.long_context --sections=kernels --kernels=chunked --seqs=2048,4096

Prints one JSON object with two lists:
  kernels     attention alone (forward + backward of a random projection of its output), q [1, T, N, H]
              with the first preset's heads: XLA's planned scratch memory per kernel and T, and the
              median time where T <= --run_max_seq;
  train_step  the jitted train step (AdamW, batch 1 x T) per preset, kernel and loss (whole logits or
              pieces of each --loss_chunks size): argument, output and scratch bytes from the compiled
              program's memory analysis (no run needed, so 32K rows are measured without allocating),
              and the median step time where T <= --run_max_seq, with tokens/s and MFU.
"peak_bytes" is arguments + outputs + scratch - aliased (donated) bytes: what the program holds at once.
MFU = flops_per_token(T) * tokens/s / peak FLOP/s of the device (datasheet, train/metrics.py; null on CPU),
flops_per_token = 6 * N_matmul + 12 * layers * heads * head_dim * T (`ModelConfig.flops_per_token`, PaLM
appendix B: the whole T x T score matrix, though causal packed rows need under half of it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import base
from models.attention import ATTENTION_KERNELS, AttentionMask
from models.config import ModelConfig, get_preset
from models.decoder import Decoder
from train.metrics import peak_flops_per_device
from train.optimizer import make_optimizer
from train.state import TrainState, split_model
from train.step import make_train_step, next_token_loss


def memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    figures = {
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
    }
    figures["peak_bytes"] = sum(figures.values()) - stats.alias_size_in_bytes
    return figures


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (and the compile, for a jitted fn)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def packed_row(seq: int, docs: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Positions and segment ids [1, seq] of `docs` equal documents packed in one row."""
    doc = np.arange(seq, dtype=np.int32) * docs // seq + 1
    starts = np.searchsorted(doc, doc)
    return (np.arange(seq, dtype=np.int32) - starts)[None], doc[None]


def kernel_figures(cfg: ModelConfig, kernel: str, seq: int, run: bool, repeats: int) -> dict[str, Any]:
    fn = ATTENTION_KERNELS[kernel].fn
    pos, seg = (jnp.asarray(x) for x in packed_row(seq))
    mask = AttentionMask(pos, pos, seg, seg, cfg.sliding_window, causal=True)
    q_shape, kv_shape = (1, seq, cfg.n_heads, cfg.head_dim), (1, seq, cfg.n_kv_heads, cfg.head_dim)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * q)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    dtype = jnp.dtype(cfg.dtype)
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, kv_shape, kv_shape)]
    start = time.perf_counter()
    compiled = grad.lower(*shapes).compile()
    figures = {"kernel": kernel, "seq": seq, "compile_s": round(time.perf_counter() - start, 2), **memory(compiled)}
    if run:
        rng = np.random.default_rng(0)
        args = [jnp.asarray(rng.normal(size=s.shape), dtype) for s in shapes]
        figures["fwd_bwd_s"] = round(median_seconds(lambda: compiled(*args), repeats), 4)
    return figures


def train_step_figures(cfg: ModelConfig, seq: int, run: bool, repeats: int) -> dict[str, Any]:
    """Memory analysis (and time) of the train step of `cfg` on one packed row of `seq` tokens."""
    graphdef, params, rest = split_model(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    tx = make_optimizer(base.get_config().optim, 1000, params)[0]

    def init(params: nnx.State, rest: nnx.State) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, rest=rest, opt_state=tx.init(params), nonfinite_steps=zero,
                          first_nonfinite_step=zero - 1)

    pos, seg = packed_row(seq)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 1, seq + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "positions": pos[None], "segment_ids": seg[None],
             "loss_mask": np.ones((1, 1, seq), np.float32)}
    step = jax.jit(make_train_step(graphdef, tx, next_token_loss), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(jax.eval_shape(init, params, rest), batch).compile()
    figures = {"compile_s": round(time.perf_counter() - start, 2), **memory(compiled)}
    if run:
        state = jax.jit(lambda: init(*split_model(Decoder(cfg, rngs=nnx.Rngs(0)))[1:]))()
        holder = [state]

        def one_step() -> Any:
            holder[0], metrics = compiled(holder[0], batch)
            return metrics

        figures["step_s"] = round(median_seconds(one_step, repeats), 4)
        figures["tokens_per_s"] = round(seq / figures["step_s"], 1)
        peak = peak_flops_per_device()
        figures["mfu"] = round(cfg.flops_per_token(seq) * seq / figures["step_s"] / peak, 4) if peak else None
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    seqs = [int(s) for s in args.seqs.split(",")]
    kernels = args.kernels.split(",")
    presets = args.presets.split(",")
    result: dict[str, Any] = {"benchmark": "long_context", "device_kind": jax.devices()[0].device_kind,
                              "dtype": args.dtype, "kernels": [], "train_step": []}
    first = get_preset(presets[0], dtype=args.dtype)
    result["kernel_shape"] = {"preset": first.name, "n_heads": first.n_heads, "n_kv_heads": first.n_kv_heads,
                              "head_dim": first.head_dim}
    sections = args.sections.split(",")
    for seq, kernel in ((s, k) for s in seqs for k in kernels if "kernels" in sections):
        row = kernel_figures(first, kernel, seq, seq <= args.run_max_seq, args.repeats)
        result["kernels"].append(row)
        if args.progress:
            print(json.dumps(row), flush=True)
    for preset, seq, kernel, chunk in ((p, s, k, c) for p in presets for s in seqs for k in kernels
                                       for c in map(int, args.loss_chunks.split(",")) if "train_step" in sections):
        cfg = get_preset(preset, dtype=args.dtype, attention_impl=kernel, cross_entropy_chunk=chunk,
                         max_seq_len=max(seq, get_preset(preset).max_seq_len))
        run_it = seq <= args.run_max_seq and preset in args.run_presets.split(",")
        row = {"preset": preset, "params": cfg.param_count(), "seq": seq, "kernel": kernel, "loss_chunk": chunk,
               **train_step_figures(cfg, seq, run_it, args.repeats)}
        result["train_step"].append(row)
        if args.progress:
            print(json.dumps(row), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,llama-100m")
    parser.add_argument("--seqs", default="2048,8192,32768")
    parser.add_argument("--kernels", default="chunked,blockwise")
    parser.add_argument("--loss_chunks", default="0,512", help="tokens per loss piece, one train-step row each (0: whole logits)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--run_max_seq", type=int, default=2048, help="also time rows of at most this many tokens")
    parser.add_argument("--run_presets", default="tiny", help="presets whose train steps are timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="kernels,train_step")
    parser.add_argument("--progress", action="store_true", help="print each row as it is measured")
    print(json.dumps(run(parser.parse_args()), indent=1))


if __name__ == "__main__":
    main()

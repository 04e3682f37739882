"""Generation speed: codelm's KV-cache sampler against `transformers`' own `generate`, same weights,
same workload, same machine.

    python -m bench.generate                                  # tiny Llama, batch 32, CPU: ~2 minutes
    python -m bench.generate --family=qwen3_moe --d_model=512 --n_layers=8 --prompt_len=256 --new_tokens=128

A random model of `--family` is built with transformers, saved as an HF checkpoint and imported into
codelm (so both run identical float32 weights). The workload is `--batch` prompts of random tokens
with lengths drawn from [prompt_len / 2, prompt_len], greedy, exactly `--new_tokens` new tokens each
(no EOS). Prefill tokens/s = real prompt tokens / prefill time; decode tokens/s = generated tokens /
decode time. transformers' prefill is one forward pass over the left-padded batch with a cache; its
decode time is `generate`'s time minus that. Times are medians over `--repeats` runs after a warm-up
run (which compiles codelm's programs). Also reported: the fraction of sequences whose greedy tokens
agree exactly between the two (float32 rounding can flip near-ties). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from models.hf import load_hf_checkpoint, reference
from models.sampler import Sampler


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=batch)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def bench_codelm(directory: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    start = time.perf_counter()
    model = load_hf_checkpoint(directory, remat="none")
    load_seconds = time.perf_counter() - start
    sampler = Sampler(model, max_len=max(map(len, prompts)) + new_tokens)
    start = time.perf_counter()
    sampler.generate(prompts, new_tokens)  # compiles
    warmup_seconds = time.perf_counter() - start
    runs = [sampler.generate(prompts, new_tokens) for _ in range(repeats)]
    prefill = statistics.median(r.timing["prefill_seconds"] for r in runs)
    decode = statistics.median(r.timing["decode_seconds"] for r in runs)
    prompt_tokens = runs[0].timing["prompt_tokens"]
    generated = runs[0].timing["generated_tokens"]
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": generated / decode,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "load_seconds": load_seconds,
        "first_call_seconds_with_compilation": warmup_seconds,
        "tokens": runs[0].tokens,
    }


def bench_transformers(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    longest = max(map(len, prompts))
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as transformers recommends for generation
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
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
        "torch_threads": torch.get_num_threads(),
        "tokens": output[:, longest:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    shape = dict(hidden_size=args.d_model, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                 num_key_value_heads=args.n_kv_heads, intermediate_size=args.d_ff, vocab_size=args.vocab,
                 max_position_embeddings=4 * (args.prompt_len + args.new_tokens))
    hf_model = reference.random_model(args.family, **shape)
    prompts = make_prompts(args.batch, args.prompt_len, args.vocab)
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        ours = bench_codelm(directory, prompts, args.new_tokens, args.repeats)
    theirs = bench_transformers(hf_model, prompts, args.new_tokens, args.repeats)
    agree = np.mean([a == b for a, b in zip(ours.pop("tokens"), theirs.pop("tokens"))])
    print(json.dumps({
        "benchmark": "generate",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "model": {"family": args.family, **shape, "dtype": "float32"},
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
    }, indent=2))


if __name__ == "__main__":
    main()

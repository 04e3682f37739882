"""Generate text from a checkpoint on the command line.

    python -m models.generate --checkpoint=path/to/hf_dir --prompt="def fib(n):" --max_new_tokens=64
    python -m models.generate --checkpoint=path/to/hf_dir --prompts_file=prompts.jsonl --output=out.jsonl \
        --temperature=0.8 --top_p=0.95 --mesh=fsdp:-1

--checkpoint: a Hugging Face directory (config.json + safetensors, tokenizer.json beside them), or a
codelm training run directory (run_config.json; its latest checkpoint, see
`models.pretrained.load_trained_model`).
--prompt (repeatable), or --prompts_file: a `.jsonl` file with one prompt per line, each a JSON string,
{"prompt": str} or {"messages": [{"role", "content"}, ...]} (rendered with the chat template); any
other file is read whole as one prompt. --chat renders plain prompts as one user message.
Output: the completions as text, or JSON lines with --format=jsonl (tokens, log-probabilities,
finish reasons). Throughput goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs.sharding_rules import RULE_SETS
from models.pretrained import is_run_dir, load_pretrained
from models.sampler import Sampler, SampleOutput
from models.sharding import make_mesh

Prompt = str | list[dict[str, Any]]  # text, or chat messages


def parse_mesh(spec: str) -> dict[str, int]:
    """"fsdp:-1,tensor:2" -> {"fsdp": -1, "tensor": 2}."""
    shape = {}
    for part in filter(None, spec.split(",")):
        axis, _, size = part.partition(":")
        try:
            shape[axis.strip()] = int(size)
        except ValueError:
            raise ValueError(f"--mesh: expected axis:size pairs like 'fsdp:-1,tensor:2', got {part!r}") from None
    return shape


def read_prompts_file(path: Path) -> list[Prompt]:
    if path.suffix != ".jsonl":
        return [path.read_text()]
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON: {error}") from None
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise ValueError(f'{path}:{number}: expected a JSON string, {{"prompt": str}} or {{"messages": [...]}}')
    return prompts


def load(checkpoint: Path, mesh_spec: str, rules_name: str, overrides: dict[str, Any]) -> tuple[Sampler, Any]:
    """(sampler, tokenizer) for a codelm training run directory or a Hugging Face checkpoint directory."""
    mesh = make_mesh(parse_mesh(mesh_spec)) if mesh_spec else None
    rules = RULE_SETS[rules_name]
    if is_run_dir(checkpoint) and overrides.keys() - {"remat"}:
        raise SystemExit(f"--checkpoint={checkpoint}: --dtype / --param_dtype apply to Hugging Face checkpoints only")
    try:
        model, tokenizer = load_pretrained(checkpoint, mesh=mesh, rules=rules, **overrides)
    except FileNotFoundError as e:
        raise SystemExit(f"--checkpoint={checkpoint}: {e}") from None
    return Sampler(model, tokenizer, mesh=mesh, rules=rules), tokenizer


def to_token_prompts(prompts: Sequence[Prompt], tokenizer: Any, chat: bool, system: str | None) -> list[str | list[int]]:
    """Chat prompts become template-rendered ids; plain ones stay text (encoded by the sampler)."""
    out: list[str | list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str) and chat:
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if not isinstance(prompt, str) and not getattr(tokenizer, "has_chat_template", False):
            raise SystemExit(f"chat prompts need a tokenizer with a chat template; {tokenizer!r} has none")
        out.append(prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(prompt))
    return out


def write_results(prompts: Sequence[Prompt], output: SampleOutput, fmt: str, stream: Any) -> None:
    for i, prompt in enumerate(prompts):
        if fmt == "jsonl":
            record = {
                "prompt": prompt, "text": output.texts[i] if output.texts else None, "tokens": output.tokens[i],
                "logprobs": output.logprobs[i].tolist(), "logprob_sum": float(output.logprob_sums[i]),
                "finish_reason": output.finish_reasons[i],
            }
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            stream.write(f"===== completion {i} ({output.finish_reasons[i]}, {output.lengths[i]} tokens)\n")
            stream.write((output.texts[i] if output.texts else "") + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts_file", type=Path, help=".jsonl with one prompt per line, or a file holding one prompt")
    parser.add_argument("--chat", action="store_true", help="render plain prompts as a user turn of the chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--mesh", default="", help="e.g. 'fsdp:-1' or 'fsdp:4,tensor:2'; default one device")
    parser.add_argument("--rules", default="default", choices=sorted(RULE_SETS))
    parser.add_argument("--dtype", help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--param_dtype", help="parameter dtype override (default: the checkpoint's)")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text")
    parser.add_argument("--output", type=Path, help="write results here instead of stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    prompts: list[Prompt] = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        parser.error("give --prompt or --prompts_file")
    overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype)) if v}
    sampler, tokenizer = load(args.checkpoint, args.mesh, args.rules, {"remat": "none", **overrides})
    token_prompts = to_token_prompts(prompts, tokenizer, args.chat, args.system)

    stream = open(args.output, "w") if args.output else sys.stdout
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = slice(start, start + args.batch_size)
            output = sampler.generate(
                token_prompts[batch], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, stop=args.stop, seed=args.seed + start,
            )
            write_results(prompts[batch], output, args.format, stream)
            t = output.timing
            print(
                f"[{start + len(prompts[batch])}/{len(prompts)}] prefill {t['prompt_tokens'] / t['prefill_seconds']:.0f} tok/s, "
                f"decode {t['generated_tokens'] / t['decode_seconds']:.0f} tok/s (first batch includes compilation)",
                file=sys.stderr,
            )
    finally:
        if args.output:
            stream.close()


if __name__ == "__main__":
    main()

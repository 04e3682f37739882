"""Generate text from a checkpoint on the command line (see configs/generate.py for every field).

    python -m models.generate --config.checkpoint=path/to/hf_dir --config.prompts.text="def fib(n):"
    python -m models.generate --config.checkpoint=runs/quickstart --config.prompts.file=prompts.jsonl \
        --config.output.path=out.jsonl --config.output.format=jsonl --config.sampler.temperature=0.8

checkpoint: a Hugging Face directory (config.json + safetensors, tokenizer.json beside them), or a
codelm training run directory (run_config.json; its latest checkpoint, see
`models.pretrained.load_trained_model`). Prompts: `prompts.text`, and/or `prompts.file`, a `.jsonl`
file with one prompt per line, each a JSON string, {"prompt": str} or {"messages": [{"role",
"content"}, ...]} (rendered with the chat template); any other file is read whole as one prompt.
`prompts.chat` renders plain prompts as one user message. Output: the completions as text, or JSON
lines with output.format=jsonl (tokens, log-probabilities, finish reasons). Throughput goes to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from ml_collections import ConfigDict
from pydantic import Field

from configs import cli
from configs.schema import ConfigError, parse, section
from data.jsonl import JSONLError, read_jsonl
from models.pretrained import is_run_dir, load_pretrained
from models.sampler import SampleOutput, Sampler, SamplerConfig
from models.sharding import MeshConfig

_CONFIG = cli.define_config("configs/generate.py")


@section
class PromptsConfig:
    text: str = ""
    file: str = ""
    chat: bool = False
    system: str = ""


@section
class GenerateSamplerConfig(SamplerConfig):
    stop: str = ""  # comma-separated stop strings
    seed: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(ge=1)] = 32


@section
class ModelOverrides:
    dtype: str = ""
    param_dtype: str = ""


@section
class OutputConfig:
    path: str = ""
    format: Literal["text", "jsonl"] = "text"


@section
class GenerateConfig:
    checkpoint: Annotated[str, Field(min_length=1)]
    prompts: PromptsConfig = PromptsConfig()
    sampler: GenerateSamplerConfig = GenerateSamplerConfig()
    mesh: MeshConfig = MeshConfig()
    model: ModelOverrides = ModelOverrides()
    output: OutputConfig = OutputConfig()


def load_config(cfg: ConfigDict) -> GenerateConfig:
    config = parse(GenerateConfig, cfg.to_dict())
    if not config.prompts.text and not config.prompts.file:
        raise ConfigError("prompts: give prompts.text or prompts.file")
    return config


Prompt = str | list[dict[str, Any]]  # text, or chat messages


def read_prompts_file(path: Path) -> list[Prompt]:
    if path.suffix != ".jsonl":
        return [path.read_text()]
    prompts: list[Prompt] = []
    for line in read_jsonl(path, objects=False):
        item = line.record
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise JSONLError(f'{line.where}: expected a JSON string, {{"prompt": str}} or {{"messages": [...]}}')
    return prompts


def load(config: GenerateConfig) -> tuple[Sampler, Any]:
    """(sampler, tokenizer) for a codelm training run directory or a Hugging Face checkpoint directory."""
    overrides = {"remat": "none", **{k: v for k, v in vars(config.model).items() if v}}
    checkpoint = Path(config.checkpoint)
    if is_run_dir(checkpoint) and overrides.keys() - {"remat"}:
        raise ConfigError("model: dtype / param_dtype overrides apply to Hugging Face checkpoints only")
    mesh = config.mesh.make()
    try:
        model, tokenizer = load_pretrained(checkpoint, mesh=mesh, rules=config.mesh.rule_set, **overrides)
    except FileNotFoundError as e:
        raise ConfigError(f"checkpoint: {e}") from None
    max_len = min(config.sampler.max_len, model.cfg.max_seq_len)
    return Sampler(model, tokenizer, mesh=mesh, rules=config.mesh.rule_set, max_len=max_len), tokenizer


def to_token_prompts(prompts: Sequence[Prompt], tokenizer: Any, chat: bool, system: str) -> list[str | list[int]]:
    """Chat prompts become template-rendered ids; plain ones stay text (encoded by the sampler)."""
    out: list[str | list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str) and chat:
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if not isinstance(prompt, str) and not getattr(tokenizer, "has_chat_template", False):
            raise ConfigError(f"prompts: chat prompts need a tokenizer with a chat template; {tokenizer!r} has none")
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


def generate(config: GenerateConfig) -> None:
    prompts: list[Prompt] = [config.prompts.text] if config.prompts.text else []
    if config.prompts.file:
        prompts += read_prompts_file(Path(config.prompts.file))
    sampler, tokenizer = load(config)
    token_prompts = to_token_prompts(prompts, tokenizer, config.prompts.chat, config.prompts.system)
    params = config.sampler
    stop = [s for s in params.stop.split(",") if s]
    stream = open(config.output.path, "w") if config.output.path else sys.stdout
    try:
        for start in range(0, len(prompts), params.batch_size):
            batch = slice(start, start + params.batch_size)
            output = sampler.generate(
                token_prompts[batch], params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
                top_p=params.top_p, stop=stop, seed=params.seed + start,
            )
            write_results(prompts[batch], output, config.output.format, stream)
            t = output.timing
            print(
                f"[{start + len(prompts[batch])}/{len(prompts)}] prefill {t['prompt_tokens'] / t['prefill_seconds']:.0f} tok/s, "
                f"decode {t['generated_tokens'] / t['decode_seconds']:.0f} tok/s (first batch includes compilation)",
                file=sys.stderr,
            )
    finally:
        if config.output.path:
            stream.close()


if __name__ == "__main__":
    cli.run(generate, _CONFIG, load_config)

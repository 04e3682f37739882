"""Supervised fine-tuning data: chat / prompt-completion JSONL -> masked, packed training batches.

    it = build_sft_iterator(data_cfg, SFTDataConfig(), tokenizer, split="train")
    it.stats.rows_per_epoch, it.total_batches      # for turning epochs into steps and for the run summary
    batch = next(it)                               # the pretraining fields, host-local rows
    state = it.get_state(); ...; it.set_state(state)

Records (JSONL, one object a line; `data.sources[name].splits[split]`, kind "jsonl", comma-separated files
or globs resolved as `data.sources.expand_paths` does) are either

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   (>= 1 assistant turn)
    {"prompt": str, "completion": str}

Several sources are concatenated in the order of their names (each source's files in glob order); their
`weight` must be 1.0 (SFT does not mix by weight). `sft.max_examples` > 0 keeps the first that many
records of that concatenation. A malformed record raises `JSONLError` naming file, line and field:
"train.jsonl:12: messages[2].role: expected one of system, user, assistant, got 'bot'".

Formats (`SFTDataConfig.chat_template`; "auto" takes the model's template when the tokenizer has one):

- "template" (an `HFTokenizer` with a Jinja chat template): the ids are exactly
  `tokenizer.apply_chat_template(messages, add_generation_prompt=False)` (no BOS is added: templates that
  want one write it, as with transformers). Assistant turn i spans the characters between the rendering
  of messages[:i] with the generation prompt and the rendering of messages[:i+1] without it; a template
  whose renderings are not prefixes of each other (one that rewrites earlier turns) is refused.
- "default" (codelm's sentencepiece tokenizer, or any tokenizer without a template), `DEFAULT_HEADERS`:

      [BOS] "### System:\\n{content}\\n\\n" "### User:\\n{content}\\n\\n" "### Assistant:\\n"{content}[EOS]
      "### User:\\n{content}\\n\\n" "### Assistant:\\n"{content}[EOS] ...

  BOS first as in pretraining (for an HF tokenizer: when its `add_bos` says so); every assistant turn is
  closed by the real EOS id. Text pieces are encoded separately (prompt text, then each answer), so no
  token straddles a prompt/answer boundary; `default_chat_ids` gives the same ids for generation.
- prompt/completion records are raw text in either mode: [BOS] prompt completion [EOS] (BOS as in
  "default"), prompt and completion encoded separately.

Loss mask rule: a token is trained exactly when it belongs to an assistant turn's answer: in "default" and
prompt/completion, the answer's tokens and the EOS closing it; with a template, every token whose character
span overlaps the turn's span, where the span ends at the turn's last special token when only whitespace
follows it (ChatML: content + "<|im_end|>" trained, the "\\n" after it not). System and user turns, headers
and generation prompts are never trained. Each example of n tokens gives n - 1 (input, target) pairs;
pair t is trained when token t + 1 is.

Truncation (`sft.truncation`): an example longer than data.seq_len + 1 tokens (more than one row of pairs)
is dropped ("drop") or cut to its first seq_len + 1 tokens ("truncate"; one that then has no trained token
left is dropped too, counted as `untrained`).

Packing: every process reads and tokenizes all examples (at build time, held in memory), orders them by a
permutation seeded by data.shuffle_seed (source order when data.shuffle is False), and packs them once with
`data.packing.pack_rows` (first fit over data.packing_bins open rows) into rows of data.seq_len with
segment ids (1, 2, ... per example in a row, 0 = padding) and positions restarting at 0 per example. The
packed rows are fixed for the run, so `stats.rows_per_epoch` is exact; each epoch visits them in a new
seeded order (grain's per-epoch reshuffle), for data.num_epochs epochs (None: forever). Global batches of
data.batch_size rows are cut from that stream (a batch may span two epochs; the last one is padded
with all-padding rows), and each process keeps its rows [p * local, (p + 1) * local): the stream does not
depend on the process count, so a run resumes on any number of processes. Memory: about 20 bytes per
row position. data.num_workers is not used (nothing is left to compute per batch).

Batches are {field: [local_batch, seq_len]} with `data.packing.BATCH_FIELDS` ("inputs", "targets",
"segment_ids", "positions" int32, "loss_mask" float32), as the pretraining pipeline emits, so
`train.step.next_token_loss` applies unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import grain
import jax
import ml_collections
import numpy as np
from pydantic import Field

from configs.schema import ConfigError, parse, section, to_dict
from data.config import DataConfig, _plain, as_data_config
from data.hf_tokenizer import HFTokenizer
from data.jsonl import JSONLError, read_jsonl
from data.packing import PAIR_FIELDS, PadBatch, pack_rows
from data.pipeline import DataIterator, TakeRows, _derived_seed
from data.sources import expand_paths
from data.tokenizer import Tokenizer

ROLES: tuple[str, ...] = ("system", "user", "assistant")
DEFAULT_HEADERS: dict[str, str] = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_SEPARATOR = "\n\n"  # closes a system or user turn in the default format
PACK_ORDER_SALT = 0x534654  # "SFT": derives the packing order's seed from the shuffle seed
ROW_SHUFFLE_SALT = 0x524F57  # "ROW": derives the per-epoch row shuffle's seed
DATA_FINGERPRINT = ("examples_kept", "rows_per_epoch", "tokens")  # stream config entries that describe the data
CONFIG_PATH = "sft.data"  # where run configs hold the SFTDataConfig section, named in errors


@section
class SFTDataConfig:
    """How SFT records become examples (the rest of the data settings are `data.config.DataConfig`).

    chat_template: "auto" uses the tokenizer's own chat template when it has one, else codelm's default
      format; "model" requires the tokenizer's template; "default" always uses codelm's format.
    truncation: what happens to an example longer than data.seq_len + 1 tokens: "drop" or "truncate".
    max_examples: read at most this many records (0: all).
    """

    chat_template: Literal["auto", "model", "default"] = "auto"
    truncation: Literal["drop", "truncate"] = "drop"
    max_examples: Annotated[int, Field(ge=0)] = 0


def as_sft_data_config(
    cfg: SFTDataConfig | ml_collections.ConfigDict | Mapping[str, Any], path: str = CONFIG_PATH
) -> SFTDataConfig:
    """`cfg` validated as an SFTDataConfig; a ConfigError names the field under `path` ("sft.data.truncation: ...")."""
    if isinstance(cfg, SFTDataConfig):
        return cfg
    return parse(SFTDataConfig, _plain(cfg), path)


# ---- records


@dataclasses.dataclass(frozen=True)
class Example:
    """One validated record. Exactly one of `messages` and (`prompt`, `completion`) is set."""

    where: str  # "<file>:<line>"
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None


def parse_example(record: Mapping[str, Any], where: str) -> Example:
    """Validates a JSON record as a conversation or a prompt/completion pair; raises JSONLError naming the field."""
    has_messages = "messages" in record
    has_pair = "prompt" in record or "completion" in record
    if has_messages == has_pair:
        raise JSONLError(
            f"{where}: expected either 'messages' or 'prompt' and 'completion', got fields {sorted(record)}"
        )
    if has_pair:
        for field in ("prompt", "completion"):
            if field not in record:
                raise JSONLError(f"{where}: {field}: missing")
            if not isinstance(record[field], str):
                raise JSONLError(f"{where}: {field}: expected a string, got {type(record[field]).__name__}")
        return Example(where, prompt=record["prompt"], completion=record["completion"])
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise JSONLError(f"{where}: messages: expected a non-empty list, got {_describe(messages)}")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise JSONLError(f"{where}: messages[{i}]: expected an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            got = "nothing" if "role" not in message else repr(role)
            raise JSONLError(f"{where}: messages[{i}].role: expected one of {', '.join(ROLES)}, got {got}")
        if not isinstance(content, str):
            got = "nothing" if "content" not in message else type(content).__name__
            raise JSONLError(f"{where}: messages[{i}].content: expected a string, got {got}")
        parsed.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in parsed):
        raise JSONLError(f"{where}: messages: no assistant turn (nothing to train on)")
    return Example(where, messages=tuple(parsed))


def _describe(value: Any) -> str:
    return "an empty list" if value == [] else type(value).__name__


def sft_files(data: DataConfig, split: str) -> list[str]:
    """The JSONL files of `split`, source by source in name order, each source's files in glob order."""
    files = []
    for name in sorted(data.sources):
        source = data.sources[name]
        field = f"data.sources.{name}"
        if source.kind != "jsonl":
            raise ConfigError(f"{field}.kind: SFT reads JSONL sources, got {source.kind!r}")
        if source.weight != 1.0:
            raise ConfigError(f"{field}.weight: SFT concatenates its sources; weight must be 1.0, got {source.weight}")
        if split not in source.splits:
            raise ConfigError(f"{field}.splits: no {split!r} entry (has {sorted(source.splits)})")
        files.extend(expand_paths(source.splits[split], f"{field}.splits.{split}"))
    return files


def read_examples(paths: Sequence[str], max_examples: int = 0) -> Iterator[Example]:
    """Validated examples of `paths` in order, at most `max_examples` (0: all)."""
    count = 0
    for path in paths:
        for line in read_jsonl(path):
            if max_examples and count >= max_examples:
                return
            yield parse_example(line.record, line.where)
            count += 1


# ---- formats: example -> (ids [n], trained [n])


def _concat(pieces: Sequence[tuple[Sequence[int], bool]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) pieces -> int32 ids [n] and bool trained [n]."""
    ids = np.fromiter((i for piece, _ in pieces for i in piece), dtype=np.int32)
    trained = np.fromiter((flag for piece, flag in pieces for _ in piece), dtype=bool, count=len(ids))
    return ids, trained


class DefaultFormat:
    """codelm's plain-text chat layout (module docstring), for any tokenizer; also prompt/completion pairs."""

    name = "default"

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.eos_id is None:
            raise ValueError(f"{tokenizer!r}: the default SFT format needs an EOS token to close assistant turns")
        self._tokenizer = tokenizer
        self._bos = [tokenizer.bos_id] if _adds_bos(tokenizer) else []
        self._eos = [tokenizer.eos_id]

    def conversation_pieces(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> list[tuple[list[int], bool]]:
        """[(ids, trained)]: BOS, then prompt text and answers (+ EOS) alternating; a trailing prompt
        ends with the assistant header when `add_generation_prompt`."""
        pieces: list[tuple[list[int], bool]] = [(self._bos, False)]
        prompt = ""
        for message in messages:
            prompt += DEFAULT_HEADERS[message["role"]]
            if message["role"] != "assistant":
                prompt += message["content"] + TURN_SEPARATOR
                continue
            pieces += [(self._tokenizer.encode(prompt), False), (self._tokenizer.encode(message["content"]), True)]
            pieces.append((self._eos, True))
            prompt = ""
        if add_generation_prompt:
            prompt += DEFAULT_HEADERS["assistant"]
        if prompt:
            pieces.append((self._tokenizer.encode(prompt), False))
        return pieces

    def conversation(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        return _concat(self.conversation_pieces(example.messages))

    def prompt_completion(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """[BOS] prompt (untrained) completion EOS (trained)."""
        return _concat([
            (self._bos, False),
            (self._tokenizer.encode(example.prompt), False),
            (self._tokenizer.encode(example.completion), True),
            (self._eos, True),
        ])


def _adds_bos(tokenizer: Tokenizer) -> bool:
    """BOS first as in pretraining (codelm's tokenizers), or as the HF model's tokenizer does (`add_bos`)."""
    return tokenizer.bos_id is not None and bool(getattr(tokenizer, "add_bos", True))


class TemplateFormat:
    """The tokenizer's own chat template, assistant spans located by rendering prefixes (module docstring)."""

    name = "template"

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer = tokenizer
        self._default = DefaultFormat(tokenizer)  # prompt/completion pairs are raw text
        self._specials = tuple(sorted(tokenizer.special_ids, key=len, reverse=True))

    def assistant_spans(self, messages: Sequence[Mapping[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and each assistant turn's trained character span [start, end)."""
        render = lambda ms, prompt: self._render(ms, prompt, where)  # noqa: E731
        text = render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError(
                    f"{where}: messages[{i}]: the chat template is not prefix-consistent (rendering the turns "
                    f"before it with the generation prompt, and through it, do not prefix the whole conversation: "
                    f"the template rewrites earlier turns), so the assistant tokens cannot be located; "
                    f"use {CONFIG_PATH}.chat_template='default' or a template that keeps history verbatim"
                )
            start, end = len(before), self._trained_end(through, len(before))
            if end <= start:
                raise ValueError(f"{where}: messages[{i}]: the chat template renders nothing for this assistant turn")
            spans.append((start, end))
        return text, spans

    def _trained_end(self, text: str, start: int) -> int:
        """End of the turn text[start:]: before trailing whitespace that follows a closing special token."""
        stripped = text.rstrip()
        if len(stripped) > start and any(stripped.endswith(token) for token in self._specials):
            return len(stripped)
        return len(text)

    def _render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, where: str) -> str:
        try:
            return self._tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja raises many types (TemplateError, TypeError from template code)
            raise ValueError(f"{where}: the chat template failed: {type(error).__name__}: {error}") from None

    def conversation(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        text, spans = self.assistant_spans(example.messages, example.where)
        ids, offsets = self._tokenizer.encode_with_offsets(text, parse_special=True)
        trained = np.zeros(len(ids), dtype=bool)
        for index, (a, b) in enumerate(offsets):
            trained[index] = any(a < end and b > start for start, end in spans)
        return np.asarray(ids, dtype=np.int32), trained

    def prompt_completion(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        return self._default.prompt_completion(example)


def chat_format(tokenizer: Tokenizer, mode: str) -> DefaultFormat | TemplateFormat:
    """The format `SFTDataConfig.chat_template` (`mode`) selects for `tokenizer`."""
    has_template = isinstance(tokenizer, HFTokenizer) and tokenizer.has_chat_template
    if mode == "model" and not has_template:
        raise ConfigError(f"{CONFIG_PATH}.chat_template: 'model' needs a chat template; {tokenizer!r} has none")
    if mode in ("auto", "model") and has_template:
        return TemplateFormat(tokenizer)
    return DefaultFormat(tokenizer)


def default_chat_ids(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages` in codelm's default format, ending with the assistant header when
    `add_generation_prompt` (the prompt a model fine-tuned on this format is sampled from)."""
    ids, _ = _concat(DefaultFormat(tokenizer).conversation_pieces(messages, add_generation_prompt))
    return ids.tolist()


def tokenize_example(example: Example, fmt: DefaultFormat | TemplateFormat) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], trained bool [n]) of one example."""
    return fmt.conversation(example) if example.messages is not None else fmt.prompt_completion(example)


def example_pairs(ids: np.ndarray, trained: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token pairs of one example: {"inputs", "targets" int32 [n-1], "loss_mask" float32 [n-1]}."""
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": trained[1:].astype(np.float32)}


# ---- statistics and packing


@dataclasses.dataclass(frozen=True)
class SFTStats:
    """What the run summary reports. Token counts are (input, target) pairs, i.e. non-padding row positions."""

    chat_format: str  # "template" or "default"
    examples_read: int
    examples_kept: int  # packed (including truncated ones)
    truncated: int  # cut to seq_len + 1 tokens (truncation "truncate")
    dropped: int  # longer than seq_len + 1 tokens (truncation "drop")
    untrained: int  # dropped because truncation left no trained token
    tokens: int
    trained_tokens: int
    rows_per_epoch: int
    seq_len: int

    @property
    def packing_efficiency(self) -> float:
        """Share of row positions holding tokens."""
        return self.tokens / max(1, self.rows_per_epoch * self.seq_len)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "packing_efficiency": self.packing_efficiency}


def tokenize_examples(
    examples: Iterator[Example], fmt: DefaultFormat | TemplateFormat, seq_len: int, truncation: str
) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Pairs of every kept example (at most `seq_len` each) and the counts of `SFTStats`."""
    kept: list[dict[str, np.ndarray]] = []
    counts = dict.fromkeys(("examples_read", "truncated", "dropped", "untrained", "tokens", "trained_tokens"), 0)
    for example in examples:
        counts["examples_read"] += 1
        ids, trained = tokenize_example(example, fmt)
        if len(ids) > seq_len + 1:
            if truncation == "drop":
                counts["dropped"] += 1
                continue
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            if not trained[1:].any():
                counts["untrained"] += 1
                continue
            counts["truncated"] += 1
        if len(ids) < 2:
            raise ValueError(f"{example.where}: the example has {len(ids)} token(s); it needs at least 2")
        pairs = example_pairs(ids, trained)
        counts["tokens"] += len(pairs["inputs"])
        counts["trained_tokens"] += int(pairs["loss_mask"].sum())
        kept.append(pairs)
    return kept, counts


def pack_examples(
    examples: Sequence[Mapping[str, np.ndarray]], order: np.ndarray, seq_len: int, num_bins: int, pad_id: int
) -> dict[str, np.ndarray]:
    """`examples` (pairs, each at most seq_len) in `order`, packed by `data.packing.pack_rows`.

    Returns {field: [rows, seq_len]} with `BATCH_FIELDS`.
    """
    chunks = grain.MapDataset.source([examples[i] for i in order]).to_iter_dataset()
    rows = list(pack_rows(chunks, seq_len, num_bins, pad_id, PAIR_FIELDS))
    return {field: np.stack([row[field] for row in rows]) for field in rows[0]}


class PackedRows(Sequence):
    """Row i of packed arrays {field: [rows, seq_len]} as {field: [seq_len]} (a grain source)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._arrays = dict(arrays)
        self._length = len(next(iter(self._arrays.values())))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return {field: values[index] for field, values in self._arrays.items()}


class SFTIterator(DataIterator):
    """Host-local SFT batches (`DataIterator`: get_state/set_state/close) with the data's statistics.

    stats: `SFTStats`. total_batches: global batches in the whole stream (None: num_epochs is None).
    The state's "epoch" counts completed passes over the packed rows.
    """

    def __init__(
        self, dataset: grain.IterDataset, stream_config: dict[str, Any], stats: SFTStats, total_batches: int | None
    ):
        super().__init__(dataset, stream_config, max(1, stats.rows_per_epoch))
        self.stats = stats
        self.total_batches = total_batches

    @property
    def rows_per_epoch(self) -> int:
        return self.stats.rows_per_epoch

    def set_state(self, state: Mapping[str, Any]) -> None:
        """`DataIterator.set_state`; a changed setting is named before the data fingerprint it changes."""
        saved = state.get("config", {})
        for key, value in self._stream_config.items():
            if key not in DATA_FINGERPRINT and key in saved and saved[key] != value:
                raise ValueError(
                    f"data iterator state was saved with {key}={saved[key]!r} but this pipeline has {key}={value!r}"
                )
        super().set_state(state)


def build_sft_iterator(
    data: DataConfig | ml_collections.ConfigDict | Mapping[str, Any],
    sft: SFTDataConfig | ml_collections.ConfigDict | Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    split: str,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
) -> SFTIterator:
    """Reads, tokenizes and packs the SFT examples of `split`; returns this process's batch iterator.

    Args:
      data: the `data` section (sources, seq_len, global batch_size, shuffle, shuffle_seed, num_epochs,
        packing_bins, read_threads, prefetch_buffer_size); validated by `data.config.as_data_config`.
      sft: `SFTDataConfig` (or its mapping).
      tokenizer: an `HFTokenizer` (its chat template when it has one) or codelm's tokenizer.
      split: the entry of each source's `splits` to read.
      process_index, process_count: this process's slot; default from JAX. Each emits
        data.batch_size // process_count rows of every global batch.
      seed: overrides data.shuffle_seed (packing order and per-epoch row order).

    Returns:
      An `SFTIterator` of {field: [local_batch, seq_len]} batches.
    """
    cfg = as_data_config(data)
    sft = as_sft_data_config(sft)
    if seed is not None:
        cfg = as_data_config({**to_dict(cfg), "shuffle_seed": seed})
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by process_count={process_count}")
    local_batch = cfg.batch_size // process_count

    files = sft_files(cfg, split)
    fmt = chat_format(tokenizer, sft.chat_template)
    examples, counts = tokenize_examples(read_examples(files, sft.max_examples), fmt, cfg.seq_len, sft.truncation)
    if not examples:
        raise ValueError(
            f"data.sources ({split!r}): no example left to train on ({counts['examples_read']} read, "
            f"{counts['dropped']} dropped as longer than data.seq_len + 1 = {cfg.seq_len + 1} tokens, "
            f"{counts['untrained']} without a trained token after truncation)"
        )
    order = np.arange(len(examples))
    if cfg.shuffle:
        order = np.random.default_rng(_derived_seed(cfg.shuffle_seed, PACK_ORDER_SALT)).permutation(len(examples))
    rows = pack_examples(examples, order, cfg.seq_len, cfg.packing_bins, tokenizer.pad_id)
    stats = SFTStats(chat_format=fmt.name, examples_kept=len(examples), rows_per_epoch=len(rows["inputs"]),
                     seq_len=cfg.seq_len, **counts)

    dataset = grain.MapDataset.source(PackedRows(rows))
    if cfg.shuffle:
        dataset = dataset.shuffle(seed=_derived_seed(cfg.shuffle_seed, ROW_SHUFFLE_SALT))
    dataset = dataset.repeat(cfg.num_epochs)
    batches = (
        dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
        )
        .batch(cfg.batch_size, drop_remainder=False)
        .map(PadBatch(cfg.batch_size, tokenizer.pad_id))
        .map(TakeRows(process_index * local_batch, local_batch))
    )
    total_batches = None if cfg.num_epochs is None else math.ceil(cfg.num_epochs * stats.rows_per_epoch / cfg.batch_size)
    stream_config = {
        "split": split,
        "seed": cfg.shuffle_seed,
        "shuffle": cfg.shuffle,
        "num_epochs": cfg.num_epochs,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "packing_bins": cfg.packing_bins,
        "vocab_size": tokenizer.vocab_size,
        "sources": {name: [cfg.sources[name].kind, cfg.sources[name].splits[split]] for name in sorted(cfg.sources)},
        "sft.chat_template": sft.chat_template,
        "sft.truncation": sft.truncation,
        "sft.max_examples": sft.max_examples,
        "chat_format": fmt.name,
        # The data itself: changed files give other rows, which a saved position would not fit.
        "examples_kept": stats.examples_kept,
        "rows_per_epoch": stats.rows_per_epoch,
        "tokens": stats.tokens,
    }
    return SFTIterator(batches, stream_config, stats, total_batches)


__all__ = [
    "DEFAULT_HEADERS",
    "ROLES",
    "SFTDataConfig",
    "SFTIterator",
    "SFTStats",
    "as_sft_data_config",
    "build_sft_iterator",
    "default_chat_ids",
]

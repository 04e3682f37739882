"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle"): teach a left-to-right model to infill by moving a random middle span to the end.

Token layouts (a FIM example is wrapped in BOS ... EOS like any document, so the EOS right after
the middle teaches the model where an infill ends):

  PSM  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
  SPM  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle

SPM is the variant of Bavarian et al.'s appendix D that StarCoder and SantaCoder train with: the
prefix follows <|fim_middle|> directly, so prefix and middle are one contiguous left-to-right
text and a prompt's prefix is a plain continuation point.

Spans: two cut points drawn uniformly and sorted; a unit is permuted with probability `fim_rate`,
in SPM layout with probability `spm_rate`, else PSM.

Levels (`data.fim.level`, a `data.config.FIMConfig`; `data.pipeline.build_iterator` applies the configured one):
  * "chunk" (default): after long documents are split into row-sized chunks, each chunk is
    permuted at token-level cut points (`FIMChunks`). Chunks are cut at seq_len - 3 pairs, so a
    permuted chunk (3 sentinels more) still fits its row and every infill target has its
    <|fim_prefix|> in its own segment, the only context it attends to.
  * "context": Bavarian et al.'s context-level FIM. After packing, each segment of a row (a
    document or a chunk of one) is permuted independently at token-level cut points and the row
    is truncated back to seq_len (`ContextFIMRows`): the last tokens of a row can be lost.
  * "document": the whole file before tokenization, at character-level cut points (`FIMTransform`);
    prefix, middle and suffix are encoded separately. A file longer than a row is then split, so
    its middle usually lands in another row than its <|fim_prefix|>: use it for short documents.
    A record that already has "tokens" is permuted at token level, since its text cannot be
    re-encoded into the same tokens; in a repository document (`data.code.repo`) each file, the
    tokens after a <|file_sep|> up to the next, is permuted on its own (`permute_files`), the
    repository-level FIM of Qwen2.5-Coder and DeepSeek-Coder: an infill target sees the files before.

At token level a BOS leading the unit and an EOS ending it stay in place; a continuation chunk
(neither) is permuted whole and carries no EOS after its middle.

`fim_prefix_rate` measures, on batches, how many infill targets see their <|fim_prefix|>.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from data.config import FIMConfig
from data.packing import PAIR_FIELDS

# Sentinel slots in a FIM order (`fim_order`); content positions are >= 0.
PREFIX_SLOT, SUFFIX_SLOT, MIDDLE_SLOT = -1, -2, -3
# Diagnostic batch field (`build_iterator(..., mark_fim_infill=True)`): 1.0 where the target is an infill target.
FIM_INFILL_FIELD = "fim_infill"


class FIMTokenizer(Protocol):
    fim_prefix_id: int
    fim_middle_id: int
    fim_suffix_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def stream_config(config: FIMConfig) -> dict[str, Any]:
    """{"fim.<field>": value} for every field of `data.fim`: each shapes the stream, so a resumed data
    iterator must match them all."""
    return {f"fim.{field.name}": getattr(config, field.name) for field in dataclasses.fields(config)}


@dataclasses.dataclass(frozen=True)
class FIMSpans:
    """A text split into prefix + middle + suffix (their concatenation is the text)."""

    prefix: str
    middle: str
    suffix: str


@dataclasses.dataclass(frozen=True)
class FIMResult:
    """Output of `permute`: the tokens, and the spans and mode when FIM was applied."""

    tokens: list[int]
    spans: FIMSpans | None
    spm: bool | None


def split_spans(text: str, rng: np.random.Generator) -> FIMSpans:
    """Splits `text` at two uniform random character positions in [0, len(text)]."""
    low, high = draw_cuts(len(text), rng)
    return FIMSpans(text[:low], text[low:high], text[high:])


def draw_cuts(length: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two sorted uniform cut points in [0, length]: prefix [0, low), middle [low, high), suffix [high, length)."""
    low, high = sorted(int(position) for position in rng.integers(0, length + 1, size=2))
    return low, high


def fim_tokens(spans: FIMSpans, tokenizer: FIMTokenizer, spm: bool) -> list[int]:
    """The PSM or SPM token layout of `spans` (module docstring)."""
    prefix, middle, suffix = (tokenizer.encode(piece) for piece in (spans.prefix, spans.middle, spans.suffix))
    return _layout(prefix, middle, suffix, spm, tokenizer)


def _layout(prefix: list[int], middle: list[int], suffix: list[int], spm: bool, ids: FIMTokenizer) -> list[int]:
    if spm:
        return [ids.fim_prefix_id, ids.fim_suffix_id, *suffix, ids.fim_middle_id, *prefix, *middle]
    return [ids.fim_prefix_id, *prefix, ids.fim_suffix_id, *suffix, ids.fim_middle_id, *middle]


def permute(
    text: str, tokenizer: FIMTokenizer, rng: np.random.Generator, fim_rate: float = 0.5, spm_rate: float = 0.5
) -> FIMResult:
    """Tokens of `text`, FIM-permuted with probability `fim_rate` (else plain `encode(text)`)."""
    if rng.random() >= fim_rate:
        return FIMResult(tokenizer.encode(text), None, None)
    spans = split_spans(text, rng)
    spm = bool(rng.random() < spm_rate)
    return FIMResult(fim_tokens(spans, tokenizer, spm), spans, spm)


def fim_order(length: int, low: int, high: int, spm: bool) -> np.ndarray:
    """[length + 3] int64: the FIM layout of content positions 0..length-1 cut at `low` <= `high`.

    Entries >= 0 index the content; PREFIX_SLOT / SUFFIX_SLOT / MIDDLE_SLOT mark the sentinels.
    """
    prefix, middle, suffix = np.arange(0, low), np.arange(low, high), np.arange(high, length)
    if spm:
        parts = [[PREFIX_SLOT, SUFFIX_SLOT], suffix, [MIDDLE_SLOT], prefix, middle]
    else:
        parts = [[PREFIX_SLOT], prefix, [SUFFIX_SLOT], suffix, [MIDDLE_SLOT], middle]
    return np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])


def _gather(order: np.ndarray, values: np.ndarray, sentinels: Sequence[Any]) -> np.ndarray:
    """values[order] with sentinels[k] at the slots -1 - k: [len(order)], dtype of `values`."""
    out = np.empty(len(order), dtype=values.dtype)
    content = order >= 0
    out[content] = values[order[content]]
    for k, sentinel in enumerate(sentinels):
        out[order == -1 - k] = sentinel
    return out


def permute_token_array(tokens: np.ndarray, rng: np.random.Generator, spm: bool, ids: FIMTokenizer) -> np.ndarray:
    """[n] -> [n + 3]: FIM layout of a token array split at two uniform token positions."""
    tokens = np.asarray(tokens, dtype=np.int32)
    order = fim_order(len(tokens), *draw_cuts(len(tokens), rng), spm)
    return _gather(order, tokens, (ids.fim_prefix_id, ids.fim_suffix_id, ids.fim_middle_id))


def permute_files(
    tokens: np.ndarray, rng: np.random.Generator, ids: FIMTokenizer, file_sep_id: int, fim_rate: float, spm_rate: float
) -> np.ndarray:
    """Per-file FIM of a repository document [n] -> [n + 3 * permuted files].

    Each file, the tokens after a <|file_sep|> up to the next one (its path line and content), is
    permuted with probability `fim_rate` (`permute_token_array`); the <|repo_name|> header and the
    separators stay in place, so every file's sentinels follow its own separator. Tokens without a
    separator are one unit.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    separators = np.flatnonzero(tokens == file_sep_id)
    starts = separators + 1 if len(separators) else np.zeros(1, np.int64)
    ends = np.append(separators[1:], len(tokens))
    pieces = [tokens[: starts[0]]]  # the header up to and with the first separator
    for start, end in zip(starts, ends):
        unit = tokens[start:end]
        if len(unit) and rng.random() < fim_rate:
            unit = permute_token_array(unit, rng, bool(rng.random() < spm_rate), ids)
        pieces += [unit, tokens[end:end + 1]]  # the unit, then the next separator (none after the last)
    return np.concatenate(pieces)


def _sentinel_positions(tokens: Sequence[int], ids: FIMTokenizer) -> tuple[int, int] | None:
    """(suffix, middle) sentinel indices of a FIM layout; None when `tokens` does not start with <|fim_prefix|>."""
    if not len(tokens) or tokens[0] != ids.fim_prefix_id:
        return None
    sentinels = (ids.fim_prefix_id, ids.fim_suffix_id, ids.fim_middle_id)
    if [token for token in tokens if token in sentinels] != list(sentinels):
        raise ValueError("malformed FIM sequence: expected one each of <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>")
    return tokens.index(ids.fim_suffix_id), tokens.index(ids.fim_middle_id)


def restore_text(tokens: Sequence[int], tokenizer: FIMTokenizer) -> str:
    """Undoes a FIM layout: decodes the pieces and puts them back in document order.

    Tokens without FIM sentinels are decoded as they are.
    """
    tokens = [int(token) for token in tokens]
    found = _sentinel_positions(tokens, tokenizer)
    if found is None:
        return tokenizer.decode(tokens)
    suffix_at, middle_at = found
    if suffix_at == 1:  # SPM: the prefix and middle follow <|fim_middle|> as one piece
        return tokenizer.decode(tokens[middle_at + 1 :]) + tokenizer.decode(tokens[2:middle_at])
    prefix, suffix, middle = tokens[1:suffix_at], tokens[suffix_at + 1 : middle_at], tokens[middle_at + 1 :]
    return tokenizer.decode(prefix) + tokenizer.decode(middle) + tokenizer.decode(suffix)


def restore_tokens(tokens: Sequence[int], ids: FIMTokenizer) -> list[int]:
    """Undoes a token-level FIM layout ([n + 3] -> [n], the inverse of `permute_token_array`).

    Tokens that do not start with <|fim_prefix|> are returned as they are.
    """
    tokens = [int(token) for token in tokens]
    found = _sentinel_positions(tokens, ids)
    if found is None:
        return tokens
    suffix_at, middle_at = found
    if suffix_at == 1:  # SPM: prefix + middle follow <|fim_middle|>
        return tokens[middle_at + 1 :] + tokens[2:middle_at]
    return tokens[1:suffix_at] + tokens[middle_at + 1 :] + tokens[suffix_at + 1 : middle_at]


def fim_prompt(tokenizer: FIMTokenizer, prefix: str, suffix: str, spm: bool = False, add_bos: bool = True) -> list[int]:
    """Inference prompt asking for the middle between `prefix` and `suffix`.

    Generate from it until EOS; the generated tokens are the middle. `add_bos` matches training,
    where every record starts with BOS.
    """
    encoded_prefix, encoded_suffix = tokenizer.encode(prefix), tokenizer.encode(suffix)
    if spm:
        body = [tokenizer.fim_prefix_id, tokenizer.fim_suffix_id, *encoded_suffix, tokenizer.fim_middle_id, *encoded_prefix]
    else:
        body = [tokenizer.fim_prefix_id, *encoded_prefix, tokenizer.fim_suffix_id, *encoded_suffix, tokenizer.fim_middle_id]
    return [tokenizer.bos_id, *body] if add_bos else body


def _check_rates(fim_rate: float, spm_rate: float) -> None:
    for name, rate in (("fim_rate", fim_rate), ("spm_rate", spm_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")


class FIMTransform(grain.transforms.RandomMap):
    """Document-level FIM: record with "text" -> same record plus "tokens" ([n] int32, no BOS/EOS).

    Records not drawn for FIM get plain `encode(text)`, so every output has "tokens". Records
    that already carry "tokens" are permuted at token level, repository documents file by file
    (module docstring).
    """

    def __init__(
        self,
        tokenizer: FIMTokenizer,
        fim_rate: float = 0.5,
        spm_rate: float = 0.5,
        text_key: str = "text",
        tokens_key: str = "tokens",
    ):
        _check_rates(fim_rate, spm_rate)
        self.tokenizer = tokenizer
        self.fim_rate = fim_rate
        self.spm_rate = spm_rate
        self.text_key = text_key
        self.tokens_key = tokens_key
        # Repository documents are permuted file by file: the tokenizers that splice their separators have the id.
        self.file_sep_id: int | None = getattr(tokenizer, "file_sep_id", None)

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        record = dict(element)
        if self.tokens_key in record:
            tokens = np.asarray(record[self.tokens_key], dtype=np.int32)
            if self.file_sep_id is not None and np.any(tokens == self.file_sep_id):
                tokens = permute_files(tokens, rng, self.tokenizer, self.file_sep_id, self.fim_rate, self.spm_rate)
            elif rng.random() < self.fim_rate:
                tokens = permute_token_array(tokens, rng, bool(rng.random() < self.spm_rate), self.tokenizer)
        else:
            text = record[self.text_key]
            tokens = np.asarray(permute(text, self.tokenizer, rng, self.fim_rate, self.spm_rate).tokens, dtype=np.int32)
        record[self.tokens_key] = tokens
        return record


def permute_pairs(
    pairs: Mapping[str, np.ndarray], rng: np.random.Generator, ids: FIMTokenizer, fim_rate: float, spm_rate: float
) -> dict[str, np.ndarray]:
    """Token-level FIM of one unit of next-token pairs (a chunk or a row segment), with probability `fim_rate`.

    Args:
      pairs: {"inputs", "targets", "loss_mask"}: [p] each, one token stream (inputs[1:] == targets[:-1]).
      rng: draws whether to permute, the mode (SPM with probability `spm_rate`) and the cut points.
      ids: the sentinel, BOS and EOS ids.

    Returns:
      {"inputs", "targets", "loss_mask"}: [p + 3] when permuted, else the [p] input fields. The
      unit's tokens (inputs + last target, [p + 1]) keep a leading BOS and a trailing EOS in place;
      the content between becomes `fim_order`'s layout. Each token keeps its weight as a target;
      sentinels weigh 1, and the first token of a continuation chunk (an input only before) takes
      the weight of its successor. A unit without content (BOS -> EOS) is never permuted.
    """
    inputs, targets = np.asarray(pairs["inputs"]), np.asarray(pairs["targets"])
    loss_mask = np.asarray(pairs["loss_mask"])
    unchanged = {field: np.asarray(pairs[field]) for field in PAIR_FIELDS}
    if not len(inputs):
        return unchanged
    tokens = np.concatenate([inputs, targets[-1:]])  # [p + 1]
    weights = np.concatenate([loss_mask[:1], loss_mask])  # weight of tokens[j] as a target
    head = int(tokens[0] == ids.bos_id)
    tail = int(tokens[-1] == ids.eos_id)  # a unit has >= 2 tokens, so BOS and EOS are distinct positions
    content = slice(head, len(tokens) - tail)
    length = content.stop - content.start
    if length == 0 or rng.random() >= fim_rate:
        return unchanged
    spm = bool(rng.random() < spm_rate)
    order = fim_order(length, *draw_cuts(length, rng), spm)
    sentinels = (ids.fim_prefix_id, ids.fim_suffix_id, ids.fim_middle_id)
    new_tokens = np.concatenate(
        [tokens[: content.start], _gather(order, tokens[content], sentinels), tokens[content.stop :]]
    )
    new_weights = np.concatenate(
        [weights[: content.start], _gather(order, weights[content], (1.0, 1.0, 1.0)), weights[content.stop :]]
    )
    return {
        "inputs": new_tokens[:-1].astype(inputs.dtype),
        "targets": new_tokens[1:].astype(targets.dtype),
        "loss_mask": new_weights[1:].astype(loss_mask.dtype),
    }


class FIMChunks(grain.transforms.RandomMap):
    """Chunk-level FIM: a chunk {"inputs", "targets", "loss_mask"} [p] -> [p + 3] with probability fim_rate.

    Chunks must hold at most seq_len - `data.config.FIM_SENTINELS` (3) pairs to fit a row.
    """

    def __init__(self, ids: FIMTokenizer, fim_rate: float, spm_rate: float):
        _check_rates(fim_rate, spm_rate)
        self.ids = ids
        self.fim_rate = fim_rate
        self.spm_rate = spm_rate

    def random_map(self, chunk: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return permute_pairs(chunk, rng, self.ids, self.fim_rate, self.spm_rate)


def permute_row(
    row: Mapping[str, np.ndarray], rng: np.random.Generator, ids: FIMTokenizer, fim_rate: float, spm_rate: float, pad_id: int
) -> dict[str, np.ndarray]:
    """Context-level FIM of one packed row: each segment permuted (`permute_pairs`), then truncated to the row.

    Args:
      row: {"inputs", "targets", "segment_ids", "positions", "loss_mask"}: [seq_len] each, segments
        numbered 1, 2, ... in order, padding (segment 0) at the end.

    Returns:
      The same fields, [seq_len]: the permuted segments back to back, cut at seq_len (a segment
      can lose its tail or vanish), renumbered 1, 2, ..., positions 0, 1, ... within each segment,
      then padding (pad_id inputs/targets, 0 elsewhere).
    """
    seq_len = len(row["inputs"])
    segment_ids = np.asarray(row["segment_ids"])
    pieces = []
    for segment_id in np.unique(segment_ids[segment_ids > 0]):
        where = segment_ids == segment_id
        pieces.append(permute_pairs({field: row[field][where] for field in PAIR_FIELDS}, rng, ids, fim_rate, spm_rate))
    lengths = [len(piece["inputs"]) for piece in pieces]
    out = {field: np.concatenate([np.asarray(row[field][:0])] + [p[field] for p in pieces])[:seq_len] for field in PAIR_FIELDS}
    out["segment_ids"] = np.repeat(np.arange(1, len(pieces) + 1), lengths)[:seq_len]
    out["positions"] = np.concatenate([np.zeros(0, np.int64)] + [np.arange(n) for n in lengths])[:seq_len]
    padded = {}
    for field in (*PAIR_FIELDS, "segment_ids", "positions"):
        fill = pad_id if field in ("inputs", "targets") else 0
        values = np.full(seq_len, fill, dtype=np.asarray(row[field]).dtype)
        values[: len(out[field])] = out[field]
        padded[field] = values
    return padded


class ContextFIMRows(grain.transforms.RandomMap):
    """Context-level FIM (Bavarian et al.) on packed rows: `permute_row`, every field [seq_len] -> [seq_len]."""

    def __init__(self, ids: FIMTokenizer, fim_rate: float, spm_rate: float, pad_id: int):
        _check_rates(fim_rate, spm_rate)
        self.ids = ids
        self.fim_rate = fim_rate
        self.spm_rate = spm_rate
        self.pad_id = pad_id

    def random_map(self, row: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**row, **permute_row(row, rng, self.ids, self.fim_rate, self.spm_rate, self.pad_id)}


def seen_in_segment(hits: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """[..., T] bool: whether `hits` is true at this or an earlier position of the same segment (same row).

    Args:
      hits: [..., T] bool.
      segment_ids: [..., T] ints; a position starts a new segment where its id differs from its left neighbour.
    """
    hits, segment_ids = np.asarray(hits, dtype=bool), np.asarray(segment_ids)
    shape = hits.shape
    hits, segment_ids = hits.reshape(-1, shape[-1]), segment_ids.reshape(-1, shape[-1])
    starts = np.ones(hits.shape, dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    count = np.cumsum(hits, axis=-1)
    start_index = np.maximum.accumulate(np.where(starts, np.arange(shape[-1]), 0), axis=-1)
    before_start = np.take_along_axis(count - hits, start_index, axis=-1)
    return (count - before_start > 0).reshape(shape)


def infill_targets(inputs: np.ndarray, segment_ids: np.ndarray, middle_id: int) -> np.ndarray:
    """[..., T] float32: 1 where the target follows its FIM unit's <|fim_middle|> (an infill target), else 0.

    A unit is one segment; call it before a document is split (level "document") or after FIM
    (levels "chunk" and "context"), where each segment holds at most one FIM example.
    """
    return (seen_in_segment(np.asarray(inputs) == middle_id, segment_ids) & (np.asarray(segment_ids) > 0)).astype(
        np.float32
    )


class MarkInfill(grain.transforms.Map):
    """Adds FIM_INFILL_FIELD to pairs of one unit ([p]) or to packed rows (by "segment_ids")."""

    def __init__(self, middle_id: int):
        self.middle_id = middle_id

    def map(self, element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = element.get("segment_ids")
        if segment_ids is None:
            segment_ids = np.ones(len(element["inputs"]), dtype=np.int32)
        return {**element, FIM_INFILL_FIELD: infill_targets(element["inputs"], segment_ids, self.middle_id)}


def fim_prefix_rate(batches: Iterable[Mapping[str, np.ndarray]], fim_prefix_id: int) -> dict[str, Any]:
    """How many FIM infill targets have their <|fim_prefix|> in their own row segment.

    Definitions. An infill target is a target position whose token follows the <|fim_middle|> of
    its FIM example (the middle, the prefix too in SPM, and the EOS that ends the example); the
    batches must carry FIM_INFILL_FIELD (`build_iterator(..., mark_fim_infill=True)`), which marks
    them where FIM is applied, before a document is split. It has its prefix when the same row
    segment holds a <|fim_prefix|> input at an earlier position: segments are what attention sees,
    so such a target is predicted with the example's prefix and suffix in context (a segment holds
    at most one FIM example, so "in the segment" and "in the row" agree but for the rare case of
    two chunks of one file packed into the same row). An example piece is a (row, segment) holding
    infill targets.

    Args:
      batches: {field: [batch, seq_len]} with "inputs", "segment_ids" and FIM_INFILL_FIELD.
      fim_prefix_id: the <|fim_prefix|> id.

    Returns:
      {"infill_targets", "with_prefix", "rate" (with_prefix / infill_targets, None when there are
      none), "pieces", "pieces_with_prefix", "piece_rate"}.
    """
    targets = with_prefix = pieces = pieces_with_prefix = 0
    for batch in batches:
        if FIM_INFILL_FIELD not in batch:
            raise ValueError(f"batches carry no {FIM_INFILL_FIELD!r}: build them with build_iterator(..., mark_fim_infill=True)")
        inputs, segment_ids = np.asarray(batch["inputs"]), np.asarray(batch["segment_ids"])
        infill = np.asarray(batch[FIM_INFILL_FIELD]) > 0
        has_prefix = seen_in_segment(inputs == fim_prefix_id, segment_ids) & infill
        targets += int(infill.sum())
        with_prefix += int(has_prefix.sum())
        rows = np.broadcast_to(np.arange(len(inputs))[:, None], inputs.shape)
        piece_keys = rows * (int(segment_ids.max(initial=0)) + 1) + segment_ids
        pieces += len(np.unique(piece_keys[infill]))
        pieces_with_prefix += len(np.unique(piece_keys[has_prefix]))
    return {
        "infill_targets": targets,
        "with_prefix": with_prefix,
        "rate": with_prefix / targets if targets else None,
        "pieces": pieces,
        "pieces_with_prefix": pieces_with_prefix,
        "piece_rate": pieces_with_prefix / pieces if pieces else None,
    }

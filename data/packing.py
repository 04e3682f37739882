"""From records to packed, fixed-length training rows (grain transforms).

A document is BOS + tokens + EOS; a document of n+1 tokens gives n next-token
pairs (inputs[i] -> targets[i]), so no target ever crosses a document boundary.
Steps, each a grain transform:

1. `TokenizeDocument`: record -> the document's pairs {"inputs", "targets",
   "loss_mask"} (1-D, equal length).
2. `SplitLongDocuments`: pairs longer than `seq_len` are cut into consecutive
   chunks of at most `seq_len` pairs. Nothing is dropped: each pair lands in
   exactly one chunk. Each chunk is packed as its own segment, so positions
   restart at 0 in a continuation chunk and attention never reaches back into
   the previous chunk (the documented cost of splitting).
3. `pack_rows`: grain's first-fit packer places chunks into rows of `seq_len`;
   it adds per-segment "segment_ids" (1, 2, ... within a row; 0 = padding) and
   "positions" (0, 1, ... within each segment).
4. `PadBatch`: a final partial batch is filled up with all-padding rows
   (loss_mask 0) instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data.tokenizer import Tokenizer

PAIR_FIELDS: tuple[str, ...] = ("inputs", "targets", "loss_mask")
BATCH_FIELDS: tuple[str, ...] = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def document_pairs(
    tokens: Sequence[int] | np.ndarray,
    bos_id: int,
    eos_id: int,
    token_loss_mask: Sequence[float] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Next-token pairs of BOS + tokens + EOS.

    Args:
      tokens: [n] ids, without BOS/EOS.
      bos_id, eos_id: ids wrapped around `tokens`.
      token_loss_mask: optional [n] weights, one per token of `tokens`; the pair
        whose target is token i gets weight i, and the final pair (target EOS)
        gets the weight of the last token (1 for an empty document).

    Returns:
      {"inputs": int32 [n+1], "targets": int32 [n+1], "loss_mask": float32 [n+1]}.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    document = np.empty(len(tokens) + 2, dtype=np.int32)
    document[0], document[1:-1], document[-1] = bos_id, tokens, eos_id
    loss_mask = np.ones(len(tokens) + 1, dtype=np.float32)
    if token_loss_mask is not None and len(tokens):
        loss_mask[:-1] = token_loss_mask
        loss_mask[-1] = loss_mask[-2]
    return {"inputs": document[:-1], "targets": document[1:], "loss_mask": loss_mask}


class TokenizeDocument(grain.transforms.Map):
    """record -> `document_pairs` of its tokens.

    A record carrying "tokens" (ids without BOS/EOS, e.g. from a FIM transform)
    is not re-tokenized; otherwise its "text" is encoded. An optional per-token
    "loss_mask" (same length as the tokens) is carried through.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._bos_id, self._eos_id = tokenizer.bos_id, tokenizer.eos_id
        self._vocab_size = tokenizer.vocab_size

    def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        where = record.get("path") or "record"
        if "tokens" in record:
            tokens = np.asarray(record["tokens"], dtype=np.int64).reshape(-1)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self._vocab_size):
                raise ValueError(
                    f"{where}: field 'tokens' has ids outside [0, {self._vocab_size}) "
                    f"(min {tokens.min()}, max {tokens.max()})"
                )
        elif isinstance(record.get("text"), str):
            tokens = self._tokenizer.encode(record["text"])
        else:
            raise ValueError(f"{where}: record has neither 'tokens' nor a string 'text' field")
        loss_mask = record.get("loss_mask")
        if loss_mask is not None:
            loss_mask = np.asarray(loss_mask, dtype=np.float32).reshape(-1)
            if len(loss_mask) != len(tokens):
                raise ValueError(
                    f"{where}: field 'loss_mask' has {len(loss_mask)} entries for {len(tokens)} tokens"
                )
        return document_pairs(tokens, self._bos_id, self._eos_id, loss_mask)


class SplitLongDocuments(grain.experimental.FlatMapTransform):
    """Cuts document pairs into consecutive chunks of at most `seq_len` pairs.

    Every field ([n] each, e.g. "inputs", "targets", "loss_mask") is cut at the same places. Chunk-level
    FIM splits at `seq_len - 3`, leaving room in the row for the 3 sentinels it adds.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.max_fan_out = 1  # unused by grain's iterator-level flat map; required by the base

    def flat_map(self, pairs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        length = len(pairs["inputs"])
        if length <= self.seq_len:
            return [dict(pairs)]
        return [
            {field: values[start : start + self.seq_len] for field, values in pairs.items()}
            for start in range(0, length, self.seq_len)
        ]


class _TrainingRow(grain.transforms.Map):
    """grain's packed output -> {field: [seq_len]} with `BATCH_FIELDS` (+ extra packed fields)."""

    def __init__(self, fields: Sequence[str]):
        self._fields = tuple(fields)

    def map(self, packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # All packed fields share one segmentation; keep the copy made for "inputs".
        row = {field: packed[field] for field in self._fields}
        row["segment_ids"] = packed["inputs_segment_ids"]
        row["positions"] = packed["inputs_positions"]
        return row


def pack_rows(
    chunks: grain.IterDataset, seq_len: int, num_bins: int, pad_id: int, fields: Sequence[str] = PAIR_FIELDS
) -> grain.IterDataset:
    """First-fit packs chunks of at most `seq_len` pairs into rows of `seq_len`.

    Args:
      chunks: {field: [p]} for each of `fields` (`PAIR_FIELDS` and optionally more, padded with 0).

    Returns an IterDataset of rows {field: [seq_len]} with `BATCH_FIELDS` and `fields`.
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks,
        length_struct={field: seq_len for field in fields},
        num_packing_bins=num_bins,
        shuffle_bins=False,
        padding_struct={field: pad_id if field in ("inputs", "targets") else 0 for field in fields},
    )
    return packed.map(_TrainingRow(fields))


class PadBatch(grain.transforms.Map):
    """Fills a batch with fewer than `batch_size` rows up with padding rows."""

    def __init__(self, batch_size: int, pad_id: int):
        self._batch_size = batch_size
        self._pad_id = pad_id

    def map(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self._batch_size - len(batch["inputs"])
        if missing == 0:
            return dict(batch)
        padded = {}
        for field, rows in batch.items():
            fill = self._pad_id if field in ("inputs", "targets") else 0
            padding = np.full((missing, *rows.shape[1:]), fill, dtype=rows.dtype)
            padded[field] = np.concatenate([rows, padding])
        return padded

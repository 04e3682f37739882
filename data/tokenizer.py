"""Tokenizers for code: a small interface and a sentencepiece implementation.

Every codelm tokenizer exposes the same special tokens (see `SPECIAL_TOKENS`):
BOS/EOS/pad/unk plus the fill-in-the-middle tokens and repository/file
separators. `encode` never adds BOS/EOS (the data pipeline does that) and never
produces a special token from ordinary text: in the sentencepiece model the
specials are *control* symbols, so the literal string "<|fim_prefix|>" inside a
source file is tokenized as plain text.

Decoding choice: `decode` renders special ids as their token strings (e.g.
`"<|fim_prefix|>"`), so FIM prompts and packed sequences can be displayed;
callers that want only the text cut at the EOS id first.
"""

from __future__ import annotations

import abc
import io
import itertools
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"

# Tokens that are not BOS/EOS/pad/unk but every codelm tokenizer must define.
CONTROL_TOKENS: tuple[str, ...] = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP)
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, *CONTROL_TOKENS)
REQUIRED_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *CONTROL_TOKENS)


class Tokenizer(abc.ABC):
    """What the rest of codelm needs from a tokenizer.

    Subclasses implement `encode`, `decode`, `vocab_size` and `special_ids`;
    the named special-id properties are derived from `special_ids`.
    """

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, never a special id."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are rendered as their token strings."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in [0, vocab_size)."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> dict[str, int]:
        """Token string -> id for every special token (at least `REQUIRED_TOKENS`)."""

    def _check_special_tokens(self, source: str) -> None:
        """Raises ValueError naming `source` if a required special token is missing."""
        missing = [token for token in REQUIRED_TOKENS if token not in self.special_ids]
        if missing:
            raise ValueError(
                f"{source}: tokenizer lacks required special token(s) {missing}; codelm needs "
                f"{list(REQUIRED_TOKENS)} (retrain with data.tokenizer.train_sentencepiece)"
            )

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def fim_prefix_id(self) -> int:
        return self.special_ids[FIM_PREFIX]

    @property
    def fim_middle_id(self) -> int:
        return self.special_ids[FIM_MIDDLE]

    @property
    def fim_suffix_id(self) -> int:
        return self.special_ids[FIM_SUFFIX]

    @property
    def fim_pad_id(self) -> int:
        return self.special_ids[FIM_PAD]

    @property
    def repo_name_id(self) -> int:
        return self.special_ids[REPO_NAME]

    @property
    def file_sep_id(self) -> int:
        return self.special_ids[FILE_SEP]


# sentencepiece marks spaces with U+2581 and decodes every U+2581 back to a space,
# so a literal U+2581 in the input is routed through its UTF-8 byte pieces.
_SPACE_MARK = "\u2581"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (as written by `train_sentencepiece`) behind `Tokenizer`.

    Encoding is exact for any text the model was trained with byte fallback and
    identity normalization for: `decode(encode(t)) == t`. Thread-safe; picklable
    (the serialized model travels with the object, e.g. to grain workers).
    """

    def __init__(self, model_path: str | os.PathLike[str]):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self._load(path.read_bytes(), str(path))

    def _load(self, model_proto: bytes, source: str) -> None:
        self._model_proto = model_proto
        self._source = source
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._special_ids = self._find_special_ids()
        self._check_special_tokens(source)
        self._special_pieces = {token_id: token for token, token_id in self._special_ids.items()}
        self._space_mark_bytes = [self._byte_id(b) for b in _SPACE_MARK.encode("utf-8")]

    def _find_special_ids(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for token in SPECIAL_TOKENS:
            token_id = self._sp.piece_to_id(token)
            if self._sp.id_to_piece(token_id) != token:
                continue  # piece_to_id returns the unk id for unknown pieces
            if token != UNK and not self._sp.is_control(token_id):
                raise ValueError(
                    f"{self._source}: special token {token!r} (id {token_id}) is an ordinary "
                    "piece, so source text containing it would encode as the special token; "
                    "it must be a sentencepiece control symbol"
                )
            found[token] = token_id
        return found

    def _byte_id(self, value: int) -> int:
        token_id = self._sp.piece_to_id(f"<0x{value:02X}>")
        if not self._sp.is_byte(token_id):
            raise ValueError(f"{self._source}: model has no byte fallback piece for 0x{value:02X}")
        return token_id

    def __getstate__(self) -> dict[str, object]:
        return {"model_proto": self._model_proto, "source": self._source}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._load(state["model_proto"], state["source"])  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._source!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    def encode(self, text: str) -> list[int]:
        if _SPACE_MARK not in text:
            return self._sp.encode_as_ids(text)
        parts = text.split(_SPACE_MARK)
        ids = self._sp.encode_as_ids(parts[0])
        for part in parts[1:]:
            ids.extend(self._space_mark_bytes)
            ids.extend(self._sp.encode_as_ids(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        for is_special, run in itertools.groupby(map(int, ids), key=self._special_pieces.__contains__):
            if is_special:
                pieces.extend(self._special_pieces[i] for i in run)
            else:
                pieces.append(self._sp.decode_ids(list(run)))
        return "".join(pieces)

    def id_to_piece(self, token_id: int) -> str:
        """The model's piece for one id (spaces appear as U+2581); for debugging."""
        return self._sp.id_to_piece(token_id)


def _training_sentences(texts: Iterable[str], max_sentence_chars: int) -> Iterator[str]:
    """Cuts documents into line-aligned blocks of at most `max_sentence_chars`.

    sentencepiece learns pieces within one "sentence" and skips sentences over
    its length limit, so whole files are cut into runs of lines; newlines stay
    inside the blocks so pieces like "):\\n" can be learned. A single longer line
    is cut into fixed-size pieces.
    """
    for text in texts:
        block: list[str] = []
        block_chars = 0
        for line in text.splitlines(keepends=True):
            if block and block_chars + len(line) > max_sentence_chars:
                yield "".join(block)
                block, block_chars = [], 0
            if len(line) > max_sentence_chars:
                for start in range(0, len(line), max_sentence_chars):
                    yield line[start : start + max_sentence_chars]
                continue
            block.append(line)
            block_chars += len(line)
        if block:
            yield "".join(block)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    *,
    max_sentence_chars: int = 2048,
    sample_sentences: int = 20_000,
    character_coverage: float = 0.9999,
    num_threads: int | None = None,
    seed: int = 0,
) -> Path:
    """Trains a byte-fallback BPE sentencepiece model for code.

    Whitespace is kept verbatim (identity normalization, no dummy prefix, no
    whitespace collapsing, whitespace-only pieces allowed for indentation),
    digits are split, and ids are: pad 0, unk 1, BOS 2, EOS 3, then
    `CONTROL_TOKENS` in order, then the 256 byte pieces, then learned pieces.

    Args:
      texts: documents (e.g. whole source files).
      model_prefix: the model is written to `<model_prefix>.model`, atomically
        (a reader never sees a partial file).
      vocab_size: total number of ids including specials and byte pieces.
      max_sentence_chars: documents are cut into line-aligned training blocks of
        at most this many characters.
      sample_sentences: at most this many blocks are sampled for training
        (sentencepiece's `input_sentence_size`), bounding training time.
      character_coverage: share of characters given their own piece; rarer
        characters use byte pieces. Tab is always kept.
      num_threads: training threads (default: all CPUs available to the process).
      seed: seed of sentencepiece's sampling, for reproducible models.

    Returns:
      The path of the `.model` file.
    """
    min_vocab = len(SPECIAL_TOKENS) + 256 + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs at least {min_vocab}")
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_proto = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts, max_sentence_chars),
            model_writer=model_proto,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            required_chars="\t",
            character_coverage=character_coverage,
            max_sentence_length=4 * max_sentence_chars,  # a byte limit; UTF-8 is <= 4 bytes/char
            input_sentence_size=sample_sentences,
            shuffle_input_sentence=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=PAD,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            control_symbols=list(CONTROL_TOKENS),
            num_threads=num_threads or len(os.sched_getaffinity(0)),
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(f"sentencepiece training for {model_path} (vocab_size={vocab_size}) failed: {error}") from error
    _write_atomically(model_path, model_proto.getvalue())
    return model_path


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers never see a partial file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)

"""Which tokenizer a path holds: sentencepiece `.model` files or Hugging Face `tokenizer.json`."""

from __future__ import annotations

import os
from pathlib import Path

from data.hf_tokenizer import TOKENIZER_FILE, HFTokenizer
from data.tokenizer import SentencePieceTokenizer, Tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a tokenizer, choosing the implementation from the file name."""
    path = Path(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.name == TOKENIZER_FILE or (path / TOKENIZER_FILE).is_file():
        return HFTokenizer(path)
    raise ValueError(
        f"{path}: unknown tokenizer format (expected a sentencepiece '.model' file, a Hugging Face "
        f"'{TOKENIZER_FILE}', or a directory holding one)"
    )

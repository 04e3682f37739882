"""Tokenizer: exact round trips on tricky code, special tokens, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import sentencepiece as spm

from data import tokenizer as tok_lib
from data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from data.tokenizers import load_tokenizer
from tests.data.conftest import HELDOUT_MODULES, TRAIN_MODULES, read_modules

TRICKY_CODE = {
    "empty": "",
    "single_space": " ",
    "leading_spaces": "   x = 1",
    "tabs": "\tdef f():\n\t\treturn 1\n",
    "mixed_indent": "if x:\n \t  y = 2\n\t    z = 3\n",
    "trailing_spaces": "x = 1   \ny = 2\t \n   \n",
    "crlf": "a = 1\r\nb = 2\r\n",
    "form_feed_vt": "x\x0cy\x0bz",
    "nul_and_controls": "s = '\x00\x01\x1f\x7f'",
    "cjk_emoji": "# 日本語のコメント 😀🐍\nname = 'Ünïcødé'\n",
    "combining_and_rtl": "s = 'e\u0301' + 'ש\u05c1לום' + '\u200b\ufeff'",
    "sentencepiece_space_mark": "a\u2581b \u2581\u2581 c\u2581",
    "unk_surface": "x = '\u2047'",
    "literal_special_tokens": "s = '<|fim_prefix|><|fim_middle|><|fim_suffix|><s></s><pad><unk><|file_sep|>'",
    "digits": "n = 1234567890 + 0x1F + 3.14e-10",
    "very_long_line": "data = [" + ", ".join(str(i) for i in range(40_000)) + "]\n",
    "very_long_token": "x" * 200_000,
    "blank_lines": "\n\n\n\nx\n\n",
}


@pytest.mark.parametrize("name", sorted(TRICKY_CODE))
def test_round_trip_tricky_code(tokenizer: SentencePieceTokenizer, name: str) -> None:
    text = TRICKY_CODE[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert not set(ids) & set(tokenizer.special_ids.values()), "text must never produce special ids"


def test_round_trip_real_code_unseen_in_training(tokenizer: SentencePieceTokenizer) -> None:
    for text in read_modules(HELDOUT_MODULES):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_matches_reference_sentencepiece_processor(tokenizer_path: Path, tokenizer: SentencePieceTokenizer) -> None:
    """Away from the U+2581 workaround, ids are exactly sentencepiece's own."""
    reference = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    for text in read_modules(HELDOUT_MODULES):
        assert "\u2581" not in text
        assert tokenizer.encode(text) == reference.encode(text)
        assert reference.decode(tokenizer.encode(text)) == text


def test_digits_are_split(tokenizer: SentencePieceTokenizer) -> None:
    ids = tokenizer.encode("1234567890")
    assert [tokenizer.decode([i]) for i in ids] == list("1234567890")


def test_indentation_is_compressed(tokenizer: SentencePieceTokenizer) -> None:
    # Whitespace-only pieces are learned, so deep indentation costs one or two tokens.
    assert len(tokenizer.encode(" " * 8)) <= 2
    assert any(set(tokenizer.id_to_piece(i)) == {"\u2581"} for i in range(tokenizer.vocab_size))


def test_special_token_layout(tokenizer: SentencePieceTokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    named = [
        tokenizer.fim_prefix_id,
        tokenizer.fim_middle_id,
        tokenizer.fim_suffix_id,
        tokenizer.fim_pad_id,
        tokenizer.repo_name_id,
        tokenizer.file_sep_id,
    ]
    assert named == [tokenizer.special_ids[t] for t in tok_lib.CONTROL_TOKENS]
    assert len(set(tokenizer.special_ids.values())) == len(tok_lib.SPECIAL_TOKENS)


def test_decode_renders_special_tokens(tokenizer: SentencePieceTokenizer) -> None:
    ids = [
        tokenizer.bos_id,
        tokenizer.fim_prefix_id,
        *tokenizer.encode("def f(\u2581):"),
        tokenizer.fim_suffix_id,
        *tokenizer.encode("    return 1"),
        tokenizer.fim_middle_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
    ]
    assert tokenizer.decode(ids) == "<s><|fim_prefix|>def f(\u2581):<|fim_suffix|>    return 1<|fim_middle|></s><pad>"


def test_pickle_round_trip(tokenizer: SentencePieceTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = TRICKY_CODE["cjk_emoji"]
    assert clone.encode(text) == tokenizer.encode(text)
    assert clone.special_ids == tokenizer.special_ids


def test_training_is_deterministic(tmp_path: Path, tokenizer_path: Path) -> None:
    again = train_sentencepiece(read_modules(TRAIN_MODULES), tmp_path / "again", vocab_size=600)
    assert again.read_bytes() == tokenizer_path.read_bytes()


def test_load_tokenizer_dispatch_and_missing_file(tmp_path: Path, tokenizer_path: Path) -> None:
    assert isinstance(load_tokenizer(tokenizer_path), SentencePieceTokenizer)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="tokenizer.bin.*unknown tokenizer format"):
        load_tokenizer(tmp_path / "tokenizer.bin")


def _train_plain_sentencepiece(prefix: Path, **options: object) -> Path:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_modules(TRAIN_MODULES)),
        model_prefix=str(prefix),
        vocab_size=400,
        byte_fallback=True,
        max_sentence_length=1 << 20,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
        **options,
    )
    return Path(f"{prefix}.model")


def test_model_without_fim_tokens_is_rejected(tmp_path: Path) -> None:
    model = _train_plain_sentencepiece(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain\.model.*<\|fim_prefix\|>"):
        SentencePieceTokenizer(model)


def test_special_tokens_must_be_control_symbols(tmp_path: Path) -> None:
    model = _train_plain_sentencepiece(tmp_path / "user_defined", user_defined_symbols=list(tok_lib.CONTROL_TOKENS))
    with pytest.raises(ValueError, match=r"user_defined\.model.*<\|fim_prefix\|>.*control symbol"):
        SentencePieceTokenizer(model)


def test_vocab_size_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_sentencepiece(["x = 1\n"], tmp_path / "tiny", vocab_size=100)

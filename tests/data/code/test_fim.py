"""FIM: layouts as specified, exact undo (text and token level), configured rates, chunk and context
FIM on pairs and rows, infill marking and the prefix rate, config validation, inference prompts."""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import grain
import numpy as np
import pytest

from configs import base
from configs.schema import ConfigError
from data.code import fim
from data.config import FIMConfig, as_data_config
from tests.data.code.fakes import ByteTokenizer

TOK = ByteTokenizer()
ALPHABET = list("abcdefghij  \n\t()=:_.,") + ["é", "λ", "中", "🙂"]


def random_text(rng: np.random.Generator, max_length: int = 200) -> str:
    return "".join(rng.choice(ALPHABET, size=int(rng.integers(0, max_length))))


def expected_layout(prefix: str, middle: str, suffix: str, spm: bool) -> list[int]:
    """The layouts of the module docstring, written out independently of the implementation."""
    p, m, s = TOK.encode(prefix), TOK.encode(middle), TOK.encode(suffix)
    if spm:
        return [TOK.fim_prefix_id, TOK.fim_suffix_id] + s + [TOK.fim_middle_id] + p + m
    return [TOK.fim_prefix_id] + p + [TOK.fim_suffix_id] + s + [TOK.fim_middle_id] + m


@pytest.mark.parametrize("spm", [False, True], ids=["psm", "spm"])
def test_layout_and_exact_undo(spm: bool) -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = random_text(rng)
        spans = fim.split_spans(text, rng)
        assert spans.prefix + spans.middle + spans.suffix == text
        tokens = fim.fim_tokens(spans, TOK, spm)
        assert tokens == expected_layout(spans.prefix, spans.middle, spans.suffix, spm)
        assert fim.restore_text(tokens, TOK) == text


def test_spans_are_two_uniform_cut_points() -> None:
    # For two sorted uniform points in [0, L], E[len(middle)] = L/3 and P(empty prefix) ~ 2/(L+1).
    rng = np.random.default_rng(1)
    text = "x" * 300
    middles = [len(fim.split_spans(text, rng).middle) for _ in range(4000)]
    assert abs(np.mean(middles) / len(text) - 1 / 3) < 0.02


@pytest.mark.parametrize("fim_rate,spm_rate", [(0.5, 0.5), (0.2, 0.8), (0.9, 0.1)])
def test_rates_match_configuration(fim_rate: float, spm_rate: float) -> None:
    rng = np.random.default_rng(2)
    trials = 4000
    results = [fim.permute(random_text(rng, 50), TOK, rng, fim_rate, spm_rate) for _ in range(trials)]
    permuted = [r for r in results if r.spans is not None]
    spm_count = sum(r.spm for r in permuted)
    assert all(r.tokens[:1] == [TOK.fim_prefix_id] for r in permuted)
    assert all(TOK.fim_prefix_id not in r.tokens for r in results if r.spans is None)
    # Within 4 binomial standard deviations.
    assert abs(len(permuted) - trials * fim_rate) < 4 * np.sqrt(trials * fim_rate * (1 - fim_rate))
    n = len(permuted)
    assert abs(spm_count - n * spm_rate) < 4 * np.sqrt(n * spm_rate * (1 - spm_rate))


def test_rate_extremes() -> None:
    rng = np.random.default_rng(3)
    assert all(fim.permute("abc def", TOK, rng, 0.0).spans is None for _ in range(200))
    assert all(fim.permute("abc def", TOK, rng, 1.0).spans is not None for _ in range(200))


def test_transform_in_a_grain_pipeline_is_deterministic_and_undoable() -> None:
    rng = np.random.default_rng(4)
    records = [{"text": random_text(rng), "path": f"f{i}.py"} for i in range(64)]
    dataset = grain.MapDataset.source(records).random_map(fim.FIMTransform(TOK, fim_rate=0.5), seed=7)
    first, second = list(dataset), list(dataset)
    for record, out, again in zip(records, first, second):
        assert out["path"] == record["path"] and out["text"] == record["text"]
        assert out["tokens"].dtype == np.int32 and out["tokens"].ndim == 1
        np.testing.assert_array_equal(out["tokens"], again["tokens"])
        assert fim.restore_text(out["tokens"].tolist(), TOK) == record["text"]
    assert 16 < sum(out["tokens"][:1].tolist() == [TOK.fim_prefix_id] for out in first) < 48


def test_transform_permutes_pretokenized_records_at_token_level() -> None:
    tokens = np.arange(100, 160, dtype=np.int32)
    transform = fim.FIMTransform(TOK, fim_rate=1.0, spm_rate=0.0)
    out = transform.random_map({"text": "ignored", "tokens": tokens}, np.random.default_rng(0))["tokens"]
    pre, suf, mid = (int(np.flatnonzero(out == i)[0]) for i in (TOK.fim_prefix_id, TOK.fim_suffix_id, TOK.fim_middle_id))
    assert pre == 0 and len(out) == len(tokens) + 3
    restored = np.concatenate([out[1:suf], out[mid + 1 :], out[suf + 1 : mid]])
    np.testing.assert_array_equal(restored, tokens)


@pytest.mark.parametrize("spm", [False, True], ids=["psm", "spm"])
def test_inference_prompt_is_the_training_sequence_up_to_the_middle(spm: bool) -> None:
    prefix, middle, suffix = "def add(a, b):\n    ", "return a + b", "\n\nprint(add(1, 2))\n"
    prompt = fim.fim_prompt(TOK, prefix, suffix, spm=spm)
    training = [TOK.bos_id] + fim.fim_tokens(fim.FIMSpans(prefix, middle, suffix), TOK, spm)
    assert training[: len(prompt)] == prompt
    # What the model must generate after the prompt is exactly the middle.
    assert TOK.decode(training[len(prompt) :]) == middle
    assert fim.fim_prompt(TOK, prefix, suffix, spm=spm, add_bos=False) == prompt[1:]


def tokens_of(pairs: dict) -> list[int]:
    """The token stream of next-token pairs: inputs + the last target."""
    assert np.array_equal(pairs["inputs"][1:], pairs["targets"][:-1]), "pairs are not one token stream"
    return [*pairs["inputs"].tolist(), int(pairs["targets"][-1])]


def unit_pairs(tokens: list[int], weights: list[float] | None = None) -> dict[str, np.ndarray]:
    array = np.asarray(tokens, dtype=np.int32)
    mask = np.ones(len(tokens) - 1, np.float32) if weights is None else np.asarray(weights, np.float32)
    return {"inputs": array[:-1], "targets": array[1:], "loss_mask": mask}


@pytest.mark.parametrize("spm", [False, True], ids=["psm", "spm"])
def test_token_level_layout_and_exact_undo(spm: bool) -> None:
    rng = np.random.default_rng(7)
    for length in [0, 1, 2, 5, 40]:
        tokens = np.arange(100, 100 + length, dtype=np.int32)
        low, high = fim.draw_cuts(length, np.random.default_rng(length))
        out = fim.permute_token_array(tokens, np.random.default_rng(length), spm, TOK)
        p, m, s = tokens[:low].tolist(), tokens[low:high].tolist(), tokens[high:].tolist()
        expected = [TOK.fim_prefix_id, TOK.fim_suffix_id, *s, TOK.fim_middle_id, *p, *m] if spm else [
            TOK.fim_prefix_id, *p, TOK.fim_suffix_id, *s, TOK.fim_middle_id, *m]
        assert out.tolist() == expected and out.dtype == np.int32
        assert fim.restore_tokens(out, TOK) == tokens.tolist()
        assert fim.restore_tokens(fim.permute_token_array(tokens, rng, spm, TOK), TOK) == tokens.tolist()
    assert fim.restore_tokens([10, 11], TOK) == [10, 11]


@pytest.mark.parametrize(
    "tokens, head, tail",
    [
        ([TOK.bos_id, *range(20, 40), TOK.eos_id], 1, 1),  # a whole document
        ([TOK.bos_id, *range(20, 40)], 1, 0),  # the first chunk of a long one
        ([*range(20, 40)], 0, 0),  # a continuation chunk
        ([*range(20, 40), TOK.eos_id], 0, 1),  # the last chunk
    ],
    ids=["document", "first", "continuation", "last"],
)
def test_permute_pairs_keeps_bos_eos_and_undoes_exactly(tokens: list[int], head: int, tail: int) -> None:
    weights = np.linspace(0.1, 1.0, len(tokens) - 1).astype(np.float32)  # distinct weights, to follow them
    weight_of = {token: float(w) for token, w in zip(tokens[1:], weights)}
    weight_of[tokens[0]] = float(weights[0])  # a continuation chunk's first token takes its successor's weight
    for seed in range(20):
        out = fim.permute_pairs(unit_pairs(tokens, weights), np.random.default_rng(seed), TOK, 1.0, 0.5)
        assert len(out["inputs"]) == len(tokens) - 1 + 3
        stream = tokens_of(out)
        assert stream[:head] == tokens[:head] and stream[len(stream) - tail :] == tokens[len(tokens) - tail :]
        content = stream[head : len(stream) - tail]
        assert content[0] == TOK.fim_prefix_id
        assert fim.restore_tokens(content, TOK) == tokens[head : len(tokens) - tail]
        sentinels = (TOK.fim_prefix_id, TOK.fim_suffix_id, TOK.fim_middle_id)
        expected = [1.0 if t in sentinels else weight_of[t] for t in stream[1:]]
        np.testing.assert_allclose(out["loss_mask"], expected)
    unchanged = fim.permute_pairs(unit_pairs(tokens), np.random.default_rng(0), TOK, 0.0, 0.5)
    assert tokens_of(unchanged) == tokens
    empty = unit_pairs([TOK.bos_id, TOK.eos_id])
    assert tokens_of(fim.permute_pairs(empty, np.random.default_rng(0), TOK, 1.0, 0.5)) == [TOK.bos_id, TOK.eos_id]


def packed_row(units: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
    """A row as the packer makes it: units' pairs back to back, then padding."""
    pieces = [unit_pairs(unit) for unit in units]
    lengths = [len(p["inputs"]) for p in pieces]
    row = {f: np.concatenate([p[f] for p in pieces]) for f in ("inputs", "targets", "loss_mask")}
    row["segment_ids"] = np.repeat(np.arange(1, len(units) + 1), lengths).astype(np.int32)
    row["positions"] = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    pad = seq_len - sum(lengths)
    return {f: np.concatenate([v, np.zeros(pad, v.dtype)]) for f, v in row.items()}


def test_context_level_permutes_each_segment_and_truncates_the_row() -> None:
    units = [[TOK.bos_id, *range(20, 30), TOK.eos_id], [*range(40, 52)], [TOK.bos_id, *range(60, 75), TOK.eos_id]]
    seq_len = 40  # 11 + 11 + 16 = 38 pairs: two sentinels of room, so the last segment loses 7 pairs
    row = packed_row(units, seq_len)
    out = fim.permute_row(row, np.random.default_rng(3), TOK, 1.0, 0.5, TOK.pad_id)
    assert {f: (v.shape, v.dtype) for f, v in out.items()} == {f: (v.shape, v.dtype) for f, v in row.items()}
    assert out["segment_ids"].tolist() == [1] * 14 + [2] * 14 + [3] * 12
    assert out["positions"].tolist() == [*range(14), *range(14), *range(12)]
    for segment_id, unit in zip((1, 2), units):
        where = out["segment_ids"] == segment_id
        stream = tokens_of({f: out[f][where] for f in ("inputs", "targets")})
        head, tail = int(unit[0] == TOK.bos_id), int(unit[-1] == TOK.eos_id)
        assert stream[:head] == unit[:head] and stream[len(stream) - tail :] == unit[len(unit) - tail :]
        assert fim.restore_tokens(stream[head : len(stream) - tail], TOK) == unit[head : len(unit) - tail]
    last = out["inputs"][out["segment_ids"] == 3].tolist()
    assert last[:2] == [TOK.bos_id, TOK.fim_prefix_id]
    unchanged = fim.permute_row(row, np.random.default_rng(3), TOK, 0.0, 0.5, TOK.pad_id)
    for field, values in row.items():
        np.testing.assert_array_equal(unchanged[field], values, err_msg=field)


def test_infill_targets_follow_the_middle_sentinel_within_each_segment() -> None:
    rng = np.random.default_rng(8)
    tokens = rng.choice([TOK.fim_middle_id, TOK.fim_prefix_id, 50, 51, 52], size=(3, 30), p=[0.05, 0.05, 0.3, 0.3, 0.3])
    segment_ids = np.sort(rng.integers(0, 4, size=(3, 30)), axis=1)
    marked = fim.infill_targets(tokens, segment_ids, TOK.fim_middle_id)
    for row in range(3):
        for i in range(30):
            start = i
            while start > 0 and segment_ids[row, start - 1] == segment_ids[row, i]:
                start -= 1
            after_middle = TOK.fim_middle_id in tokens[row, start : i + 1].tolist() and segment_ids[row, i] > 0
            assert marked[row, i] == float(after_middle)


def test_prefix_rate_counts_infill_targets_and_pieces() -> None:
    pre, mid = TOK.fim_prefix_id, TOK.fim_middle_id
    # Row 0: segment 1 has its prefix before the middle (3 infill targets); segment 2 is the rest of
    # that middle in another chunk (2 infill targets, no prefix). Row 1: no FIM.
    inputs = np.array([[1, pre, 20, mid, 21, 22, 23, 24], [1, 20, 21, 22, 23, 24, 25, 0]])
    segment_ids = np.array([[1, 1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 1, 0]])
    infill = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8], np.float32)
    batch = {"inputs": inputs, "segment_ids": segment_ids, fim.FIM_INFILL_FIELD: infill}
    assert fim.fim_prefix_rate([batch, batch], pre) == {
        "infill_targets": 10, "with_prefix": 6, "rate": 0.6, "pieces": 4, "pieces_with_prefix": 2, "piece_rate": 0.5,
    }
    assert fim.fim_prefix_rate([], pre)["rate"] is None
    with pytest.raises(ValueError, match="mark_fim_infill=True"):
        fim.fim_prefix_rate([{"inputs": inputs, "segment_ids": segment_ids}], pre)


def test_stream_config_holds_every_fim_field() -> None:
    config = FIMConfig(fim_rate=0.2, spm_rate=0.7, level="document")
    assert fim.stream_config(config) == {"fim.fim_rate": 0.2, "fim.spm_rate": 0.7, "fim.level": "document"}
    assert len(fim.stream_config(config)) == len(dataclasses.fields(FIMConfig))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"level": "file"}, r"^data\.fim\.level: input should be 'chunk', 'context' or 'document', got 'file'$"),
        ({"fim_rate": 1.5}, r"^data\.fim\.fim_rate: input should be less than or equal to 1, got 1\.5$"),
        ({"spm_rate": "half"}, r"^data\.fim\.spm_rate: input should be a valid number, .*, got 'half'$"),
        ({"levle": "chunk"}, r"^no field 'data\.fim\.levle'; did you mean 'data\.fim\.level'\?$"),
    ],
)
def test_validation_names_the_field(change: dict, message: str) -> None:
    data = base.get_config().data.to_dict()
    data["fim"].update(change)
    with pytest.raises(ConfigError, match=message):
        as_data_config(data)


def test_transform_checks_its_rates() -> None:
    with pytest.raises(ValueError, match="fim_rate"):
        fim.FIMTransform(TOK, fim_rate=-0.1)


def test_malformed_fim_sequence_is_rejected() -> None:
    with pytest.raises(ValueError, match="malformed"):
        fim.restore_text([TOK.fim_prefix_id, 20, TOK.fim_middle_id, 21, TOK.fim_suffix_id], TOK)


def test_round_trip_with_the_real_sentencepiece_tokenizer(tokenizer) -> None:
    """`tokenizer` is the small sentencepiece model trained by tests/data/conftest.py."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text(encoding="utf-8")[:3000]
    rng = np.random.default_rng(6)
    for spm in (False, True):
        for _ in range(20):
            spans = fim.split_spans(text, rng)
            tokens = fim.fim_tokens(spans, tokenizer, spm)
            assert sum(t in (tokenizer.fim_prefix_id, tokenizer.fim_middle_id, tokenizer.fim_suffix_id) for t in tokens) == 3
            assert fim.restore_text(tokens, tokenizer) == text

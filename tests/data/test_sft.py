"""SFT data: loss masks checked token by token against the chat rendering (a ChatML template on a Qwen-style
HF tokenizer, codelm's default format on its sentencepiece tokenizer), prompt/completion, truncation, record
errors, packing, epochs, process split and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from configs.schema import ConfigError
from data.hf_tokenizer import HFTokenizer
from data.jsonl import JSONLError
from data.sft import SFTDataConfig, as_sft_data_config, build_sft_iterator, default_chat_ids
from data.tokenizer import SentencePieceTokenizer
from tests.models.test_hf_tokenizer import byte_level_tokenizer

# Contents start with a non-space character: a byte-level pre-tokenizer may merge leading spaces with the
# newline that ends the assistant header, which the independent ChatML parser below does not model.
CONVERSATIONS = [
    [{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": "def f():\n    return 1\n"}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}, {"role": "user", "content": "Types?"},
     {"role": "assistant", "content": "def add(a: int, b: int) -> int:\n    return a + b"}],
    [{"role": "user", "content": "ünïcode ✓?"}, {"role": "assistant", "content": "print('✓')"},
     {"role": "user", "content": "Again."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Once more."}, {"role": "assistant", "content": "x = 1"},
     {"role": "user", "content": "Thanks."}],
    [{"role": "user", "content": "json?"}, {"role": "assistant", "content": "import json\njson.dumps({})"}],
    [{"role": "user", "content": "Loop."}, {"role": "assistant", "content": "for i in range(3):\n    print(i)"}],
    [{"role": "user", "content": "Sort a list."}, {"role": "assistant", "content": "sorted(xs)"},
     {"role": "user", "content": "Reversed."}, {"role": "assistant", "content": "sorted(xs, reverse=True)"}],
]
PAIRS = [{"prompt": "# add two numbers\ndef add(a, b):\n", "completion": "    return a + b\n"},
         {"prompt": "x = [3, 1, 2]\n", "completion": "x.sort()"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_level_tokenizer(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir: Path) -> HFTokenizer:
    return HFTokenizer(hf_dir)


def write_records(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def data_config(files: str, **overrides: object) -> dict:
    cfg = {"sources": {"sft": {"kind": "jsonl", "splits": {"train": files}}}, "tokenizer_path": "unused",
           "seq_len": 256, "batch_size": 2, "num_epochs": 1, "packing_bins": 4, "prefetch_buffer_size": 4}
    return {**cfg, **overrides}


def build(files: Path | str, tokenizer, sft: dict | None = None, **overrides: object):
    return build_sft_iterator(data_config(str(files), **overrides), sft or {}, tokenizer, split="train",
                              process_index=0, process_count=1)


def segments(batches: list[dict]) -> list[dict[str, np.ndarray]]:
    """Every packed example: "ids" [n] (inputs then the last target), "loss_mask" and "positions" [n-1]."""
    found = []
    for batch in batches:
        for row in range(len(batch["inputs"])):
            seg = batch["segment_ids"][row]
            for segment_id in np.unique(seg[seg > 0]):
                where = seg == segment_id
                inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
                np.testing.assert_array_equal(inputs[1:], targets[:-1])  # one token stream per segment
                found.append({"ids": np.append(inputs, targets[-1]), "loss_mask": batch["loss_mask"][row][where],
                              "positions": batch["positions"][row][where], "row": (id(batch), row)})
    return found


def trained_runs(ids: np.ndarray, loss_mask: np.ndarray) -> list[list[int]]:
    """Maximal runs of consecutive trained target tokens."""
    runs, current = [], []
    for token, weight in zip(ids[1:].tolist(), loss_mask.tolist()):
        if weight:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def chatml_assistant_mask(ids: list[int], tokenizer: HFTokenizer) -> np.ndarray:
    """Independent reference: in ChatML, the tokens after "<|im_start|>assistant\\n" through the next
    "<|im_end|>" (inclusive) are the assistant's."""
    start_id, end_id = tokenizer.special_ids["<|im_start|>"], tokenizer.special_ids["<|im_end|>"]
    mask = np.zeros(len(ids), dtype=bool)
    index = 0
    while index < len(ids):
        if ids[index] != start_id:
            index += 1
            continue
        header_end = index + 1
        while not tokenizer.decode(ids[index + 1 : header_end]).endswith("\n"):
            header_end += 1
        close = ids.index(end_id, header_end)
        if tokenizer.decode(ids[index + 1 : header_end]) == "assistant\n":
            mask[header_end : close + 1] = True
        index = close + 1
    return mask


def test_chatml_mask_is_exactly_the_assistant_tokens(tmp_path: Path, hf_tokenizer: HFTokenizer) -> None:
    path = write_records(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    iterator = build(path, hf_tokenizer)
    found = segments(list(iterator))
    rendered = {tuple(hf_tokenizer.apply_chat_template(m, add_generation_prompt=False)): i
                for i, m in enumerate(CONVERSATIONS)}
    assert sorted(rendered[tuple(s["ids"].tolist())] for s in found) == list(range(len(CONVERSATIONS)))
    assert len({s["row"] for s in found}) < len(found)  # several conversations share a row
    for segment in found:
        messages = CONVERSATIONS[rendered[tuple(segment["ids"].tolist())]]
        expected = chatml_assistant_mask(segment["ids"].tolist(), hf_tokenizer)
        np.testing.assert_array_equal(segment["loss_mask"], expected[1:].astype(np.float32))
        np.testing.assert_array_equal(segment["positions"], np.arange(len(segment["ids"]) - 1))
        answers = [hf_tokenizer.decode(run) for run in trained_runs(segment["ids"], segment["loss_mask"])]
        assert answers == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    stats = iterator.stats
    assert (stats.chat_format, stats.examples_read, stats.examples_kept) == ("template", 6, 6)
    assert stats.tokens == sum(len(s["loss_mask"]) for s in found)
    assert stats.trained_tokens == sum(int(s["loss_mask"].sum()) for s in found)


def default_text(messages: list[dict[str, str]]) -> str:
    """Reference rendering of codelm's default format, as decode() shows it (BOS/EOS as <s> and </s>)."""
    text = "<s>"
    for message in messages:
        text += {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}[message["role"]]
        text += message["content"] + ("</s>" if message["role"] == "assistant" else "\n\n")
    return text


def test_default_format_masks_answers_and_their_eos(tmp_path: Path, tokenizer: SentencePieceTokenizer) -> None:
    path = write_records(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    iterator = build(path, tokenizer)
    found = segments(list(iterator))
    assert iterator.stats.chat_format == "default" and len(found) == len(CONVERSATIONS)
    assert len({s["row"] for s in found}) < len(found)
    texts = {default_text(m): m for m in CONVERSATIONS}
    assert sorted(tokenizer.decode(s["ids"]) for s in found) == sorted(texts)
    for segment in found:
        messages = texts[tokenizer.decode(segment["ids"])]
        assert segment["ids"][0] == tokenizer.bos_id
        np.testing.assert_array_equal(segment["positions"], np.arange(len(segment["ids"]) - 1))
        runs = trained_runs(segment["ids"], segment["loss_mask"])
        assert runs == [tokenizer.encode(m["content"]) + [tokenizer.eos_id]
                        for m in messages if m["role"] == "assistant"]
        untrained = [t for t, w in zip(segment["ids"][1:], segment["loss_mask"]) if not w]
        assert tokenizer.eos_id not in untrained  # every EOS closes an assistant turn and is trained
    prompt = default_chat_ids(tokenizer, CONVERSATIONS[0][:1])
    assert tokenizer.decode(prompt) == "<s>### User:\nWrite a function.\n\n### Assistant:\n"


def test_prompt_completion(tmp_path: Path, tokenizer: SentencePieceTokenizer, hf_tokenizer: HFTokenizer) -> None:
    path = write_records(tmp_path / "pairs.jsonl", PAIRS)
    for tok, bos in ((tokenizer, [tokenizer.bos_id]), (hf_tokenizer, [])):  # the Qwen-style model has no BOS
        found = segments(list(build(path, tok, shuffle=False)))
        assert len(found) == 2
        for pair, segment in zip(PAIRS, found):
            prompt, completion = bos + tok.encode(pair["prompt"]), tok.encode(pair["completion"]) + [tok.eos_id]
            assert segment["ids"].tolist() == prompt + completion
            expected = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
            assert segment["loss_mask"].tolist() == expected


def test_truncation_policies_and_counts(tmp_path: Path, tokenizer: SentencePieceTokenizer) -> None:
    long_answer = "\n".join(f"value_{i} = {i} * {i}" for i in range(40))
    records = [
        {"prompt": "a = ", "completion": "1"},
        {"prompt": "# long answer\n", "completion": long_answer},  # cut: keeps a trained prefix
        {"prompt": long_answer, "completion": "done"},  # cut: no trained token left
        {"messages": CONVERSATIONS[3]},
    ]
    path = write_records(tmp_path / "mixed.jsonl", records)
    seq_len = 48
    dropping = build(path, tokenizer, seq_len=seq_len)
    kept = segments(list(dropping))
    stats = dropping.stats
    assert (stats.examples_read, stats.examples_kept, stats.dropped, stats.truncated, stats.untrained) == (4, 2, 2, 0, 0)
    assert all(len(s["loss_mask"]) < seq_len for s in kept)

    truncating = build(path, tokenizer, {"truncation": "truncate"}, seq_len=seq_len)
    found = segments(list(truncating))
    stats = truncating.stats
    assert (stats.examples_kept, stats.dropped, stats.truncated, stats.untrained) == (3, 0, 1, 1)
    cut = [s for s in found if len(s["loss_mask"]) == seq_len]
    assert len(cut) == 1
    full = [tokenizer.bos_id] + tokenizer.encode("# long answer\n") + tokenizer.encode(long_answer)
    assert cut[0]["ids"].tolist() == full[: seq_len + 1] and cut[0]["loss_mask"][-1] == 1
    assert stats.tokens == sum(len(s["loss_mask"]) for s in found)


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "messages[1].role: expected one of system, user, assistant, got 'bot'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: expected a string, got int"),
    ({"messages": [{"content": "a"}]}, "messages[0].role: expected one of system, user, assistant, got nothing"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages: no assistant turn"),
    ({"messages": []}, "messages: expected a non-empty list, got an empty list"),
    ({"messages": ["hi"]}, "messages[0]: expected an object, got str"),
    ({"prompt": "a"}, "completion: missing"),
    ({"prompt": "a", "completion": 3}, "completion: expected a string, got int"),
    ({"text": "a"}, "expected either 'messages' or 'prompt' and 'completion', got fields ['text']"),
    ([1, 2], "expected a JSON object, got list"),
    ("{not json", "invalid JSON"),
])
def test_malformed_records_name_file_line_and_field(tmp_path: Path, tokenizer, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    bad = line if isinstance(line, str) else json.dumps(line)
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n" + bad + "\n")
    with pytest.raises(JSONLError) as error:
        build(path, tokenizer)
    assert str(error.value).startswith(f"{path}:3: {message}")


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_restores_the_exact_stream(tmp_path: Path, tokenizer: SentencePieceTokenizer) -> None:
    path = write_records(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS] + PAIRS)
    make = lambda **sft: build(path, tokenizer, sft, seq_len=96, num_epochs=None, read_threads=2)  # noqa: E731
    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(9)]
    interrupted = make()
    for _ in range(3):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))  # survives a JSON checkpoint
    resumed = make()
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(6)], expected[3:])
    assert resumed.get_state()["epoch"] == 9 * 2 // resumed.rows_per_epoch >= 1  # crossed into later epochs
    with pytest.raises(ValueError, match=r"sft.truncation='drop' but this pipeline has sft.truncation='truncate'"):
        make(truncation="truncate").set_state(state)
    for iterator in (uninterrupted, interrupted, resumed):
        iterator.close()


def test_epochs_processes_and_shuffling(tmp_path: Path, tokenizer: SentencePieceTokenizer) -> None:
    path = write_records(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS] + PAIRS)
    single = build(path, tokenizer, seq_len=64, batch_size=4, num_epochs=3)
    batches = list(single)
    rows_per_epoch = single.rows_per_epoch
    assert len(batches) == single.total_batches == -(-3 * rows_per_epoch // 4) and rows_per_epoch > 2
    rows = [row for batch in batches for row in batch["inputs"] if (row != tokenizer.pad_id).any()]
    assert len(rows) == 3 * rows_per_epoch
    epochs = [rows[i * rows_per_epoch : (i + 1) * rows_per_epoch] for i in range(3)]
    orders = [[bytes(r) for r in epoch] for epoch in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(orders[2])  # every row once per epoch ...
    assert orders[0] != orders[1] or orders[1] != orders[2]  # ... in a new order
    assert len(segments(batches)) == 3 * single.stats.examples_kept

    halves = [build_sft_iterator(data_config(str(path), seq_len=64, batch_size=4, num_epochs=3), {}, tokenizer,
                                 split="train", process_index=p, process_count=2) for p in range(2)]
    for batch, first, second in zip(batches, *halves, strict=True):
        for field in batch:
            np.testing.assert_array_equal(batch[field], np.concatenate([first[field], second[field]]))

    other_seed = list(build_sft_iterator(data_config(str(path), seq_len=64, batch_size=4, num_epochs=3), {},
                                         tokenizer, split="train", process_index=0, process_count=1, seed=5))
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(batches, other_seed))


def test_config_errors_name_the_field(tmp_path: Path, tokenizer: SentencePieceTokenizer) -> None:
    assert as_sft_data_config({}) == SFTDataConfig()
    with pytest.raises(ConfigError, match=r"^sft.data.truncation: input should be 'drop' or 'truncate'"):
        as_sft_data_config({"truncation": "cut"})
    with pytest.raises(ConfigError, match=r"^sft.data.max_examples: input should be greater than or equal to 0"):
        as_sft_data_config({"max_examples": -1})
    with pytest.raises(ConfigError, match=r"no field 'sft.data.chat_templat'; did you mean 'sft.data.chat_template'"):
        as_sft_data_config({"chat_templat": "auto"})
    path = write_records(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    with pytest.raises(ConfigError, match=r"sft.data.chat_template: 'model' needs a chat template"):
        build(path, tokenizer, {"chat_template": "model"})
    weighted = data_config(str(path))
    weighted["sources"]["sft"]["weight"] = 2.0
    with pytest.raises(ConfigError, match=r"data.sources.sft.weight: SFT concatenates its sources"):
        build_sft_iterator(weighted, {}, tokenizer, split="train", process_index=0, process_count=1)
    with pytest.raises(ConfigError, match=r"data.sources.sft.splits: no 'test' entry"):
        build_sft_iterator(data_config(str(path)), {}, tokenizer, split="test", process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match=r"data.sources.sft.splits.train: no file matches"):
        build(tmp_path / "missing-*.jsonl", tokenizer)
    limited = build(path, tokenizer, {"max_examples": 2})
    assert (limited.stats.examples_read, limited.stats.examples_kept) == (2, 2)


def test_template_choice_and_prefix_consistency(tmp_path: Path, hf_dir: Path, hf_tokenizer: HFTokenizer) -> None:
    path = write_records(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    forced = build(path, hf_tokenizer, {"chat_template": "default"})
    assert forced.stats.chat_format == "default"
    runs = [run for s in segments(list(forced)) for run in trained_runs(s["ids"], s["loss_mask"])]
    assert all(run[-1] == hf_tokenizer.eos_id for run in runs)  # <|im_end|>, this tokenizer's EOS

    rewriting = tmp_path / "rewriting"
    shutil.copytree(hf_dir, rewriting)
    config = json.loads((rewriting / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[last] {% endif %}"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    (rewriting / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{path}:1: messages\[1\]: the chat template is not prefix-consistent"):
        build(path, HFTokenizer(rewriting))


def test_encode_with_offsets(hf_tokenizer: HFTokenizer) -> None:
    text = "<|im_start|>user\ndef f(x):\n    return x  # ünï<|im_end|>"
    for parse_special in (True, False):
        ids, offsets = hf_tokenizer.encode_with_offsets(text, parse_special=parse_special)
        assert ids == hf_tokenizer.encode(text, parse_special=parse_special) and len(offsets) == len(ids)
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        assert all(a <= b for a, b in offsets) and all(p[1] <= q[0] or p == q for p, q in zip(offsets, offsets[1:]))
    ids, offsets = hf_tokenizer.encode_with_offsets(text, parse_special=True)
    assert [text[a:b] for a, b in offsets[:1]] == ["<|im_start|>"] and text[slice(*offsets[-1])] == "<|im_end|>"
    ascii_tokens = [(i, (a, b)) for i, (a, b) in zip(ids, offsets) if text[a:b].isascii()]
    assert all(hf_tokenizer.decode([i]) == text[a:b] for i, (a, b) in ascii_tokens)

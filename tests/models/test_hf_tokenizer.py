"""HFTokenizer against transformers' AutoTokenizer on tokenizer files trained here (nothing downloaded):
a byte-level BPE with ChatML specials (Qwen-style) and a Metaspace BPE with BOS (Llama-style)."""

import inspect
import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from data.hf_tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                 "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
TEXTS = ["def foo(x):\n    return x + 1\n", "  leading spaces\tand tabs", "import json, inspect  # ünïcode ✓",
         "class A:\n\n    pass"]
MESSAGES = [{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": "def f(): pass"},
            {"role": "user", "content": "Add a docstring."}]


def corpus():
    return [Path(json.__file__).read_text(), Path(inspect.__file__).read_text()[:60000]]


def byte_level_tokenizer(directory: Path, vocab_size: int = 600) -> Path:
    """A Qwen2-style tokenizer (the pipeline of Qwen2's tokenizer.json): NFC, Qwen's split regex,
    byte-level BPE, ChatML specials, no BOS, two EOS ids."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return directory


def metaspace_tokenizer(directory: Path, vocab_size: int = 700) -> Path:
    """A Llama-style tokenizer (the pipeline of Llama's tokenizer): Metaspace BPE with byte fallback
    (<0x00>..<0xFF> at ids 3..258), <s> prepended, Llama-2 chat template."""
    directory.mkdir(parents=True, exist_ok=True)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())  # byte pieces are vocabulary entries, not added special tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "chat_template": LLAMA_CHAT}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def pair(request, tmp_path_factory):
    """(HFTokenizer, transformers tokenizer) over the same files."""
    build = {"byte_level": byte_level_tokenizer, "metaspace": metaspace_tokenizer}[request.param]
    directory = build(tmp_path_factory.mktemp(request.param))
    return HFTokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


def test_encode_decode_match_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        # What the model sees for a prompt: BOS exactly when transformers adds it.
        assert [ours.bos_id] * ours.add_bos + ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.vocab_size == len(theirs)


def test_chat_template_matches_transformers(pair):
    ours, theirs = pair
    for add_generation_prompt in (True, False):
        text = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.render_chat(MESSAGES, add_generation_prompt=add_generation_prompt) == text
        ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt,
                                         return_dict=False)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == list(ids)


def test_special_tokens_in_plain_text_stay_text(pair):
    ours, theirs = pair
    text = "x = '<|im_end|>' + '</s>'"
    ids = ours.encode(text)
    assert not set(ids) & set(ours.special_ids.values())
    assert ours.decode(ids) == text
    assert ours.encode(text, parse_special=True) == theirs.encode(text, add_special_tokens=False)


def test_qwen_style_special_ids(tmp_path):
    tok = HFTokenizer(byte_level_tokenizer(tmp_path))
    vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()
    assert tok.bos_id is None and not tok.add_bos
    assert tok.eos_id == vocab["<|im_end|>"] and tok.pad_id == vocab["<|endoftext|>"]
    assert tok.eos_ids == (vocab["<|im_end|>"], vocab["<|endoftext|>"])
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id) == tuple(
        vocab[t] for t in ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"))
    assert tok.repo_name_id == vocab["<|repo_name|>"] and tok.file_sep_id == vocab["<|file_sep|>"]
    assert set(QWEN_SPECIALS) <= set(tok.special_ids)


def test_missing_tokens_and_files_are_clear_errors(tmp_path):
    tok = HFTokenizer(metaspace_tokenizer(tmp_path / "llama"))
    assert tok.pad_id == tok.eos_id  # no pad token: EOS pads
    with pytest.raises(ValueError, match=r"no fim_prefix token \(looked for <\|fim_prefix\|>, <fim_prefix>"):
        _ = tok.fim_prefix_id
    config = tmp_path / "llama" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": None, "eos_token": "<eot>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<eot>' is not in"):
        HFTokenizer(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)


def test_named_and_file_chat_templates(tmp_path):
    directory = byte_level_tokenizer(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "short", "template": "{{ messages | length }}"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(directory)
    assert tok.render_chat(MESSAGES, template_name="short") == "3"
    assert tok.render_chat(MESSAGES).endswith("<|im_start|>assistant\n")
    (directory / "chat_template.jinja").write_text("{% generation %}{{ messages[0]['content'] | tojson }}{% endgeneration %}")
    assert HFTokenizer(directory).render_chat(MESSAGES) == '"Write a function."'


def test_load_tokenizer_dispatches_to_hf_for_tokenizer_json(tmp_path):
    from data.tokenizers import load_tokenizer

    directory = byte_level_tokenizer(tmp_path)
    for path in (directory, directory / "tokenizer.json"):
        tokenizer = load_tokenizer(path)
        assert isinstance(tokenizer, HFTokenizer)
        assert tokenizer.decode(tokenizer.encode("def f(x):\n\treturn x")) == "def f(x):\n\treturn x"
    with pytest.raises(ValueError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path / "vocab.txt")

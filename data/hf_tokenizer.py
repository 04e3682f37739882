"""Hugging Face tokenizers (`tokenizer.json`) behind codelm's `Tokenizer` interface, with chat templates.

A checkpoint directory's `tokenizer.json` is loaded with the `tokenizers` library; its
`tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`), `chat_template.jinja`
and `generation_config.json` (extra EOS ids of chat models) are read when present.

Differences from `transformers`' tokenizers, on purpose:
- `encode(text)` never yields a special token: "<|im_start|>" inside source code is plain text.
  `encode(text, parse_special=True)` matches transformers (specials in the text are recognised), and
  `apply_chat_template` uses it, as rendered templates contain special tokens.
- `encode` never adds BOS/EOS; `add_bos` says whether the model's own tokenizer prepends BOS (the
  sampler does the same for string prompts).
- The FIM / repository ids are found under the names each family uses (`FIM_ALIASES`).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from data.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# codelm's role -> the token each family uses for it: Qwen2.5-Coder, StarCoder(2), DeepSeek-Coder
# (<｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle), CodeLlama (▁<PRE> ▁<SUF> ▁<MID>).
FIM_ALIASES: dict[str, tuple[str, ...]] = {
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>", "<｜fim▁begin｜>", "▁<PRE>", "<PRE>"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>", "<｜fim▁end｜>", "▁<MID>", "<MID>"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>", "<｜fim▁hole｜>", "▁<SUF>", "<SUF>"),
    "fim_pad": ("<|fim_pad|>", "<fim_pad>"),
    "repo_name": ("<|repo_name|>", "<reponame>"),
    "file_sep": ("<|file_sep|>", "<file_sep>"),
}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) and renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    return _chat_environment().from_string(source)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """Jinja settings of transformers' chat templates (sandboxed: templates from the Hub are untrusted)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` (plus its config files) behind codelm's Tokenizer interface.

    path: a directory holding tokenizer.json, or the tokenizer.json file itself.
    """

    def __init__(self, path: str | os.PathLike[str]):
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = directory / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}")
        self._source = str(file)
        self._parsing = RustTokenizer.from_file(str(file))  # recognises special tokens in text
        self._plain = RustTokenizer.from_file(str(file))
        self._plain.encode_special_tokens = True  # ... this one treats them as text
        self._config = _read_json(directory / CONFIG_FILE)
        self._chat_template = self._find_chat_template(directory)
        self._special_tokens = {
            name: _token_content(self._config.get(f"{name}_token")) for name in ("bos", "eos", "pad", "unk")
        }
        for name, content in self._special_tokens.items():
            if content is not None and self._parsing.token_to_id(content) is None:
                raise ValueError(f"{directory / CONFIG_FILE}: {name}_token {content!r} is not in {file}")
        generation_eos = _read_json(directory / GENERATION_CONFIG_FILE).get("eos_token_id")
        eos = [] if self.eos_id is None else [self.eos_id]
        eos += generation_eos if isinstance(generation_eos, list) else [] if generation_eos is None else [generation_eos]
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos))
        self._add_bos = self._adds_bos()

    def _find_chat_template(self, directory: Path) -> str | dict[str, str] | None:
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            return (directory / CHAT_TEMPLATE_FILE).read_text()
        template = self._config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            return {t["name"]: t["template"] for t in template}
        return template

    def _adds_bos(self) -> bool:
        """Whether transformers' tokenizer prepends BOS: `add_bos_token` if configured, else what the
        post-processor does."""
        if self.bos_id is None:
            return False
        if "add_bos_token" in self._config:
            return bool(self._config["add_bos_token"])
        with_specials = self._plain.encode("a", add_special_tokens=True).ids
        return bool(with_specials) and with_specials[0] == self.bos_id

    def __repr__(self) -> str:
        return f"HFTokenizer({self._source!r}, vocab_size={self.vocab_size})"

    # ---- the Tokenizer interface

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        tokenizer = self._parsing if parse_special else self._plain
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, *, parse_special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text, parse_special=...)` with each token's character span in `text`.

        Returns (ids [n], offsets [n]): token i covers text[offsets[i][0]:offsets[i][1]] (Python string
        indices, as the `tokenizers` library reports them). Byte-level tokens that split one character
        share that character's span; a recognised special token spans its own text.
        """
        tokenizer = self._parsing if parse_special else self._plain
        encoding = tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [(int(start), int(end)) for start, end in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._parsing.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._parsing.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special added token, plus the BOS/EOS/pad/unk tokens of tokenizer_config.json."""
        specials = {t.content: i for i, t in self._parsing.get_added_tokens_decoder().items() if t.special}
        for content in self._special_tokens.values():
            if content is not None:
                specials[content] = self._parsing.token_to_id(content)
        return specials

    def _special_id(self, name: str) -> int | None:
        content = self._special_tokens[name]
        return None if content is None else self._parsing.token_to_id(content)

    @property
    def bos_id(self) -> int | None:  # type: ignore[override]
        """None when the model has no BOS token (Qwen)."""
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:  # type: ignore[override]
        return self._special_id("eos")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS plus generation_config.json's (chat models end turns with
        e.g. <|im_end|> as well as <|endoftext|>)."""
        return self._eos_ids

    @property
    def pad_id(self) -> int:  # type: ignore[override]
        """The pad token, or EOS when the tokenizer defines none (common for causal LMs)."""
        pad = self._special_id("pad")
        if pad is None and self.eos_id is None:
            raise ValueError(f"{self._source}: tokenizer has neither a pad nor an EOS token")
        return self.eos_id if pad is None else pad  # type: ignore[return-value]

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def _alias_id(self, role: str) -> int:
        for token in FIM_ALIASES[role]:
            token_id = self._parsing.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(f"{self._source}: no {role} token (looked for {', '.join(FIM_ALIASES[role])})")

    @property
    def fim_prefix_id(self) -> int:
        return self._alias_id("fim_prefix")

    @property
    def fim_middle_id(self) -> int:
        return self._alias_id("fim_middle")

    @property
    def fim_suffix_id(self) -> int:
        return self._alias_id("fim_suffix")

    @property
    def fim_pad_id(self) -> int:
        return self._alias_id("fim_pad")

    @property
    def repo_name_id(self) -> int:
        return self._alias_id("repo_name")

    @property
    def file_sep_id(self) -> int:
        return self._alias_id("file_sep")

    # ---- chat

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str = "default",
        **template_kwargs: Any,
    ) -> str:
        """The chat template rendered for `messages` (dicts with "role" and "content"), as transformers'
        `apply_chat_template(..., tokenize=False)` renders it."""
        template = self._chat_template
        if isinstance(template, dict):
            if template_name not in template:
                raise ValueError(f"{self._source}: no chat template named {template_name!r}; have {sorted(template)}")
            template = template[template_name]
        if template is None:
            raise ValueError(f"{self._source}: tokenizer has no chat template")
        plain = json.loads(json.dumps({"messages": list(messages), "tools": tools, "kwargs": template_kwargs}))
        specials = {f"{name}_token": c for name, c in self._special_tokens.items() if c is not None}
        return _compile_template(template).render(
            messages=plain["messages"], tools=plain["tools"], add_generation_prompt=add_generation_prompt,
            **specials, **plain["kwargs"],
        )

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of `render_chat(messages, **kwargs)`, special tokens recognised (no BOS added:
        templates that want one write it)."""
        return self.encode(self.render_chat(messages, **kwargs), parse_special=True)

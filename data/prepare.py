r"""Curate code into training shards: language, quality, decontamination, dedup, PII, repo docs.

    python -m data.prepare --input=path/to/repos --input=more.jsonl --output_dir=out \
        [--tokenizer=tokenizer.model] [--config.near_dedup.threshold=0.8 ...]

Inputs: directory trees (each top-level subdirectory is a repository; `--config.read.single_repo`
makes the whole tree one) and JSONL(.gz) files of {"text", "path"?, "repo"?, "lang"?} records.
Outputs in --output_dir: `data-NNNNN-of-NNNNN.array_record` shards of UTF-8 JSON records and
`report.json` (documents and bytes in/out per stage, duplicates, redactions, contamination),
which is also printed. Settings: `data.code.config.default_prepare_config()`.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from data.code import config as config_lib
from data.code import preparation

_INPUT = flags.DEFINE_multi_string("input", None, "JSONL(.gz) file or directory tree of repositories; repeatable.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for the ArrayRecord shards and report.json.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Optional tokenizer model: repository documents then also carry spliced 'tokens'."
)
_CONFIG = config_flags.DEFINE_config_dict("config", config_lib.default_prepare_config(), "Curation settings.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tokenizer = None
    if _TOKENIZER.value:
        from data.tokenizers import load_tokenizer  # noqa: PLC0415  (only needed with --tokenizer)

        tokenizer = load_tokenizer(_TOKENIZER.value)
    logging.info("prepare: %s -> %s", _INPUT.value, _OUTPUT_DIR.value)
    report = preparation.prepare(_INPUT.value, _OUTPUT_DIR.value, _CONFIG.value, tokenizer)
    summary = {key: value for key, value in report.items() if key != "config"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output_dir"])
    app.run(main)

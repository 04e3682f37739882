r"""Curate code into training shards: language, quality, decontamination, dedup, PII, repo docs.

    python -m data.prepare --input=path/to/repos --input=more.jsonl --output_dir=out \
        [--tokenizer=tokenizer.model] [--config.near_dedup.threshold=0.8 ...]
    python -m data.prepare --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing \
        --input='gs://bucket/stack/*.parquet' --output_dir=gs://bucket/curated [--config....]

Without --runner the local driver runs (`data.code.preparation`: one machine, a worker pool of
`--config.workers` processes). With --runner=DirectRunner|PrismRunner|DataflowRunner|FlinkRunner|
SparkRunner the same curation runs as an Apache Beam pipeline (`data.curation`, needs the
environment of launch/dataflow_requirements.txt); every argument this command does not know is
passed to Beam as a pipeline option (--project, --region, --temp_location, --flink_master, ...).
Both give the same documents and report (see launch/dataflow.sh, launch/flink_spark.sh).

Inputs: directory trees (each top-level subdirectory is a repository; `--config.read.single_repo`
makes the whole tree one), JSONL(.gz) and Parquet files (or glob patterns, on any Beam filesystem
with --runner) of {"text", "path"?, "repo"?, "lang"?} records (`--config.read.fields` maps other
column names). Bad records are counted per reason in the report, never fatal.
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
_RUNNER = flags.DEFINE_string(
    "runner", None, "Beam runner (DirectRunner, PrismRunner, DataflowRunner, FlinkRunner, SparkRunner); unset: the local driver."
)
_CONFIG = config_flags.DEFINE_config_dict("config", config_lib.default_prepare_config(), "Curation settings.")


def main(argv: list[str]) -> None:
    if len(argv) > 1 and not _RUNNER.value:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tokenizer = None
    if _TOKENIZER.value:
        from data.tokenizers import load_tokenizer  # noqa: PLC0415  (only needed with --tokenizer)

        tokenizer = load_tokenizer(_TOKENIZER.value)
    logging.info("prepare: %s -> %s", _INPUT.value, _OUTPUT_DIR.value)
    if _RUNNER.value:
        try:
            from data.curation import pipeline  # noqa: PLC0415  (apache-beam lives in its own environment)
        except ModuleNotFoundError as error:
            raise app.UsageError(
                f"--runner needs the Beam environment ({error}): pip install -r launch/dataflow_requirements.txt in a separate venv"
            ) from None

        report = pipeline.run(_INPUT.value, _OUTPUT_DIR.value, _CONFIG.value, tokenizer, [f"--runner={_RUNNER.value}", *argv[1:]])
    else:
        report = preparation.prepare(_INPUT.value, _OUTPUT_DIR.value, _CONFIG.value, tokenizer)
    summary = {key: value for key, value in report.items() if key != "config"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output_dir"])
    app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))

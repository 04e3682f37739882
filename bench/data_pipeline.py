"""Input-pipeline throughput on the embedded corpus, against a plain Python loop.

Both sides do the same work on one epoch of the train split: read every
ArrayRecord record, parse its JSON, tokenize it with the corpus tokenizer and
count its next-token pairs (tokens + 1: BOS/EOS added). The pipeline also
shuffles, splits, packs and batches; the loop runs on one core.

    python -m bench.data_pipeline [--corpus_dir=artifacts/corpus] [--seq_len=1024] [--batch_size=8]

Prints one JSON object; "per_core_ratio" is pipeline tokens/s per CPU core
divided by the loop's tokens/s (which uses one core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

from data.config import DataConfig, SourceConfig
from data.corpus import DEFAULT_OUT_DIR, arrayrecord_pattern, ensure_corpus
from data.pipeline import build_iterator
from data.sources import ArrayRecordSource
from data.tokenizer import SentencePieceTokenizer


def _timed(run: Callable[[], int]) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tokens": tokens, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tokens_per_s": round(tokens / wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    paths = ensure_corpus(args.corpus_dir)
    tokenizer = SentencePieceTokenizer(paths.tokenizer)
    cores = len(os.sched_getaffinity(0))

    # One plain pass (no FIM, no chunk shuffling: DataConfig's defaults), so both sides count the same pairs.
    train_shards = arrayrecord_pattern(paths.root, "train")
    cfg = DataConfig(
        sources={"stdlib": SourceConfig(kind="arrayrecord", splits={"train": train_shards})},
        tokenizer_path=str(paths.tokenizer),
        num_epochs=1,
        read_threads=cores,
    )

    def pipeline_epoch() -> int:
        iterator = build_iterator(
            cfg, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size, process_index=0, process_count=1
        )
        return sum(int((batch["segment_ids"] > 0).sum()) for batch in iterator)

    def python_loop_epoch() -> int:
        source = ArrayRecordSource(paths.shards["train"])
        return sum(len(tokenizer.encode(source[i]["text"])) + 1 for i in range(len(source)))

    pipeline_epoch()  # warm-up: page cache, imports, thread pools
    pipeline = _timed(pipeline_epoch)
    loop = _timed(python_loop_epoch)
    if pipeline["tokens"] != loop["tokens"]:
        raise RuntimeError(f"pipeline emitted {pipeline['tokens']} pairs, loop counted {loop['tokens']}")
    pipeline["tokens_per_s_per_core"] = round(pipeline["tokens_per_s"] / cores)
    pipeline["tokens_per_cpu_s"] = round(pipeline["tokens"] / pipeline["cpu_s"])
    loop["tokens_per_cpu_s"] = round(loop["tokens"] / loop["cpu_s"])
    print(
        json.dumps(
            {
                "benchmark": "data_pipeline",
                "corpus": str(paths.root),
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "cpu_cores": cores,
                "read_threads": cfg.read_threads,
                "machine": platform.processor() or platform.machine(),
                "pipeline": pipeline,
                "python_loop": loop,
                "per_core_ratio": round(pipeline["tokens_per_s_per_core"] / loop["tokens_per_s"], 3),
                "cpu_time_ratio": round(pipeline["tokens_per_cpu_s"] / loop["tokens_per_cpu_s"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

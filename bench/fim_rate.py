"""How many FIM infill targets see their <|fim_prefix|>, per FIM level and row length, on the embedded corpus.

One epoch of the train split goes through `build_iterator` at each level ("chunk", "context",
"document") and row length, with `data.fim` at its defaults (fim_rate 0.5, spm_rate 0.5) and the
chunk-shuffle window of configs/base.py; `data.code.fim.fim_prefix_rate` counts, on those batches,
the infill targets (tokens after their example's <|fim_middle|>) whose segment holds the example's
<|fim_prefix|> (definitions in its docstring).

    python -m bench.fim_rate [--corpus_dir=artifacts/corpus] [--seq_lens=256,2048] [--batch_size=16]

Prints one JSON object: {"results": [{"seq_len", "level", "rate", "piece_rate", "infill_targets", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import time

from configs import base
from data.code.fim import fim_prefix_rate
from data.config import FIM_LEVELS
from data.corpus import DEFAULT_OUT_DIR, arrayrecord_pattern, ensure_corpus
from data.pipeline import build_iterator
from data.tokenizer import SentencePieceTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--seq_lens", default="256,2048")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--chunk_shuffle_window", type=int, default=1024)
    args = parser.parse_args()

    paths = ensure_corpus(args.corpus_dir)
    tokenizer = SentencePieceTokenizer(paths.tokenizer)
    results = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for level in FIM_LEVELS:
            cfg = base.get_config().data  # data.fim at its defaults
            cfg.sources.stdlib.splits.train = arrayrecord_pattern(paths.root, "train")
            cfg.num_epochs = 1
            cfg.chunk_shuffle_window = args.chunk_shuffle_window
            cfg.fim.level = level
            started = time.perf_counter()
            batches = build_iterator(
                cfg, tokenizer, seq_len=seq_len, batch_size=args.batch_size, process_index=0, process_count=1,
                mark_fim_infill=True,
            )
            rate = fim_prefix_rate(batches, tokenizer.fim_prefix_id)
            results.append({"seq_len": seq_len, "level": level, **rate, "wall_s": round(time.perf_counter() - started, 2)})
    print(
        json.dumps(
            {
                "benchmark": "fim_rate",
                "corpus": str(paths.root),
                "split": "train (one epoch)",
                "fim": base.get_config().data.fim.to_dict(),
                "chunk_shuffle_window": args.chunk_shuffle_window,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

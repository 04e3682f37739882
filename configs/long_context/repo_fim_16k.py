"""Repository-level pretraining at 16K tokens per row: repository documents with per-file FIM.

    python -m lifecycle.run --config=configs/lifecycle/default.py     # or only its corpus + curation stages
    python -m train.pretrain --config=configs/long_context/repo_fim_16k.py
    python -m train.pretrain --config=configs/long_context/repo_fim_16k.py:runs/lifecycle --config.train.steps=3

The data are the lifecycle's curated train split (data.prepare: one repository document per stdlib
package, files in dependency order, `<|repo_name|>`/`<|file_sep|>` spliced as control tokens), packed
into 16K-token rows (DeepSeek-Coder's repository stage length). FIM is at document level, which
permutes each file of a repository document on its own behind its separator (data/code/fim.py), so
an infill target sees the repository's earlier files and its own prefix and suffix.

What makes the row length affordable: RoPE base 1M (Qwen2.5-Coder's repository stage; Llama-3's
500K), attention by the "xla" kernel, which is the blockwise (flash) kernel above 1K keys (memory
linear in T), and the cross-entropy over 1K-token pieces (`model.cross_entropy_chunk`), never the
whole [16K, vocabulary] float32 logits. On several devices, `--config.mesh.ici.sequence=4` splits every
row over 4 devices (context parallelism, models/attention/parallel.py).
"""

from ml_collections import ConfigDict

from configs import base
from configs.lifecycle.layout import Layout

SEQ_LEN = 16384


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = base.get_config()
    cfg.model.preset = "tiny"
    cfg.model.max_seq_len = SEQ_LEN
    cfg.model.rope_theta = 1e6
    cfg.model.attention_impl = "xla"
    cfg.model.cross_entropy_chunk = 1024
    cfg.data.sources = ConfigDict({
        "repos": base.source("arrayrecord", {"train": layout.curated_glob, "validation": layout.validation_glob}),
    })
    cfg.data.tokenizer_path = layout.tokenizer
    cfg.data.seq_len = SEQ_LEN
    cfg.data.batch_size = 1
    cfg.data.chunk_shuffle_window = 16  # a repository spans few 16K rows
    cfg.data.fim.level = "document"  # per file inside repository documents
    cfg.data.fim.fim_rate = 0.5
    cfg.mesh.ici.fsdp = -1
    cfg.optim.lr = 1e-3
    cfg.optim.warmup_steps = 10
    cfg.train.steps = 200
    cfg.train.log_every = 1
    cfg.train.eval_every = 100
    cfg.train.eval_batches = 2
    cfg.train.output_dir = "runs/long_context/repo_fim_16k"
    cfg.checkpoint.every = 100
    return cfg

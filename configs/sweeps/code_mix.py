"""The run config the code sweeps start from: tiny models on the embedded multi-language corpus.

    python -m train.pretrain --config=configs/sweeps/code_mix.py     # one run (after the corpus exists)

Data: Python, C, JavaScript and Java sources this machine holds (data/corpus.py
`ensure_multilang_corpus`, built by `python -m train.sweep` on first use), one source per language,
equal weights, held-out split by file; its own 4k tokenizer. Sizes, budgets and schedules come from
the sweep files beside this one.
"""

from ml_collections import ConfigDict

from configs import base, quickstart

CORPUS = "artifacts/corpus_multi"  # data/corpus.py MULTI_OUT_DIR
LANGUAGES = ("python", "c", "javascript", "java")


def get_config(arg: str = "") -> ConfigDict:
    cfg = quickstart.get_config(arg)
    cfg.data.sources = ConfigDict({
        lang: base.source("arrayrecord", {split: f"{CORPUS}/arrayrecord/{lang}/{split}-*.array_record"
                                          for split in ("train", "validation")})
        for lang in LANGUAGES
    })
    cfg.data.tokenizer_path = f"{CORPUS}/tokenizer.model"
    cfg.data.seq_len = 128
    cfg.data.batch_size = 16
    cfg.data.chunk_shuffle_window = 256
    cfg.model.vocab_size = 4096  # the corpus tokenizer's: sweeps size runs by N and C before it is loaded
    cfg.model.d_model = 64
    cfg.model.n_layers = 3
    cfg.model.n_heads = 4
    cfg.model.n_kv_heads = 2
    cfg.model.head_dim = 16
    cfg.model.d_ff = 192
    cfg.optim.lr = 4e-3
    cfg.optim.schedule = "wsd"
    cfg.optim.wsd_decay_fraction = 0.2
    cfg.optim.warmup_steps = 20  # fixed in steps: runs that share a stable phase share their warmup
    cfg.optim.min_lr_ratio = 0.1
    cfg.train.steps = 200
    cfg.train.log_every = 25
    cfg.train.eval_every = 0  # the sweep runner evaluates at the end (and for smoothing)
    cfg.train.eval_batches = 8
    cfg.train.output_dir = "runs/code_mix"
    cfg.checkpoint.every = 100
    cfg.checkpoint.keep_last = 2
    cfg.sampler.prompt = ""
    return cfg

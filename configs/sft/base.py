"""Every field of a supervised fine-tuning run (`python -m train.sft`); SFT configs start from this one.

    python -m train.sft --config=configs/sft/base.py --config.sft.init_from=path/to/checkpoint \
        --config.data.sources.chat.splits.train=train.jsonl --config.data.sources.chat.splits.validation=val.jsonl

The sections are pretraining's (configs/base.py) plus `sft`. The model section only overrides the
checkpoint's config (e.g. `--config.model.lora.rank=16`, `--config.model.remat=full`); data.sources
are JSONL files of {"messages": [...]} conversations or {"prompt", "completion"} pairs.
"""

from ml_collections import ConfigDict

from configs import base


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = base.get_config()
    del cfg.model["preset"]  # the model is sft.init_from's
    cfg.data.sources = ConfigDict({"chat": base.source("jsonl", {"train": "", "validation": ""})})
    cfg.data.tokenizer_path = ""  # "": the checkpoint's tokenizer (its chat template included)
    cfg.data.seq_len = 2048
    cfg.data.batch_size = 128  # global, in packed rows
    cfg.data.chunk_shuffle_window = 0
    cfg.data.fim.fim_rate = 0.0

    cfg.optim.lr = 5e-6
    cfg.optim.schedule = "cosine"
    cfg.optim.min_lr_ratio = 0.0
    cfg.optim.weight_decay = 0.0

    cfg.train.steps = 1  # replaced by sft.epochs unless that is 0
    cfg.train.log_every = 10
    cfg.train.eval_every = 200
    cfg.train.eval_batches = 50
    cfg.train.output_dir = "runs/sft"
    cfg.checkpoint.every = 200
    cfg.sampler.prompt = ""

    cfg.sft = ConfigDict()
    cfg.sft.init_from = ""  # a codelm run directory or a Hugging Face checkpoint directory
    cfg.sft.epochs = 3.0  # 0: train.steps as given
    cfg.sft.warmup_ratio = 0.03
    cfg.sft.data = ConfigDict()
    cfg.sft.data.chat_template = "auto"  # auto | model (the tokenizer's Jinja template) | default (codelm's format)
    cfg.sft.data.truncation = "drop"  # drop | truncate: examples longer than data.seq_len + 1 tokens
    cfg.sft.data.max_examples = 0  # 0: all
    cfg.sft.eval = ConfigDict()
    cfg.sft.eval.problems = ""  # "" | synthetic | a HumanEval/MBPP-style JSONL file
    cfg.sft.eval.limit = 0
    cfg.sft.eval.sandbox = ""  # "" | local | comma-separated execution-service URLs
    cfg.sft.eval.num_samples = 1
    cfg.sft.eval.temperature = 0.0
    cfg.sft.eval.max_new_tokens = 128
    return cfg

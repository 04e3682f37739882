"""Lifecycle stage: pretrain the tiny dense preset on the curated embedded corpus.

    python -m train.pretrain --config=configs/lifecycle/pretrain.py:runs/lifecycle

The main job's recipe (configs/quickstart.py) on the curated train split (data.prepare's shards:
deduplicated, filtered, decontaminated, one document per stdlib package in dependency order) with
fill-in-the-middle on a quarter of the rows; held-out loss on the uncurated held-out files.
"""

from ml_collections import ConfigDict

from configs import base, quickstart
from configs.lifecycle.layout import Layout


def get_config(root: str = "") -> ConfigDict:
    layout = Layout(root) if root else Layout()
    cfg = quickstart.get_config()
    cfg.data.sources = ConfigDict({
        "stdlib": base.source("arrayrecord", {"train": layout.curated_glob, "validation": layout.validation_glob}),
    })
    cfg.data.tokenizer_path = layout.tokenizer
    cfg.data.fim.fim_rate = 0.25  # a quarter: the tiny model's short budget goes mostly to left-to-right code
    cfg.train.output_dir = layout.pretrain
    return cfg

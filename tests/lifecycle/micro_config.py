"""The lifecycle at toy sizes (every stage runs, for minutes not tens of minutes): for the end-to-end test."""

from ml_collections import ConfigDict

from configs.lifecycle import default


def get_config(root: str = "") -> ConfigDict:
    cfg = default.get_config()
    if root:
        cfg.root = root
    cfg.problems.train = 48
    cfg.problems.heldout = 4
    cfg.pretrain.overrides = ("--config.train.steps=6", "--config.train.eval_every=3", "--config.train.eval_batches=1",
                              "--config.checkpoint.every=3", "--config.data.batch_size=4")
    cfg.sft.overrides = ("--config.sft.epochs=0", "--config.train.steps=4", "--config.train.eval_every=2",
                         "--config.train.eval_batches=1", "--config.checkpoint.every=2", "--config.data.batch_size=4")
    cfg.rl.overrides = ("--config.train.steps=2", "--config.rl.prompts_per_batch=2", "--config.rl.group_size=4",
                        "--config.rl.num_problems=48", "--config.rl.max_response_len=16", "--config.checkpoint.every=1")
    cfg.eval.num_samples = 2
    cfg.eval.ks = "1,2"
    cfg.eval.max_new_tokens = 16
    cfg.peak_tflops = 0.1
    return cfg

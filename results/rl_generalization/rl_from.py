"""RL runs of this folder's README: the RL default (configs/rl/quickstart.py) from another starting model,
with held-out pass@1 and pass@10 from 10 samples per problem at temperature 0.8 (paired change in
summary.json).

    python -m rl.train --config=results/rl_generalization/rl_from.py:<init>,<out>,<lr>,<temperature>,<steps>,<num_problems>[,<problems jsonl>]
"""

from ml_collections import ConfigDict

from configs.rl import quickstart


def get_config(arg: str) -> ConfigDict:
    init, out, lr, temperature, steps, num_problems, *rest = arg.split(",")
    cfg = quickstart.get_config()
    cfg.rl.init_from = init
    cfg.train.output_dir = out
    cfg.optim.lr = float(lr)
    cfg.rl.temperature = float(temperature)
    cfg.train.steps = int(steps)
    cfg.rl.reward = "binary"
    cfg.rl.prompts_per_batch, cfg.rl.group_size = 16, 8
    cfg.rl.num_problems = int(num_problems)
    if rest:
        cfg.rl.problems = rest[0]
    cfg.rl.eval.num_samples = 10
    cfg.rl.eval.temperature = 0.8
    cfg.rl.eval.every = 20
    cfg.checkpoint.every = 1000
    return cfg

"""The whole lifecycle on the embedded default (`make lifecycle` = python -m lifecycle.run).

    python -m lifecycle.run --config=configs/lifecycle/default.py [--config.root=runs/lifecycle2 ...]

Stages, each a command of its own (recorded in the report), skipped when finished and resumed when
interrupted: corpus -> problems -> curate -> pretrain -> eval -> sft -> eval -> rl -> eval -> report.
The stage configs (configs/lifecycle/{pretrain,sft,rl}.py) hold the recipes; this file wires them.
"""

from ml_collections import ConfigDict

from configs.lifecycle.layout import DEFAULT_ROOT


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = ConfigDict()
    cfg.root = DEFAULT_ROOT  # every stage reads and writes under it (configs/lifecycle/layout.py)
    cfg.python = ""  # interpreter for the stage commands; "": the one running the lifecycle

    cfg.problems = ConfigDict()
    cfg.problems.train = 2000  # SFT examples of the "sft" split (3,303 distinct exist), as make sft's
    cfg.problems.heldout = 100  # held-out problems every checkpoint is evaluated on

    cfg.curation = ConfigDict()
    cfg.curation.workers = 2
    cfg.curation.overrides = ()  # more data.prepare flags, e.g. ("--config.near_dedup.threshold=0.8",)

    # Training stages: a config file (with the root as its argument) and extra flags.
    for stage in ("pretrain", "sft", "rl"):
        cfg[stage] = ConfigDict({"config": f"configs/lifecycle/{stage}.py", "overrides": ()})

    cfg.eval = ConfigDict()
    cfg.eval.num_samples = 20  # per problem: pass@1 and pass@10 by the unbiased estimator (n >= k)
    cfg.eval.ks = "1,10"
    cfg.eval.temperature = 0.8
    cfg.eval.max_new_tokens = 96
    cfg.eval.batch_size = 16  # prompts per sampler call

    cfg.sandbox = ConfigDict()
    cfg.sandbox.url = ""  # "": the lifecycle starts a private execution service and stops it at the end
    cfg.sandbox.workers = 2

    cfg.peak_tflops = 0.0  # per device, for MFU; 0: measured at start (fp32 2048^3 matmul)
    return cfg

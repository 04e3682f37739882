"""The embedded SFT default: the main job's model (runs/quickstart) fine-tuned on the generated problems.

    make sft        # = python -m train.sft --config=configs/sft/quickstart.py (after make quickstart)

Data (built on first use, no download): 2,000 problems of `evals/synthetic.py`'s "sft" split as
prompt/completion pairs (a signature and docstring with an example call -> the body), loss on the
completion, as an imperfect teacher writes them: 22% of the bodies carry one plausible bug (`>` for `>=`,
`max` for `min`, ...; `evals.synthetic.imperfect_completions`). The model learns some of those bugs and
samples them, which is what RL with execution rewards (`make rl`) then trains away; a correct teacher
left RL nothing to improve on these problems (results/rl_generalization/README.md). The "sft" split leaves
out the constants kept for RL (the "rl" split). Held-out loss (on correct bodies) and greedy pass@1 on the
100 held-out problems (constants never seen in training) through a private execution service, before
training and every train.eval_every steps. Six epochs: pass@1 rises late, as the cosine schedule decays
(greedy 0.05 after two epochs, 0.45 after four, 0.60 after six; 0.61 from the correct teacher).
configs/sft/stdlib.py adds the standard library's documented functions.
"""

from ml_collections import ConfigDict

from configs import base
from configs.sft import stdlib


def get_config(arg: str = "") -> ConfigDict:
    cfg = stdlib.get_config(arg)
    cfg.data.sources = ConfigDict({
        "synthetic": base.source("jsonl", {"train": "artifacts/sft/synthetic_sft_imperfect.jsonl",
                                           "validation": "artifacts/sft/synthetic_validation.jsonl"}),
    })
    cfg.optim.lr = 1e-3  # a 5M-parameter model pretrained at 3e-3 (configs/quickstart.py)
    cfg.sft.epochs = 6.0
    cfg.train.eval_every = 100
    cfg.checkpoint.every = 100
    cfg.train.output_dir = "runs/sft-quickstart"
    return cfg

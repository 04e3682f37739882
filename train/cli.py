"""Command line of training jobs: `configs.cli`'s convention plus the distributed runtime and the
run-config checks (`train.config.load_run_config`).

    _CONFIG = cli.define_config("configs/quickstart.py")

    if __name__ == "__main__":
        cli.run(main, _CONFIG)            # main(run: RunConfig)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from configs.cli import ConfigFlag, define_config
from configs.cli import run as run_entry_point
from train import distributed
from train.config import RunConfig, load_run_config

__all__ = ["ConfigFlag", "define_config", "run"]


def run(main: Callable[[Any], None], config: ConfigFlag, schema: type[RunConfig] = RunConfig) -> None:
    """Joins the distributed runtime (multi-host), validates the config into `schema`, runs `main(run)`.
    Validation needs the runtime first: the checks use the global device and process counts."""
    run_entry_point(main, config, functools.partial(load_run_config, schema=schema), setup=distributed.maybe_initialize)

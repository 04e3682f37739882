"""The one command-line convention of codelm's jobs: absl flags, an ml_collections config file, and
`--config.<path>=value` overrides, validated once into a typed run config.

    _CONFIG = cli.define_config("configs/quickstart.py")

    def main(run: RunConfig) -> None: ...

    if __name__ == "__main__":
        cli.run(main, _CONFIG)

Every config error, in the file or in an override, exits with status 2 and one line naming the
field path ("no field 'train.stpes'; did you mean 'train.steps'?"), not a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

from configs.schema import ConfigError, unknown_field
from train import distributed
from train.config import RunConfig, load_run_config



@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    holder: flags.FlagHolder
    default: str

    @property
    def name(self) -> str:
        return self.holder.name

    @property
    def value(self) -> ConfigDict:
        return self.holder.value


def define_config(default: str, name: str = "config") -> ConfigFlag:
    """The `--config` flag (default: `default`). Not locked: a field a config file misspells reaches
    the schema, which names it; overrides of missing fields are caught by `run`, same message."""
    # No default at definition: ml_collections would load it, and apply overrides, at import time.
    holder = config_flags.DEFINE_config_file(name, None, "Run config file (ml_collections).", lock_config=False)
    return ConfigFlag(holder, default)


def _load_config_file(spec: str) -> ConfigDict:
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_codelm_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--config: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _with_default(argv: Sequence[str], config: ConfigFlag) -> list[str]:
    if any(arg.startswith(f"--{config.name}=") for arg in argv):
        return list(argv)
    return [argv[0], f"--{config.name}={config.default}", *argv[1:]]


def _check_override_paths(argv: Sequence[str], flag_name: str) -> None:
    """Raises ConfigError for the first `--config.a.b=v` whose path the config file lacks."""
    prefix = f"--{flag_name}."
    overrides = [arg[len(prefix):].partition("=")[0] for arg in argv if arg.startswith(prefix)]
    spec = next(arg.partition("=")[2] for arg in argv if arg.startswith(f"--{flag_name}="))
    cfg = _load_config_file(spec)
    for override in overrides:
        node: Any = cfg
        parts = override.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ConfigDict):
                break
            if part not in node:
                raise unknown_field(".".join(parts[:depth]), part, node.keys())
            node = node[part]


def _exit_with(error: ConfigError) -> None:
    print(f"config error: {error}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(config: ConfigFlag) -> Callable[[list[str]], list[str]]:
    def parse(argv: list[str]) -> list[str]:
        argv = _with_default(argv, config)
        try:
            return flags.FLAGS(argv)
        except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
            try:
                _check_override_paths(argv, config.name)
            except ConfigError as config_error:
                _exit_with(config_error)
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)

    return parse


def load(config: ConfigFlag, schema: type[RunConfig] = RunConfig) -> RunConfig:
    """The flag's config, validated into `schema`; exits with the error line when invalid."""
    try:
        return load_run_config(config.value, schema)
    except ConfigError as e:
        _exit_with(e)
        raise  # unreachable


def run(main: Callable[[Any], None], config: ConfigFlag, schema: type[RunConfig] = RunConfig) -> None:
    """Parses flags, joins the distributed runtime (multi-host), validates the config, runs `main(run)`."""

    def entry(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every save at INFO
        distributed.maybe_initialize()
        run_config = load(config, schema)
        try:
            main(run_config)
        except ConfigError as e:  # found later, e.g. on resume against the run directory
            _exit_with(e)

    app.run(entry, flags_parser=_parse_flags(config))

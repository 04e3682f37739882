"""The one command-line convention of codelm's entry points: absl flags, an ml_collections config
file, and `--config.<path>=value` overrides, validated once into a typed config.

    _CONFIG = cli.define_config("configs/generate.py")

    def main(config: GenerateConfig) -> None: ...

    if __name__ == "__main__":
        cli.run(main, _CONFIG, load=lambda cfg: schema.parse(GenerateConfig, cfg.to_dict()))

(Training jobs use `train.cli.run`, which adds the distributed runtime and the run-config checks.)

Every config error, in the file or in an override, exits with status 2 and one line naming the
field path ("no field 'train.stpes'; did you mean 'train.steps'?"), not a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

from configs.schema import ConfigError, unknown_field

T = TypeVar("T")



@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """The `--config` flag of one entry point, defined with absl when that entry point runs (so
    modules with entry points can be imported together)."""

    name: str
    default: str

    def define(self) -> None:
        if self.name not in flags.FLAGS:
            # No default at definition: ml_collections would load it, and apply overrides, right away.
            # Not locked: a field a config file misspells reaches the schema, which names it.
            config_flags.DEFINE_config_file(self.name, None, "Config file (ml_collections).", lock_config=False)

    @property
    def value(self) -> ConfigDict:
        return flags.FLAGS[self.name].value


def define_config(default: str, name: str = "config") -> ConfigFlag:
    """The `--config` flag (default: `default`); overrides of missing fields are caught by `run`."""
    return ConfigFlag(name, default)


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


def load(config: ConfigFlag, load_config: Callable[[ConfigDict], T]) -> T:
    """The flag's config through `load_config` (validation); exits with the error line when invalid."""
    try:
        return load_config(config.value)
    except ConfigError as e:
        _exit_with(e)
        raise  # unreachable


def run(main: Callable[[T], Any], config: ConfigFlag, load_config: Callable[[ConfigDict], T],
        setup: Callable[[], None] | None = None) -> None:
    """Parses flags, runs `setup()` (e.g. joining the distributed runtime), validates the config with
    `load_config`, runs `main(config)`; a ConfigError raised later (e.g. on resume) exits the same way."""

    def entry(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every save at INFO
        if setup is not None:
            setup()
        loaded = load(config, load_config)
        try:
            main(loaded)
        except ConfigError as e:
            _exit_with(e)

    config.define()
    app.run(entry, flags_parser=_parse_flags(config))

"""Checkpoints with orbax: train state plus each process's data-iterator position.

Saves are asynchronous (training continues while arrays are written), kept as the last K plus every
M-th step, and restore onto whatever mesh the run has now: the restore target carries the current
shardings, so a checkpoint written on fsdp=8 loads on fsdp=2 x tensor=4 or on one CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from configs.schema import ConfigError
from train.config import CheckpointConfig
from train.state import TrainState


class _IteratorState:
    """Adapts a data iterator (`get_state() -> dict`) to grain's orbax handler, which writes one JSON
    file per process, so every host resumes its own shard of the data.

    The position is captured when the adapter is made (at `save`), not when an asynchronous save
    gets to writing it, by which time training has consumed more batches."""

    def __init__(self, iterator: Any, snapshot: bool = False):
        self.iterator = iterator
        self.snapshot = json.dumps(iterator.get_state()).encode() if snapshot else None

    def get_state(self) -> bytes:
        assert self.snapshot is not None, "only a snapshotting adapter is saved"
        return self.snapshot

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under `directory`/<step>/."""

    def __init__(self, directory: str | os.PathLike[str], cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.every = cfg.every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.every,
            max_to_keep=cfg.keep_last,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: Any | None, *, force: bool = False) -> bool:
        """Starts saving at `step` if the interval says so (or `force`); returns whether it did."""
        # Our own interval check: orbax would also save the first step of a run.
        if not force and step % self.every:
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorState(data_iterator, snapshot=True))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target: Any, data_iterator: Any | None) -> TrainState:
        """Restores the state into `target` (abstract arrays with shardings) and the iterator in place.

        Shapes are checked first: a mismatch names the parameter instead of failing deep in orbax."""
        self.check_shapes(step, target)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def check_shapes(self, step: int, target: Any) -> None:
        """Raises ConfigError naming the first array whose saved shape differs from `target`'s."""
        saved = self.manager.item_metadata(step)["state"]
        if saved is None:
            return
        saved_shapes = {_path_name(path): getattr(meta, "shape", None)
                        for path, meta in jax.tree_util.tree_flatten_with_path(saved)[0]}
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            shape = saved_shapes.get(_path_name(path))
            if shape is not None and tuple(shape) != tuple(leaf.shape):
                raise ConfigError(
                    f"checkpoint {self.directory}/{step}: {_path_name(path)} has shape {tuple(shape)} there but "
                    f"{tuple(leaf.shape)} in this model; the model config changed since the checkpoint was written"
                )

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a preemption notice (multi-host sync point) has arrived."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _path_name(path: tuple[Any, ...]) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(n for n in names if n != "value")

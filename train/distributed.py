"""Multi-host start-up through JAX's own distributed runtime (no codelm cluster machinery)."""

from __future__ import annotations

import logging
import os

import jax


def _slurm_multiprocess() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _tpu_multihost() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def maybe_initialize() -> None:
    """Calls `jax.distributed.initialize()` when this process is one of several.

    On TPU pods and SLURM clusters JAX discovers the coordinator, process count and index itself;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    if not (explicit or _slurm_multiprocess() or _tpu_multihost() or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ):
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes need a cross-process collectives backend (used for local rehearsals).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())

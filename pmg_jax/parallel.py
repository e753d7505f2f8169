"""Device mesh, shardings and multi-host start-up for data parallelism."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over every device of every process, batch axis 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole array on every device (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
    """One line naming the mesh, for the log."""
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return (
        f"mesh {dict(mesh.shape)} over {mesh.devices.size} device(s) ({', '.join(kinds)}), "
        f"{jax.process_count()} process(es)"
    )


def maybe_initialize_distributed() -> bool:
    """Start JAX's multi-host runtime when the environment asks for it.

    Explicit coordinator variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID), a Slurm job step with several tasks, or a multi-host TPU slice
    (jax detects these itself). Returns True when initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "localhost").count(",") > 0:
        jax.distributed.initialize()
        return True
    return False

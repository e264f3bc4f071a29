"""The one device mesh, its shardings, and multi-host start-up.

Everything data-parallel in the project is `jax.jit` over a 1-D ("data",) mesh: learned
parameters, optimizer state and the frozen CLIP weights are replicated, batches are split along
their per-task batch axis. (pmap is in maintenance mode; jit + NamedSharding is what it lowers to.)
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(force: Optional[bool] = None) -> None:
  """Call `jax.distributed.initialize()` on multi-process launches (TPU pods, multi-GPU hosts).

  On Cloud TPU VMs JAX discovers the coordinator itself; on GPU clusters set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM/Open MPI).
  `force=None` decides from the environment so a laptop run never waits for a coordinator.
  """
  if force is None:
    env = os.environ
    force = ("JAX_COORDINATOR_ADDRESS" in env
             or "," in env.get("TPU_WORKER_HOSTNAMES", "")
             or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if not force:
    return
  try:
    jax.distributed.initialize()
  except RuntimeError as e:  # Already initialised (e.g. a notebook re-running a cell).
    if "already" not in str(e).lower():
      raise
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over all (global) devices named ("data",)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def task_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[T, B, ...] arrays: the per-task batch axis B is split over devices, tasks are not."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Place a host pytree on every device of the mesh (the frozen CLIP, prompts, opt state)."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_divisible(per_task_batch: int, mesh: Mesh, field: str = "input.batch_size") -> None:
  """The batch axis must split evenly over devices; say which config field to change if not."""
  n = mesh.devices.size
  if per_task_batch % n:
    raise ValueError(f"{field}={per_task_batch} must be a multiple of the number of devices "
                     f"({n}) so every device gets the same share of each task's batch")

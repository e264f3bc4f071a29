"""The one device mesh, its shardings, and multi-host start-up.

Everything data-parallel in the project is `jax.jit` over a 1-D ("data",) mesh: learned
parameters, optimizer state and the frozen CLIP weights are replicated, batches are split along
their per-task batch axis, and the text tower's class prompts along their class axis
(`TextSharding`). (pmap is in maintenance mode; jit + NamedSharding is what it lowers to.)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedConfigError(ValueError):
  """The multi-process start-up values (flags / environment) cannot describe one cluster."""


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
  """What `jax.distributed.initialize` gets; None fields are left to JAX's cluster detection."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  def kwargs(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Set to "auto" (launch/tpu_pod.sh does) to let JAX's cluster detection start a multi-process
# run where no variable below gives the cluster away: Cloud TPU VM pods find their peers through
# the GCE metadata server, which is not worth querying on every laptop run.
ENV_AUTO = "MMAP_JAX_DISTRIBUTED"


def detected_cluster(env: Mapping[str, str]) -> Optional[str]:
  """The multi-process cluster JAX can describe by itself (TPU pod, SLURM, Open MPI, k8s)."""
  if env.get(ENV_AUTO, "").lower() == "auto":
    return "auto"
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu_pod"
  if _int_env(env, "SLURM_NTASKS", 1) > 1:
    return "slurm"
  if _int_env(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return "openmpi"
  if env.get("JOB_COMPLETION_INDEX") is not None and env.get("KUBERNETES_SERVICE_HOST"):
    return "kubernetes"   # an indexed k8s Job (JAX's K8sCluster reads the pod's job)
  return None


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
  try:
    return int(env.get(name, default))
  except ValueError:
    return default


def distributed_args(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None,
                     env: Optional[Mapping[str, str]] = None) -> Optional[DistributedArgs]:
  """Merge the flags with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

  None: a single-process run (nothing set, no cluster detected; a laptop never waits for a
  coordinator). Otherwise the values for `jax.distributed.initialize`; all None means "let JAX
  detect the cluster". Raises DistributedConfigError, naming the flag and the variable, when a
  flag and its variable disagree, a value is malformed or out of range, or an address comes
  without a process count and id outside a detected cluster.
  """
  env = os.environ if env is None else env
  address = _merge("coordinator_address", ENV_ADDRESS, coordinator_address, env, str)
  count = _merge("num_processes", ENV_NUM_PROCESSES, num_processes, env, int)
  pid = _merge("process_id", ENV_PROCESS_ID, process_id, env, int)
  cluster = detected_cluster(env)
  if address is None and count is None and pid is None:
    return DistributedArgs() if cluster else None
  if count is not None and count < 1:
    raise DistributedConfigError(f"--num_processes / ${ENV_NUM_PROCESSES}={count} must be >= 1")
  if pid is not None and count is not None and not 0 <= pid < count:
    raise DistributedConfigError(
        f"--process_id / ${ENV_PROCESS_ID}={pid} is out of range for --num_processes / "
        f"${ENV_NUM_PROCESSES}={count}: ids are 0..{count - 1}")
  if pid is not None and pid < 0:
    raise DistributedConfigError(f"--process_id / ${ENV_PROCESS_ID}={pid} must be >= 0")
  if cluster is None:
    missing = [f"--{flag} (or ${var})" for flag, var, v in (
        ("coordinator_address", ENV_ADDRESS, address), ("num_processes", ENV_NUM_PROCESSES, count),
        ("process_id", ENV_PROCESS_ID, pid)) if v is None]
    if missing:
      raise DistributedConfigError(
          "a multi-process run needs all of --coordinator_address, --num_processes and "
          f"--process_id (or their JAX_* variables); missing: {', '.join(missing)}. Outside "
          "TPU pods / SLURM / Open MPI / Kubernetes JAX cannot infer them.")
  if address is not None and ":" not in address:
    raise DistributedConfigError(
        f"--coordinator_address / ${ENV_ADDRESS}={address!r} must be HOST:PORT")
  return DistributedArgs(address, count, pid)


def _merge(flag: str, var: str, value: Any, env: Mapping[str, str], kind: type) -> Any:
  raw = env.get(var)
  if raw is not None and raw.strip() != "":
    try:
      from_env = kind(raw.strip())
    except ValueError:
      raise DistributedConfigError(f"${var}={raw!r} is not a valid {kind.__name__}") from None
    if value is not None and value != from_env:
      raise DistributedConfigError(
          f"--{flag}={value!r} disagrees with ${var}={from_env!r}; set one of them")
    return from_env
  return value


def _select_cpu_collectives() -> None:
  """Cross-process collectives on CPU devices (a CPU cluster, the test suite) go through gloo.

  Must precede `jax.distributed.initialize`; an explicit choice (e.g. "mpi") is kept. GPU and
  TPU devices use their own collectives (NCCL, ICI), so this only matters for CPU arrays.
  """
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Start `jax.distributed` when the flags, the JAX_* variables or a cluster ask for it.

  Call before anything touches a device. Returns whether this is a multi-process run. Errors in
  the values are raised here, before JAX connects or compiles anything.
  """
  args = distributed_args(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  _select_cpu_collectives()
  try:
    jax.distributed.initialize(**args.kwargs())
  except RuntimeError as e:  # Already initialised (e.g. a notebook re-running a cell).
    if "already" not in str(e).lower():
      raise
  if args.num_processes is not None and jax.process_count() != args.num_processes:
    raise DistributedConfigError(
        f"--num_processes={args.num_processes} but JAX started {jax.process_count()} processes")
  counts = np.asarray(broadcast_from_process0(jax.local_device_count()))
  if int(counts) != jax.local_device_count():
    raise DistributedConfigError(
        f"process {jax.process_index()} has {jax.local_device_count()} devices, process 0 "
        f"{int(counts)}: every process must bring the same number")
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def broadcast_from_process0(value: Any) -> Any:
  """Process 0's value of a JSON-serialisable Python object, on every process.

  For decisions read from the shared filesystem (is there a checkpoint? a groups.json?) so
  every process takes the same branch, whatever each one's view of the directory.
  """
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int32)))
  buf = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return json.loads(out.tobytes().decode())


_SYNC_COUNT = [0]


def sync(name: str, timeout_s: int = 4 * 3600) -> None:
  """All processes wait here (e.g. until process 0 has built the data or written a file).

  A barrier of the coordination service (what orbax uses), not a device collective: process 0
  may take an hour to build a dataset, far past gloo's collective timeouts. Every process calls
  the same syncs in the same order; the counter keeps the barrier ids distinct.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize started
  _SYNC_COUNT[0] += 1
  client = distributed.global_state.client
  if client is None:  # a runtime that started processes without jax.distributed
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"mmap_jax:{name}:{_SYNC_COUNT[0]}", timeout_in_ms=timeout_s * 1000)


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
  """Place a host pytree on every device of the mesh (the frozen CLIP, prompts, opt state).

  Every process holds the same tree (read from the same checkpoint, or made from the same seed).
  With several processes, `jax.device_put` of host data onto a global sharding first checks that
  by all-gathering each whole leaf from every process (`multihost_utils.assert_equal`): for a
  ViT-B/16 on H hosts, H copies of its ~600 MB reach every host, and one cross-process
  collective runs per leaf. Each process places its own copy on its local devices instead.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def place(leaf):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      data = place(jax.random.key_data(leaf))       # typed PRNG keys travel as their raw data
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(place, tree)


def check_batch_divisible(per_task_batch: int, mesh: Mesh, field: str = "input.batch_size") -> None:
  """The batch axis must split evenly over devices; say which config field to change if not."""
  n = mesh.devices.size
  if per_task_batch % n:
    raise ValueError(f"{field}={per_task_batch} must be a multiple of the number of devices "
                     f"({n}) so every device gets the same share of each task's batch")


@dataclasses.dataclass(frozen=True)
class TextSharding:
  """How the text tower splits the class-prompt axis (`parallel.shard_text`, `.text_chunk`).

  Images are split over the mesh; without this every device would also encode every class
  prompt (T x C rows), forward and backward, which caps the speed-up at a few chips for large
  label sets. With a mesh, each task's class axis is padded to a multiple of the device count
  (copies of class 0, sliced off afterwards) and split, so each device encodes T x C/N rows; the
  [T, C, E] features are then all-gathered (the backward reduce-scatters their cotangent).
  `chunk` > 0 encodes each device's rows `chunk` classes at a time under remat, bounding the
  text activations for large label sets. mesh=None: the replicated computation.
  """
  mesh: Optional[Mesh] = None
  chunk: int = 0

  @property
  def shards(self) -> int:
    return 1 if self.mesh is None else int(self.mesh.devices.size)

  def padded_classes(self, num_classes: int) -> int:
    """Classes per task after padding: a multiple of shards (x chunk when chunked)."""
    per_device = -(-num_classes // self.shards)
    if self.chunk:
      per_device = -(-per_device // self.chunk) * self.chunk
    return per_device * self.shards

  def split_rows(self, x: Any) -> Any:
    """[T, rows, ...] placed with the rows split over the mesh (a no-op when replicated)."""
    if self.mesh is None:
      return x
    spec = P(None, DATA_AXIS, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def gather_rows(self, x: Any) -> Any:
    """The all-gathered (replicated) value of `split_rows` output."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P()))


REPLICATED_TEXT = TextSharding()


def text_sharding(mesh: Optional[Mesh], shard_text: bool = True, chunk: int = 0) -> TextSharding:
  """The run's TextSharding: split over `mesh` when `shard_text` and it has > 1 device."""
  split = shard_text and mesh is not None and mesh.devices.size > 1
  return TextSharding(mesh if split else None, int(chunk))

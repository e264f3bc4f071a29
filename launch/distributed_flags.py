"""The multi-process flags every launcher shares, and the start-up they drive.

  python -m launch.train ... --coordinator_address=host0:29876 --num_processes=2 --process_id=0

The same values may come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
(a flag and its variable must agree). With none of them set, a TPU pod, SLURM, Open MPI or an
indexed Kubernetes Job is detected by JAX itself; otherwise the run is single-process.
"""
from absl import app, flags

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator service "
    "(or $JAX_COORDINATOR_ADDRESS); multi-process runs only.")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run (or $JAX_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes) (or $JAX_PROCESS_ID).")


def initialize() -> bool:
  """`jax.distributed.initialize` from the flags / environment; True on a multi-process run.

  Bad values exit with a usage error naming the flag and variable, before JAX connects.
  """
  from mmap_jax import parallel  # Deferred: `launch.sweep --print_only` needs no JAX.
  try:
    return parallel.maybe_initialize_distributed(
        COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)
  except parallel.DistributedConfigError as e:
    raise app.UsageError(str(e)) from None

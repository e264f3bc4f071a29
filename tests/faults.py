r"""Test-only launcher wrapper: runs a launcher's absl main with a fault-injecting step-loop hook.

  python -m tests.faults STEP:SIGNAL[:PROCESS] launch.train --config=... --workdir=...

sends SIGNAL (SIGKILL, SIGTERM, ...) to this process right after the call that completes STEP
(after that step's log / eval / checkpoint dispatch, so an asynchronous checkpoint may be
half-written), as a dying or preempted host would see it; with PROCESS only on that
jax.process_index(). It works through `train.cadence.register_hook`, so the training loops carry
no test code. The launcher then runs exactly as `python -m launch.X` (its re-exec under tcmalloc
repeats this same command line).

Under jax.distributed a SIGTERM goes to jax's C++ notifier, which polls for it once a second; the
hook then waits until this process has published its call counter to the preemption sync
protocol (the protocol holds the manager's lock from that moment until the sync point is set),
so the agreed step is decided before this process reaches its next boundary: deterministic
timing for the tests, not a requirement of the protocol.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import time

# jax's preemption sync protocol: each task publishes its call counter under this directory
# (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc, kPreemptionCounterDirKey).
_COUNTER_DIR = "PREEMPTION_CURRENT_COUNTER/"


def _wait_for_sync_protocol(timeout_s: float = 120.0) -> None:
  import jax
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None or distributed.global_state.preemption_sync_manager is None:
    return
  # The key is the directory + this task's id ("PREEMPTION_CURRENT_COUNTER/0" in jax 0.10.2;
  # older XLA spelled it "/job:jax_worker/task:0").
  own = (f"/{jax.process_index()}", f"/task:{jax.process_index()}")
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if any(k.endswith(own) for k, _ in client.key_value_dir_get(_COUNTER_DIR)):
      return
    time.sleep(0.05)
  raise TimeoutError("jax's preemption sync protocol did not start within "
                     f"{timeout_s:.0f} s of SIGTERM")


def fault_hook(spec: str):
  """hook(first, last) for "STEP:SIGNAL[:PROCESS]"."""
  parts = spec.split(":")
  step, sig = int(parts[0]), getattr(signal, parts[1])
  process = int(parts[2]) if len(parts) > 2 else None

  def hook(first: int, last: int) -> None:
    if not first <= step <= last:
      return
    import jax
    if process is not None and jax.process_index() != process:
      return
    print(f"[tests.faults] sending {parts[1]} after step {last}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)
    if sig in (signal.SIGTERM, signal.SIGINT):   # Ctrl-C is forwarded as SIGTERM (cadence)
      _wait_for_sync_protocol()
  return hook


def main(argv: list[str]) -> None:
  if len(argv) < 3:
    raise SystemExit(__doc__)
  from mmap_jax.train import cadence
  cadence.register_hook(fault_hook(argv[1]))
  module = argv[2]
  sys.argv = [module] + argv[3:]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main(sys.argv)

r"""Cost and time the trainer's MmAP-MT step on the fixed benchmark workload; write JSON.

  python -m launch.benchmark --config=configs/benchmark.py --out=/tmp/bench.json
  python -m launch.benchmark --config=configs/benchmark.py --vs_torch     # + PyTorch, same run
  python -m launch.benchmark --config=configs/benchmark.py:tiny           # smoke run, seconds
  python -m launch.benchmark --config=configs/benchmark.py:compile_only,grouping  # costs only
  python -m launch.benchmark --config=configs/benchmark.py:accelerator    # GPU/TPU sweep + MFU

Prints one line per measurement and the JSON (top-level keys: benchmark.RESULT_KEYS, plus
TORCH_KEYS with --vs_torch; compile_only writes train_step.flops_per_device,
train_step.temp_bytes_per_device and devices). With
XLA_FLAGS=--xla_force_host_platform_device_count=N it costs the SPMD program of N CPU devices.
See configs/benchmark.py for the arguments.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from mmap_jax.apps import host_runtime
from launch import entry

_CONFIG = config_flags.DEFINE_config_file("config", entry.resolve_config_path("configs/benchmark.py"),
                                          "Benchmark config file[:args].", lock_config=False)
_OUT = flags.DEFINE_string("out", None, "Write the JSON result here (also printed).")
_VS_TORCH = flags.DEFINE_bool("vs_torch", None, "Also run the PyTorch reference step in the same "
                              "invocation and report the speedup (overrides config.vs_torch).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmap_jax.apps import benchmark, measure  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _VS_TORCH.value is not None:
    config.vs_torch = _VS_TORCH.value
  log = lambda s: print(s, file=sys.stderr, flush=True)
  if config.accelerator:
    from mmap_jax.apps import accelerator  # pylint: disable=g-import-not-at-top
    result = accelerator.run_sweep(config, log=log)
  else:
    result = benchmark.run(config, log=log)
  print(measure.write_json(result, _OUT.value), flush=True)


def run():
  """The `mmap-benchmark` console script."""
  entry.run(main, xla_flags=host_runtime.CPU_FAST_XLA_FLAGS)


if __name__ == "__main__":
  run()

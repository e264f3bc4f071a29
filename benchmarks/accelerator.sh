#!/usr/bin/env bash
# The GPU/TPU benchmark: the fixed workload (configs/benchmark.py) in bfloat16 and float32, with
# and without remat, per-task batch doubling from 8 until out of memory (caught; the setting
# ends there) or max_batch; step time, images/s, MFU against the device's peak (a table of known
# devices in mmap_jax/apps/accelerator.py; none on others) and device memory. Prints
# a markdown table (stderr) and writes everything to OUT_JSON.
#
#   bash benchmarks/accelerator.sh [OUT_JSON] [CONFIG_ARGS] [more launch.benchmark flags]
#   bash benchmarks/accelerator.sh benchmarks/results/h100_$(date +%F).json
#   bash benchmarks/accelerator.sh /tmp/a.json steps_per_call=4,max_batch=256
#   bash benchmarks/accelerator.sh /tmp/a.json tiny,max_batch=2     # CPU smoke run (tests)
#
# JAX preallocates 75% of GPU memory by default; the sweep raises that to 95% (override by
# exporting XLA_PYTHON_CLIENT_MEM_FRACTION) so "up to memory" means the device's memory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/accelerator_$(date +%F).json}
args=${2:-}
shift $(( $# < 2 ? $# : 2 ))
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
python3 -m launch.benchmark --config="configs/benchmark.py:accelerator${args:+,$args}" \
  --out="$out" "$@" >/dev/null
echo "wrote $out" >&2

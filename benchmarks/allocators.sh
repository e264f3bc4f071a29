#!/usr/bin/env bash
# The host-allocator comparison quoted in WORKSPACE.md (Performance): the benchmark's train step
# (parts=none, 5 timed steps) under each allocator, one JSON per variant in $OUT_DIR.
#
#   bash benchmarks/allocators.sh [OUT_DIR] [CONFIG_ARGS]
#     OUT_DIR default benchmarks/results/allocators; CONFIG_ARGS are added to parts=none, e.g.
#     steps_per_call=4,runs=8,single=false (K = 4 steps per call, 2 timed calls)
#
# glibc / glibc_tuned need nothing installed (glibc_tuned is the launchers' default where
# tcmalloc is missing); jemalloc / tcmalloc rows need the Debian packages libjemalloc2 / libtcmalloc-minimal4; rows
# whose library is missing are skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/allocators}
extra=${2:+,$2}
mkdir -p "$out"
lib=/usr/lib/x86_64-linux-gnu
run() {  # name, then env assignments
  local name=$1; shift
  echo "== $name: $*" >&2
  env "$@" python3 -m launch.benchmark --config=configs/benchmark.py:parts=none$extra \
    --out="$out/$name.json" >/dev/null
}
run glibc MMAP_JAX_ALLOCATOR=system
run glibc_tuned MMAP_JAX_ALLOCATOR=glibc   # GLIBC_TUNABLES (host_runtime.GLIBC_TUNED): no package
# + arena_max=1 (XLA's worker threads on the main heap too; measured, left opt-in): the
# launcher adds GLIBC_TUNED to what GLIBC_TUNABLES already holds
run glibc_tuned_arena_max_1 MMAP_JAX_ALLOCATOR=glibc GLIBC_TUNABLES=glibc.malloc.arena_max=1
if [ -f $lib/libtcmalloc_minimal.so.4 ]; then
  run tcmalloc MMAP_JAX_TCMALLOC=$lib/libtcmalloc_minimal.so.4
  run tcmalloc_release_rate_0 MMAP_JAX_TCMALLOC=$lib/libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0
else
  echo "skipping tcmalloc rows: $lib/libtcmalloc_minimal.so.4 not installed" >&2
fi
if [ -f $lib/libjemalloc.so.2 ]; then
  run jemalloc_no_decay MMAP_JAX_ALLOCATOR=system LD_PRELOAD=$lib/libjemalloc.so.2 \
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
else
  echo "skipping the jemalloc row: $lib/libjemalloc.so.2 not installed" >&2
fi
python3 - "$out" <<'PY'
import json, pathlib, statistics, sys
print("| allocator | step median (min-max) | GFLOP/s | of peak | host page faults / step | peak RSS |")
print("|---|---:|---:|---:|---:|---:|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  r = json.loads(f.read_text()); t = r["train_step"]
  print(f"| {f.stem} ({r['environment']['allocator']}) | {t['s_median']:.2f} s "
        f"({t['s_min']:.2f}-{t['s_max']:.2f}) | {r['achieved_flops_per_s'] / 1e9:.1f} | "
        f"{r['fraction_of_peak']:.0%} | {statistics.median(t['page_faults']):,.0f} | "
        f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |")
PY

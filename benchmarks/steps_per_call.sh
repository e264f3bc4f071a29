#!/usr/bin/env bash
# Does several optimizer steps per jitted call (train.steps_per_call = K, a lax.scan) remove the
# per-step page-fault storm of XLA:CPU's temporaries under glibc? The benchmark's train step
# (parts=none) under glibc (MMAP_JAX_ALLOCATOR=system: a fresh machine without tcmalloc) for each
# K; every invocation also times K = 1 in the same process. One JSON per K in $OUT_DIR, then a
# table (per-step figures = per call / K). About 20 min for the default K = 2 4 8 on 2 cores.
#
#   bash benchmarks/steps_per_call.sh [OUT_DIR] [K ...]   # default benchmarks/results/steps_per_call, 2 4 8
#   BENCH_ARGS=tiny,vocab=none bash benchmarks/steps_per_call.sh /tmp/spc 2   # smoke run, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/steps_per_call}
shift $(( $# > 0 ? 1 : 0 ))
ks=${*:-2 4 8}
mkdir -p "$out"
for k in $ks; do
  echo "== glibc, steps_per_call=$k" >&2
  MMAP_JAX_ALLOCATOR=system python3 -m launch.benchmark \
    --config="configs/benchmark.py:parts=none,steps_per_call=$k${BENCH_ARGS:+,$BENCH_ARGS}" \
    --out="$out/glibc_k$k.json" >/dev/null
done
python3 - "$out" <<'PY'
import json, pathlib, statistics, sys
print("| K | allocator | step median (min-max) | GFLOP/s | of best / median peak | host page faults / step | peak RSS | XLA temp |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
def row(k, r, t, peak_best, peak_median):
  g = t["flops"] / t["s_median"]
  print(f"| {k} | {r['environment']['allocator']} | {t['s_median']:.2f} s ({t['s_min']:.2f}-"
        f"{t['s_max']:.2f}) | {g / 1e9:.1f} | {g / peak_best:.0%} / {g / peak_median:.0%} | "
        f"{statistics.median(t['page_faults']):,.0f} | {t['memory']['bytes'] / 2**30:.2f} GiB | "
        f"{t['temp_bytes'] / 1e9:.2f} GB |")
for f in sorted(pathlib.Path(sys.argv[1]).glob("glibc_k*.json"), key=lambda p: int(p.stem[7:])):
  r = json.loads(f.read_text())
  pb, pm = r["peak_flops_per_s"], r["peak_flops_per_s_median"]
  row(1, r, r["train_step_single"], pb, pm)
  row(r["steps_per_call"], r, r["train_step"], pb, pm)
PY

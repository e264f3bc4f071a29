#!/usr/bin/env bash
# Issue 29's final evidence on demo world 2 (configs/demo.py at its default 16 shots), in pieces:
#
#   bash benchmarks/demo_evidence.sh PIECE [SECONDS]
#
#   tune      every family's MT form and MmAP-ST: lr x 1/2, 1, 2 (extended until the best is
#             interior, at most 6 times a side) on validation, tuning seeds 100, 101
#   table     every method and the MmAP ablations, tuned lrs, seeds 0-4, delta_ci vs MmAP-MT
#   tune_budget  VPT, MaPLe and IVLP's MT forms tuned at MmAP-MT's prompt budget
#             (prompt.budget=equal): lr x 1/2, 1, 2 of their published-budget tuned values, as tune
#   budget    VPT, MaPLe and IVLP at MmAP-MT's prompt budget (prompt.budget=equal) with the lrs
#             tune_budget chose, MmAP-MT with tune's, seeds 0-4
#   grouping  gradient grouping against a random partition per seed (5 draws), seeds 0-4
#   affinity  the TAG lookahead affinity against the gradient cosine, seeds 0-4
#   shots     accuracy against shots (4 / 16 / 64 / all) for 7 methods, seeds 0-2, delta_ci vs
#             MmAP-MT at the same shots
#   cost      what the committed pieces took: runs trained (not reused) and their summed wall
#             seconds per piece, into cost.json (sweep.trained_cost); trains nothing
#
# Every piece resumes: a run is finished once its directory holds results.json, so a piece
# stopped by its time limit (SECONDS: SIGTERM, the running run saves a checkpoint; exit 124) is
# continued by the same command, and a finished piece only re-tabulates. The pieces after `tune`
# read its tuned.json (budget also tune_budget's, whose values win). grouping, affinity and shots
# copy the table's runs that they repeat (the gradient-cosine MmAP-MT rows, the 16-shot points:
# the same resolved run, launch.sweep --reuse).
# Results go to benchmarks/results/demo_world2/evidence/<piece>/ (run directories without
# checkpoints or TensorBoard events, .gitignore), committed as they come.
# EVIDENCE_PRINT_ONLY=1 prints the runs of a sweep piece instead of running them; EVIDENCE_ROOT
# moves the results.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${EVIDENCE_ROOT:-benchmarks/results/demo_world2/evidence}
piece=${1:?"usage: bash benchmarks/demo_evidence.sh tune|table|tune_budget|budget|grouping|affinity|shots|cost [SECONDS]"}
limit=${2:-0}
limited() { if [ "$limit" -gt 0 ]; then timeout --signal=TERM "$limit" "$@"; else "$@"; fi; }
sweep() {
  local name=$1; shift
  local extra=()
  [ "${EVIDENCE_PRINT_ONLY:-0}" = 1 ] && extra+=(--print_only)
  limited python3 -m launch.sweep --config=configs/demo.py --tuned="${tuned:-$root/tune/tuned.json}" \
    --workdir="$root/$name" "$@" "${extra[@]}"
}
five=--seeds=0,1,2,3,4
case "$piece" in
  tune)
    limited python3 -m launch.tune --config=configs/demo.py --workdir="$root/tune" --factors=0.5,1,2 \
      --max_extensions=6 ;;
  table)
    sweep table "$five" --sweep='method=mmap_mt,zeroshot,coop_mt,vpt_mt,maple_mt,ivlp_mt,clipadapter_mt,bitfit_mt,lora_mt,fullft_mt,mmap_st,mmap_indep_mt,mmap_shared_mt,mmap_task_mt' ;;
  tune_budget)   # grids: each method's value in tune's tuned.json x 1/2, 1, 2
    plan=$(python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))["values"]
print(";".join(f"{m}={v[m] / 2!r},{v[m]!r},{v[m] * 2!r}" for m in ("vpt_mt", "maple_mt", "ivlp_mt")))' \
      "$root/tune/tuned.json")
    limited python3 -m launch.tune --config=configs/demo.py --config.prompt.budget=equal \
      --workdir="$root/tune_budget" --max_extensions=6 --plan="$plan" ;;
  budget)
    tuned="$root/tune/tuned.json,$root/tune_budget/tuned.json"
    sweep budget "$five" --sweep='method=mmap_mt,vpt_mt,maple_mt,ivlp_mt;prompt.budget=equal' ;;
  grouping)
    sweep grouping "$five" --reuse="$root/table" --sweep='groups.mode=gradient,random' --reference='groups.mode=gradient' ;;
  affinity)
    sweep affinity "$five" --reuse="$root/table" --sweep='groups.affinity=cosine,tag' --reference='groups.affinity=cosine' ;;
  shots)
    sweep shots --seeds=0,1,2 --reuse="$root/table" --reference='method=mmap_mt;data.shots=*' --sweep='method=mmap_mt,zeroshot,coop_mt,maple_mt,lora_mt,mmap_st,fullft_mt;data.shots=4,16,64,0' ;;
  cost)
    python3 -c 'import json, sys; from mmap_jax.apps import sweep
out = json.dumps(sweep.trained_cost(sys.argv[1]), indent=2)
open(sys.argv[1] + "/cost.json", "w").write(out + "\n"); print(out)' "$root" ;;
  *)
    echo "unknown piece $piece" >&2; exit 2 ;;
esac

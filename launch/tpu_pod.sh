#!/usr/bin/env bash
# Start the same command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh NAME ZONE -- python -m launch.train --config=configs/office_home.py:clip=/ckpt/vit_b16 --workdir=gs://b/run
#
# Each worker runs `jax.distributed.initialize()` (launch.* do it when they see a multi-host
# TPU environment), reads its own shard of every task's data, and joins the global batch.
# The repository must be at the same path on every worker (first run syncs it with scp).
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND..." >&2; exit 2
fi
name=$1; zone=$2; shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
remote=\~/mmap-jax
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo"/. "$name":"$remote" >/dev/null
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command \
  "cd $remote && python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && $(printf '%q ' "$@")"

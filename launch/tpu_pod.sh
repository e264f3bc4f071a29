#!/usr/bin/env bash
# Start the same command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh NAME ZONE -- python -m launch.train --config=configs/office_home.py:clip=/ckpt/vit_b16 --workdir=gs://b/run
#
# Each worker runs `jax.distributed.initialize()` with no arguments (launch.* do it when they see
# MMAP_JAX_DISTRIBUTED=auto, set below: JAX finds the pod's workers, process count and ids from
# the TPU metadata), reads its own slice of every task's batch, and joins the global batch; only
# worker 0 writes results, tables, plots and TensorBoard files. Use a shared --workdir=gs://...:
# every workdir file goes through etils.epath (gcsfs, installed below, with the VM's service
# account) and orbax writes checkpoint arrays with tensorstore's gcs driver. The frozen CLIP
# (clip=...) is a local path: copy the converted CLIP to the same path on every worker. Prepare
# the TFDS data once first (or give each worker the same local data_dir).
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
  "cd $remote && python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2' 'gcsfs==2026.10.1' && MMAP_JAX_DISTRIBUTED=auto $(printf '%q ' "$@")"

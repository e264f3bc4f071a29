r"""Train (and evaluate) one experiment.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/demo
  python -m launch.train --config=configs/office_home.py:method=mmap_mt,clip=/ckpt/vit_b16 \
      --config.train.steps=5000 --workdir=gs://bucket/oh_mmap

--workdir is a local directory (a relative one is made absolute) or a gs:// URI, kept as given:
every workdir file (checkpoints through orbax/tensorstore, results, grouping files, plots,
TensorBoard events) is read and written through etils.epath (mmap_jax/paths.py; tested against a
GCS emulator; epath's other schemes, s3:// and az://, take the same path but are untested). gs://
without TensorFlow needs gcsfs (`pip install "mmap-jax[gcs]"`) and Google application-default
credentials (e.g. a TPU VM's service account). The frozen CLIP (config clip.path) and the TFDS
data_dir are local paths.

Runs task grouping first when the method asks for it, resumes from the workdir's latest
checkpoint, evaluates periodically and at the end. A preempted run (SIGTERM) saves a checkpoint and
exits with loop.PREEMPTED_EXIT_CODE (143), so a restarting scheduler reruns it; Ctrl-C does the
same with exit status 130 (a second Ctrl-C exits at once, unsaved). On a TPU pod start the same command on every
worker (launch/tpu_pod.sh). On GPU / CPU clusters start one process per host with
--coordinator_address=host0:29876 --num_processes=N --process_id=i (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); see launch/distributed_flags.py.
"""
import sys

from launch import distributed_flags, entry, shared_flags
from mmap_jax.train import loop

_CONFIG = shared_flags.config()
_WORKDIR = shared_flags.workdir()


def main(argv):
  shared_flags.no_arguments(argv)
  distributed_flags.initialize()
  out = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if out.get("preempted"):   # SIGTERM (143) or Ctrl-C (130): checkpoint saved
    print(f"stopped: checkpoint of step {out['step']} saved in {out['checkpoints']}; run the "
          "same command again to resume", file=sys.stderr, flush=True)
    sys.exit(out["exit_code"])


def run():
  """The `mmap-train` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()

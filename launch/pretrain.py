r"""Pretrain the demo's small CLIP and write it in the project's CLIP format.

  python -m launch.pretrain --config=configs/demo_pretrain.py --workdir=/tmp/demo_pretrain \
      --out=mmap_jax/assets/demo_clip

Resumes from the workdir's latest checkpoint; the output directory (default <workdir>/clip) gets
clip.json, model.safetensors, the tokenizer and pretrain_report.json, replacing what was there
atomically. A preempted run (SIGTERM) saves a checkpoint and exits with status 143
(cadence.PREEMPTED_EXIT_CODE), 130 after Ctrl-C; the same command resumes. The library call is
`mmap_jax.demo.pretrain.launch`.
"""
import sys

from absl import flags

from launch import distributed_flags, shared_flags
from mmap_jax import resources
from mmap_jax.demo import pretrain
from mmap_jax.train import cadence
from launch import entry

_CONFIG = shared_flags.config("Pretraining config file[:args].", lock=False)
_WORKDIR = shared_flags.workdir("Where the resumable checkpoints go (a local directory).")
_OUT = flags.DEFINE_string("out", None, "Output CLIP directory (default <workdir>/clip).")
_VOCAB = flags.DEFINE_string("vocab", None, "CLIP's bpe_simple_vocab_16e6.txt.gz (default: the "
                             "copy shipped in mmap_jax/assets/clip_bpe).")


def main(argv):
  shared_flags.no_arguments(argv)
  distributed_flags.initialize()
  try:
    out = pretrain.launch(_CONFIG.value, workdir=_WORKDIR.value, vocab=_VOCAB.value or resources.clip_bpe_path(), out=_OUT.value)
  except cadence.Preempted as e:   # checkpoint saved; the same command resumes
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)   # 143, or 130 after Ctrl-C
  print(f"pretrained CLIP written to {out}")


def run():
  """The `mmap-pretrain` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()

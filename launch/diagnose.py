r"""Zero-shot and linear-probe accuracy of a config's frozen CLIP on its dataset, per domain.

  python -m launch.diagnose --config=configs/demo.py --out=/tmp/diag.json
  python -m launch.diagnose --config=configs/office_home.py:clip=/ckpt/vit_b16,root=/data/OH \
      --out=oh.json

Writes {"zero_shot": {domain: acc}, "linear_probe": {domain: acc}, "num_classes": n,
"test_images": {domain: n}, "train_images": {domain: n}, ...} to --out (a local path or a gs://
URI) and prints a small table. See mmap_jax/diagnostics.py for the probe's protocol.
"""
from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags
from launch import entry
from mmap_jax import diagnostics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON (local path or gs:// URI).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  result = diagnostics.diagnose(_CONFIG.value)
  diagnostics.write(result, _OUT.value)
  print(diagnostics.format_table(result), flush=True)


def run():
  """The `mmap-diagnose` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()

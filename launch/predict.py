r"""Class probabilities for image files: zero-shot CLIP, or a trained workdir's prompts.

  python -m launch.predict --clip=<converted dir> --classes=cat,dog,bird IMAGE... [--json]
  python -m launch.predict --workdir=<training workdir> --task=photo IMAGE...   # trained prompts

With --workdir the task's learned prompts (and, for full fine-tuning, its CLIP) are used, and the
class names default to the task's own; --clip defaults to the CLIP the run trained on.

Each image gets softmax(exp(logit_scale) * cos(image, class text)). `--json` prints a list of
{"image", "probabilities": {class: p}, "top"}. The work is in mmap_jax/predict.py.
"""
import json
from typing import Sequence

from absl import app, flags

from mmap_jax.predict import DEFAULT_TEMPLATE, format_table, predict_files
from launch import entry, shared_flags

_CLIP = flags.DEFINE_string("clip", None, "A converted CLIP checkpoint (python -m launch.convert).")
_CLASSES = flags.DEFINE_list("classes", None, "Comma-separated class names.")
_TEMPLATE = flags.DEFINE_string("template", DEFAULT_TEMPLATE, "Zero-shot prompt; {} is the class.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass (one compiled shape).")
_JSON = flags.DEFINE_bool("json", False, "Print machine-readable JSON instead of a table.")
_WORKDIR = shared_flags.workdir("A training workdir (local or gs://): use its learned prompts.",
                                required=False)
_TASK = flags.DEFINE_string("task", None, "With --workdir: which task's prompts (a domain name).")
_STEP = flags.DEFINE_integer("step", None, "With --workdir: checkpoint step (default latest).")


def main(argv: Sequence[str]) -> None:
  images = list(argv[1:])
  if not _WORKDIR.value and (not _CLIP.value or not _CLASSES.value):
    raise app.UsageError("--clip and --classes are required (or --workdir and --task)")
  if not images:
    raise app.UsageError("give at least one image file")
  results = predict_files(_CLIP.value, _CLASSES.value, images, template=_TEMPLATE.value,
                          batch_size=_BATCH.value, workdir=_WORKDIR.value, task=_TASK.value,
                          step=_STEP.value)
  print(json.dumps(results, indent=2) if _JSON.value else format_table(results))


def run():
  """The `mmap-predict` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()

"""Convert a pretrained CLIP once into the project's own checkpoint format.

  python -m launch.convert --src=<HF dir | OpenAI .pt | state dict .bin/.pth/.safetensors> \
      --out=<dir> [--tokenizer=<bpe_simple_vocab_16e6.txt.gz or a directory>]

The tokenizer comes from the Hugging Face directory's vocab.json + merges.txt when present,
otherwise from --tokenizer (OpenAI's .pt archives carry no vocabulary, so it is required there).
The result is read by training, evaluation and prediction without torch.
"""
from typing import Sequence

from absl import app, flags

from mmap_jax.checkpoints.convert import convert
from mmap_jax.models.config import ACTIVATIONS
from launch import entry, shared_flags
_SRC = flags.DEFINE_string("src", None, "Hugging Face CLIP directory, or an OpenAI / open_clip "
                           "checkpoint file (.pt TorchScript, .bin/.pth state dict, .safetensors).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the converted checkpoint to.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "bpe_simple_vocab_16e6.txt.gz or a directory "
                                 "holding it (or vocab.json + merges.txt); needed when --src has "
                                 "no vocabulary of its own.")
_ACTIVATION = flags.DEFINE_enum("activation", "quick_gelu", list(ACTIVATIONS),
                                "Activation of an OpenAI-layout file (not recorded in it): "
                                "quick_gelu for OpenAI and open_clip '-quickgelu' models, gelu "
                                "for other open_clip models. Ignored for Hugging Face directories.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")

def main(argv: Sequence[str]) -> None:
  shared_flags.no_arguments(argv)
  if not _SRC.value or not _OUT.value:
    raise app.UsageError("--src and --out are required")
  convert(_SRC.value, _OUT.value, _TOKENIZER.value, _ACTIVATION.value, _OVERWRITE.value)


def run():
  """The `mmap-convert` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()

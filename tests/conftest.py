"""Test-wide setup: 8 fake CPU devices (a simulated pod) before JAX initialises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
BPE_PATH = SHARED / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="session")
def bpe_path():
  """OpenAI's real CLIP BPE vocabulary, from ../shared (tests only)."""
  if not BPE_PATH.exists():
    pytest.fail(f"expected the real CLIP vocabulary at {BPE_PATH}")
  return BPE_PATH

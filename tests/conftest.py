"""Test-wide setup: 8 fake CPU devices (a simulated pod) before JAX initialises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from mmap_jax import resources  # Imports no JAX: the flags above still take effect.

BPE_PATH = resources.clip_bpe_path()


@pytest.fixture(scope="session")
def bpe_path():
  """OpenAI's real CLIP BPE vocabulary: the copy shipped as package data (no ../shared needed;
  tests/test_packaging.py checks it is byte-identical to OpenAI's file)."""
  if not BPE_PATH.exists():
    pytest.fail(f"expected the packaged CLIP vocabulary at {BPE_PATH}")
  return BPE_PATH


@pytest.fixture(scope="session")
def tok(bpe_path):
  """The real CLIP tokenizer (built once per test session)."""
  from mmap_jax.tokenizer import ClipTokenizer
  return ClipTokenizer.from_bpe_file(bpe_path)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
  """Tests that build `cadence.Preemption` objects directly (without its context manager) leave
  their SIGINT/SIGTERM handlers installed; each test starts from the handlers the session had."""
  import signal
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for s, handler in saved.items():
    signal.signal(s, handler)

"""Test-wide setup: 8 fake CPU devices (a simulated pod) before JAX initialises, and one
persistent XLA compilation cache per test session.

Why the cache: on 2 CPU cores compiling is most of the suite's time, and many tests (and the
launcher subprocesses the CLI, multi-process and kill-and-resume tests start, which inherit the
environment) compile the same tiny-CLIP programs again. The cache lives in a fresh temporary
directory, so nothing carries over between sessions or machines; a cached executable is the
same program, so no result changes.
"""
import atexit
import os
import shutil
import tempfile

# Compiling, not running, is most of each test's time (the programs are tiny), so tests compile
# for speed of compiling: LLVM's backend at -O0, and XLA:CPU's older (non-MLIR) fusion emitters,
# which emit the same fusions' code in far less time (WORKSPACE, "Running": the suite's times).
# Only the machine code changes: the HLO, its fusion and sharding
# are the same, and every comparison a test makes is between programs built with the same flags
# (subprocesses inherit them: train_fixtures.xla_flags). Launches and benchmarks outside the
# tests keep XLA's defaults.
TEST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmap_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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


@pytest.fixture
def xla_default_codegen():
  """The test's compiles use XLA:CPU's default fusion emitters (train_fixtures.xla_default_codegen):
  for tests of bit-exactness claims between differently structured programs."""
  from tests import train_fixtures
  with train_fixtures.xla_default_codegen():
    yield


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
  """Tests that build `cadence.Preemption` objects directly (without its context manager) leave
  their SIGINT/SIGTERM handlers installed; each test starts from the handlers the session had."""
  import signal
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for s, handler in saved.items():
    signal.signal(s, handler)


def slow_first(items) -> list:
  """`items` with the modules that hold more `slow` tests first (stable otherwise). Under the
  README command's `-n 2 --dist loadfile --no-loadscope-reorder` the two workers take whole
  modules in this order, so the long ones start early and short ones fill in at the end, instead
  of one worker finishing a long module alone."""
  module = lambda item: item.nodeid.split("::", 1)[0]
  slow = {}
  for item in items:
    slow[module(item)] = slow.get(module(item), 0) + bool(item.get_closest_marker("slow"))
  return sorted(items, key=lambda item: -slow[module(item)])


def pytest_collection_modifyitems(config, items):
  items[:] = slow_first(items)

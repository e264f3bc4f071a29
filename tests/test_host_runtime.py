"""Host settings applied before JAX starts: XLA flags and the allocator re-exec (tcmalloc or
tuned glibc)."""
from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from mmap_jax.apps import host_runtime

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_xla_flags_are_appended_but_never_override_the_user():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  added = host_runtime.apply_xla_flags(["--a_flag=1", "--b_flag="], env)
  assert added == ["--a_flag=1", "--b_flag="]
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --a_flag=1 --b_flag="
  env = {"XLA_FLAGS": "--b_flag=X"}
  assert host_runtime.apply_xla_flags(["--a_flag=1", "--b_flag="], env) == ["--a_flag=1"]
  assert env["XLA_FLAGS"] == "--b_flag=X --a_flag=1"
  env = {}
  assert host_runtime.apply_xla_flags([], env) == [] and "XLA_FLAGS" not in env


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD re-exec is Linux only")
def test_allocator_env_decisions():
  lib = "/x/libtcmalloc_minimal.so.4"
  tun = host_runtime.GLIBC_TUNABLES_ENV
  env = host_runtime.allocator_env({"LD_PRELOAD": "/y/libother.so", "PATH": "/bin"}, lib)
  assert env["LD_PRELOAD"] == f"{lib} /y/libother.so" and env["PATH"] == "/bin"
  assert env[host_runtime.REEXEC_MARK] == "1" and tun not in env
  # No tcmalloc (a fresh machine), or glibc asked for: glibc tuned, the user's tunables kept.
  tuned = ":".join(host_runtime.GLIBC_TUNED)
  assert host_runtime.allocator_env({}, None)[tun] == tuned
  assert host_runtime.allocator_env({host_runtime.ALLOCATOR_ENV: "glibc"}, lib)[tun] == tuned
  assert "LD_PRELOAD" not in host_runtime.allocator_env({host_runtime.ALLOCATOR_ENV: "glibc"}, lib)
  mine = host_runtime.allocator_env({tun: "glibc.malloc.hugetlb=0:glibc.foo=1"}, None)[tun]
  assert mine.split(":") == (["glibc.malloc.hugetlb=0", "glibc.foo=1"]
                             + list(host_runtime.GLIBC_TUNED[1:]))
  # Nothing to do: opted out, already re-executed, tcmalloc already preloaded, all tunables set.
  assert host_runtime.allocator_env({host_runtime.ALLOCATOR_ENV: "system"}, lib) is None
  assert host_runtime.allocator_env({host_runtime.ALLOCATOR_ENV: "system"}, None) is None
  assert host_runtime.allocator_env({host_runtime.REEXEC_MARK: "1"}, lib) is None
  assert host_runtime.allocator_env({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, None) is None
  assert host_runtime.allocator_env({tun: tuned}, None) is None
  with pytest.raises(ValueError, match=host_runtime.ALLOCATOR_ENV):
    host_runtime.allocator_env({host_runtime.ALLOCATOR_ENV: "jemalloc"}, None)
  assert host_runtime.allocator_in_use({tun: tuned}) == f"glibc ({tun}={tuned})"


def test_find_tcmalloc_explicit_and_candidates(tmp_path):
  lib = tmp_path / "libtcmalloc_minimal.so.4"
  assert host_runtime.find_tcmalloc({}, [str(tmp_path / "libtcmalloc*.so*")]) is None
  lib.write_bytes(b"")
  assert host_runtime.find_tcmalloc({}, [str(tmp_path / "nothing.so"),
                                         str(tmp_path / "libtcmalloc*.so*")]) == str(lib)
  assert host_runtime.find_tcmalloc({host_runtime.TCMALLOC_ENV: str(lib)}, []) == str(lib)
  with pytest.raises(FileNotFoundError, match=host_runtime.TCMALLOC_ENV):
    host_runtime.find_tcmalloc({host_runtime.TCMALLOC_ENV: str(tmp_path / "missing.so")}, [])
  assert host_runtime.allocator_in_use({"LD_PRELOAD": f"/a/libfoo.so {lib}"}) == str(lib)
  assert host_runtime.allocator_in_use({}) == "system"


def _loaded_libm() -> str | None:
  """A real shared library this process already maps (libm): safe to LD_PRELOAD in a child."""
  try:
    maps = pathlib.Path("/proc/self/maps").read_text()
  except OSError:
    return None
  paths = [l.split()[-1] for l in maps.splitlines() if "/libm.so" in l or "/libm-" in l]
  return paths[0] if paths else None


@pytest.mark.skipif(_loaded_libm() is None, reason="needs Linux /proc/self/maps with libm")
def test_reexec_replaces_the_process_once_with_the_library_preloaded(tmp_path):
  lib = _loaded_libm()
  script = tmp_path / "child.py"
  script.write_text(
      "import os, sys\n"
      "from mmap_jax.apps import host_runtime\n"
      "if os.environ.get(host_runtime.REEXEC_MARK):\n"
      "  print('REEXECED', os.environ['LD_PRELOAD'],\n"
      "        ' '.join(sys.argv[1:]), flush=True)\n"
      f"host_runtime.reexec_with_allocator(candidates=[{lib!r}])\n"
      "print('RAN', ' '.join(sys.argv[1:]))\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", host_runtime.ALLOCATOR_ENV, host_runtime.REEXEC_MARK,
                      host_runtime.TCMALLOC_ENV)}
  env["PYTHONPATH"] = str(REPO)
  run = lambda e: subprocess.run([sys.executable, str(script), "a", "--b=1"], env=e, text=True,
                                 capture_output=True, timeout=60)
  proc = run(env)
  assert proc.returncode == 0, proc.stderr
  # The child ran once, re-executed, with the same arguments; the parent image never printed.
  assert proc.stdout.splitlines() == [f"REEXECED {lib} a --b=1", "RAN a --b=1"]
  assert "re-executing with LD_PRELOAD" in proc.stderr
  proc = run({**env, host_runtime.ALLOCATOR_ENV: "system"})          # opted out: no re-exec
  assert proc.stdout.splitlines() == ["RAN a --b=1"] and "re-executing" not in proc.stderr


_FAULTS_CHILD = (  # like XLA's per-call temporaries: a big buffer allocated, written, freed
    "import ctypes, resource, sys, threading\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    # No transparent huge pages in this child, so a fault is one fresh 4 KiB page whatever THP
    # mode the machine has: the count then says whether freed memory is reused, and a 2 MiB
    # page (one fault, the same zeroing work) cannot hide an mmap/munmap per call.
    "libc.prctl(41, 1, 0, 0, 0)\n"   # PR_SET_THP_DISABLE
    "def call():\n"
    "  p = libc.malloc(256 << 20); ctypes.memset(p, 1, 256 << 20); libc.free(p)\n"
    "def work():\n"
    "  for _ in range(3): call()\n"
    "  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "  for _ in range(3): call()\n"
    "  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    "if sys.argv[1] == 'thread':\n"   # XLA runs a call on its own threads, not the main one
    "  t = threading.Thread(target=work); t.start(); t.join()\n"
    "else:\n"
    "  work()\n")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES needs glibc")
def test_tuned_glibc_stops_the_page_fault_storm():
  """The tunables do what the docstring says: three 256 MiB malloc-write-free calls fault in
  3 x 65,536 fresh 4 KiB pages under plain glibc (mmap/munmap every call), almost none tuned.
  On another thread (where XLA runs a call) the thread's arena mmaps each buffer anyway, tuned
  or not, unless arena_max=1: the known limit the docstring states, checked so the test can
  tell if glibc changes. (The bounds leave a wide margin on both sides.)"""
  env = {k: v for k, v in os.environ.items() if k != host_runtime.GLIBC_TUNABLES_ENV}
  def faults(where, tunables=None):
    e = env if tunables is None else {**env, host_runtime.GLIBC_TUNABLES_ENV: ":".join(tunables)}
    return int(subprocess.run([sys.executable, "-c", _FAULTS_CHILD, where], env=e, text=True,
                              capture_output=True, timeout=60, check=True).stdout)
  plain, tuned = faults("main"), faults("main", host_runtime.GLIBC_TUNED)
  assert plain > 150_000, plain
  assert tuned < plain / 50, (plain, tuned)
  assert faults("thread", host_runtime.GLIBC_TUNED) > 150_000
  one_arena = (*host_runtime.GLIBC_TUNED, "glibc.malloc.arena_max=1")
  assert faults("thread", one_arena) < plain / 50


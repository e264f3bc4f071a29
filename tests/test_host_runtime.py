"""Host settings applied before JAX starts: XLA flags and the opt-in allocator re-exec (tcmalloc
or tuned glibc; by default nothing)."""
from __future__ import annotations

import os
import pathlib
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
  tun, var = host_runtime.GLIBC_TUNABLES_ENV, host_runtime.ALLOCATOR_ENV
  # The default (unset, empty or "system"): nothing, whatever is installed.
  for env in ({}, {var: ""}, {var: "system"}):
    assert host_runtime.allocator_env(env, lib) is None
    assert host_runtime.allocator_env(env, None) is None
  env = host_runtime.allocator_env({var: "tcmalloc", "LD_PRELOAD": "/y/libother.so",
                                    "PATH": "/bin"}, lib)
  assert env["LD_PRELOAD"] == f"{lib} /y/libother.so" and env["PATH"] == "/bin"
  assert env[host_runtime.REEXEC_MARK] == "1" and tun not in env
  with pytest.raises(FileNotFoundError, match="no libtcmalloc is installed"):
    host_runtime.allocator_env({var: "tcmalloc"}, None)   # asked for, absent: said, not skipped
  # glibc asked for: tuned, the user's own tunables kept.
  tuned = ":".join(host_runtime.GLIBC_TUNED)
  assert host_runtime.allocator_env({var: "glibc"}, lib)[tun] == tuned
  assert "LD_PRELOAD" not in host_runtime.allocator_env({var: "glibc"}, lib)
  mine = host_runtime.allocator_env({var: "glibc", tun: "glibc.malloc.hugetlb=0:glibc.foo=1"},
                                    None)[tun]
  assert mine.split(":") == (["glibc.malloc.hugetlb=0", "glibc.foo=1"]
                             + list(host_runtime.GLIBC_TUNED[1:]))
  # Nothing to do: JAX not on the CPU, already re-executed, tcmalloc already preloaded, all set.
  assert host_runtime.allocator_env({var: "glibc"}, lib, on_cpu=False) is None
  assert host_runtime.allocator_env({var: "tcmalloc"}, lib, on_cpu=False) is None
  assert host_runtime.allocator_env({var: "tcmalloc", host_runtime.REEXEC_MARK: "1"}, lib) is None
  assert host_runtime.allocator_env({var: "tcmalloc", "LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"},
                                    None) is None
  assert host_runtime.allocator_env({var: "glibc", tun: tuned}, None) is None
  with pytest.raises(ValueError, match=var):
    host_runtime.allocator_env({var: "jemalloc"}, None)
  assert host_runtime.allocator_in_use({tun: tuned}) == f"glibc ({tun}={tuned})"


def test_runs_on_cpu_from_jax_platforms_or_device_nodes(tmp_path):
  nodes = [str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "accel[0-9]*")]
  assert host_runtime.runs_on_cpu({}, nodes)
  assert host_runtime.runs_on_cpu({"JAX_PLATFORMS": "cpu"}, nodes)
  assert not host_runtime.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"}, nodes)
  assert not host_runtime.runs_on_cpu({"JAX_PLATFORMS": "tpu"}, nodes)
  (tmp_path / "accel0").write_bytes(b"")   # a TPU host
  assert not host_runtime.runs_on_cpu({}, nodes)
  assert host_runtime.runs_on_cpu({"JAX_PLATFORMS": "cpu"}, nodes)   # told to use the CPU


def test_a_default_launch_neither_reexecutes_nor_tunes_glibc(monkeypatch):
  """launch.entry.run as every launcher calls it, with MMAP_JAX_ALLOCATOR unset: main runs in
  this very process, GLIBC_TUNABLES and LD_PRELOAD as they were."""
  from launch import entry
  execs, seen = [], {}
  monkeypatch.setattr(host_runtime.os, "execve", lambda *a: execs.append(a))
  monkeypatch.delenv(host_runtime.ALLOCATOR_ENV, raising=False)
  monkeypatch.delenv(host_runtime.GLIBC_TUNABLES_ENV, raising=False)
  monkeypatch.setattr(sys, "argv", ["launch.x"])
  def main(argv):
    seen.update(os.environ)
  with pytest.raises(SystemExit) as exit_:   # absl's app.run exits after main
    entry.run(main)
  assert exit_.value.code in (0, None) and not execs
  assert host_runtime.GLIBC_TUNABLES_ENV not in seen
  assert seen.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD")
  assert host_runtime.REEXEC_MARK not in seen


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


@pytest.mark.slow
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
  env["JAX_PLATFORMS"] = "cpu"   # the re-exec only applies where JAX computes on the CPU
  run = lambda e: subprocess.run([sys.executable, str(script), "a", "--b=1"], env=e, text=True,
                                 capture_output=True, timeout=60)
  proc = run(env)                                                     # the default: no re-exec
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["RAN a --b=1"] and "re-executing" not in proc.stderr
  proc = run({**env, host_runtime.ALLOCATOR_ENV: "tcmalloc"})          # opted in
  assert proc.returncode == 0, proc.stderr
  # The child ran once, re-executed, with the same arguments; the parent image never printed.
  assert proc.stdout.splitlines() == [f"REEXECED {lib} a --b=1", "RAN a --b=1"]
  assert "re-executing with LD_PRELOAD" in proc.stderr
  proc = run({**env, host_runtime.ALLOCATOR_ENV: "tcmalloc", "JAX_PLATFORMS": "cuda"})
  assert proc.stdout.splitlines() == ["RAN a --b=1"] and "ignored" in proc.stderr   # not a CPU run


"""What every launcher runs, as `python -m launch.X` and as the `mmap-X` console scripts.

Order matters: the host allocator is applied first when asked for (`MMAP_JAX_ALLOCATOR=tcmalloc|glibc`
on a CPU host re-executes the launcher once, before JAX or any thread starts; unset, the default,
changes nothing: mmap_jax/apps/host_runtime.py), then `--config=configs/<file>.py[:args]` is resolved, then absl parses the flags.
Resolution lets an installed package run from any directory: a config path that does not exist
relative to the working directory but names a file of the installed `configs` package (e.g.
`configs/demo.py`) is replaced by that file's absolute path. Paths that exist are left alone, so a
clone's own (possibly edited) configs always win.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Callable, Optional, Sequence

from absl import app

from mmap_jax.apps import host_runtime

CONFIG_FLAGS = ("--config", "-config")


def packaged_configs_dir() -> pathlib.Path:
  import configs  # The experiment configs ship as a package beside mmap_jax.
  return pathlib.Path(configs.__file__).resolve().parent


def resolve_config_path(value: str) -> str:
  """'configs/demo.py:runlocal' -> '<installed configs>/demo.py:runlocal' when only that exists."""
  path, sep, arg = value.partition(":")
  if not path or os.path.exists(path):
    return value
  parts = pathlib.PurePath(path).parts
  if len(parts) != 2 or parts[0] != "configs":
    return value   # Not one of ours: config_flags reports the missing file itself.
  candidate = packaged_configs_dir() / parts[1]
  return f"{candidate}{sep}{arg}" if candidate.is_file() else value


def resolve_config_args(argv: Sequence[str]) -> list[str]:
  """`--config=V` / `--config V` with V resolved by `resolve_config_path`; all else unchanged."""
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    name, eq, value = a.partition("=")
    if name in CONFIG_FLAGS and eq:
      a = f"{name}={resolve_config_path(value)}"
    elif a in CONFIG_FLAGS and i + 1 < len(argv):
      out.append(a)
      i += 1
      a = resolve_config_path(argv[i])
    out.append(a)
    i += 1
  return out


def run(main: Callable[[list[str]], None], *, xla_flags: Optional[str] = None) -> None:
  """Opt-in allocator re-exec, optional XLA flags, config resolution, absl."""
  try:
    host_runtime.reexec_with_allocator()
  except (ValueError, FileNotFoundError) as e:   # a bad $MMAP_JAX_ALLOCATOR: one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if xla_flags:
    host_runtime.apply_xla_flags(xla_flags)
  sys.argv = resolve_config_args(sys.argv)
  app.run(main)

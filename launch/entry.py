"""What every launcher runs, as `python -m launch.X` and as the `mmap-X` console scripts.

Order matters: the host allocator is applied first when asked for (`MMAP_JAX_ALLOCATOR=tcmalloc|glibc`
on a CPU host re-executes the launcher once, before JAX or any thread starts; unset, the default,
changes nothing: mmap_jax/apps/host_runtime.py), then `--config=configs/<file>.py[:args]` is resolved, then absl parses the flags.
Resolution lets an installed package run from any directory: a config path that does not exist
relative to the working directory but names a file of the installed `configs` package (e.g.
`configs/demo.py`) is replaced by that file's absolute path. Paths that exist are left alone, so a
clone's own (possibly edited) configs always win.

A user error (a bad config value, a missing file or data folder, a workdir that is a file, no
checkpoint) ends the launcher with one block on stderr, what is wrong and how to fix it, and
exit status 2; the traceback only with `--verbosity=1` or MMAP_JAX_DEBUG=1 (`user_error`).
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import logging as absl_logging

import mmap_jax
from mmap_jax import resources
from mmap_jax.apps import host_runtime

CONFIG_FLAGS = ("--config", "-config")
DEBUG_ENV = "MMAP_JAX_DEBUG"     # 1: tracebacks for user errors too
USER_ERROR_EXIT_CODE = 2
# Errors of the user's inputs from outside the project: files and directories named by flags.
_OS_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError)
_PROJECT_DIRS = tuple(pathlib.Path(m).resolve().parent for m in (__file__, mmap_jax.__file__))


# The one config-path resolution (shared with launch.sweep and the notebook): mmap_jax.resources.
packaged_configs_dir = resources.configs_dir
resolve_config_path = resources.resolve_config_path


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


def _raised_by_the_project(e: BaseException) -> bool:
  """The innermost frame of `e`'s traceback is in mmap_jax/ or launch/ (a `raise` of ours)."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None:
    return False
  where = pathlib.Path(tb.tb_frame.f_code.co_filename).resolve()
  return any(where.is_relative_to(d) for d in _PROJECT_DIRS)


def user_error(e: BaseException) -> bool:
  """Whether `e` reports the user's input rather than a bug: the project's own error classes
  (ConfigError, CheckpointError, DataLayoutError, ...), a ValueError the project raised (its
  message names the field or file and the fix), and missing / misplaced / unwritable files."""
  if isinstance(e, _OS_USER_ERRORS):
    return True
  if any(c.__module__.startswith("mmap_jax.") for c in type(e).__mro__):
    return True
  return isinstance(e, ValueError) and _raised_by_the_project(e)


def _message(e: BaseException) -> str:
  if isinstance(e, OSError) and e.strerror and e.filename:   # as raised by open() / mkdir()
    return f"{e.strerror}: {e.filename}"
  return str(e)


def _debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0") or absl_logging.get_verbosity() >= 1


def report_user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with user errors printed as one block, `error: ...` (exit 2); other exceptions, and
  all of them with --verbosity=1 or MMAP_JAX_DEBUG=1, raise with their traceback."""
  def guarded(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if not user_error(e) or _debug():
        raise
      print(f"error: {_message(e)}", file=sys.stderr, flush=True)
      sys.exit(USER_ERROR_EXIT_CODE)
  return guarded


# Libraries whose lines would bury the run's own progress, evaluation and result lines, and the
# level from which they still show: orbax logs ~10 INFO lines per checkpoint, grain some per
# dataset opened, TFDS INFO and a "Using custom data configuration" WARNING per domain built.
QUIET_LIBRARIES = {"orbax": logging.WARNING, "grain": logging.WARNING,
                   "tensorflow_datasets": logging.ERROR}


class _LibraryChatterFilter(logging.Filter):
  """Drops QUIET_LIBRARIES' records below their level, unless absl's --verbosity is 1 or more."""

  def __init__(self):
    super().__init__()
    self._dirs = tuple((f"{os.sep}{lib}{os.sep}", level) for lib, level in QUIET_LIBRARIES.items())

  def filter(self, record: logging.LogRecord) -> bool:
    if absl_logging.get_verbosity() >= 1:
      return True
    return not any(d in record.pathname and record.levelno < level for d, level in self._dirs)


def quiet_library_logs() -> None:
  """Keep orbax / TFDS / grain chatter off the console (absl's handler, where launchers log),
  so what a user reads is the project's own lines; `--verbosity=1` shows them again."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryChatterFilter) for f in handler.filters):
    handler.addFilter(_LibraryChatterFilter())


def run(main: Callable[[list[str]], None], *, xla_flags: Optional[str] = None) -> None:
  """Opt-in allocator re-exec, optional XLA flags, config resolution, absl, user errors."""
  try:
    host_runtime.reexec_with_allocator()
  except (ValueError, FileNotFoundError) as e:   # a bad $MMAP_JAX_ALLOCATOR: one line, exit 2
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)
  if xla_flags:
    host_runtime.apply_xla_flags(xla_flags)
  sys.argv = resolve_config_args(sys.argv)
  quiet_library_logs()
  app.run(report_user_errors(main))

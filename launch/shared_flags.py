"""The flags the launchers share, spelled once: --config, --workdir, and no stray arguments.

  _CONFIG = shared_flags.config()                 # --config=configs/<file>.py[:args], required
  _WORKDIR = shared_flags.workdir("Where ... go")  # a local directory or a gs:// URI, required

The multi-process flags every launcher also takes are launch/distributed_flags.py.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

WORKDIR_HELP = ("Where checkpoints, logs and results go: a local directory or a gs:// URI.")


def config(help_text: str = "Experiment config file[:args].", *, required: bool = True,
           lock: bool = True, default: Optional[str] = None) -> flags.FlagHolder:
  """--config=<file>.py[:args] with --config.<field>=value overrides (ml_collections)."""
  holder = config_flags.DEFINE_config_file("config", default, help_text, lock_config=lock)
  if required:
    flags.mark_flag_as_required("config")
  return holder


def workdir(help_text: str = WORKDIR_HELP, *, required: bool = True) -> flags.FlagHolder:
  holder = flags.DEFINE_string("workdir", None, help_text)
  if required:
    flags.mark_flag_as_required("workdir")
  return holder


def no_arguments(argv: Sequence[str]) -> None:
  """Launchers that take flags only: a stray positional argument is a usage error."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def exit_if_interrupted(out: Mapping[str, Any]) -> None:
  """A sweep or tuning stopped by SIGTERM or Ctrl-C exits with the interrupted run's status
  (143, or 130 after Ctrl-C), so a restarting scheduler reruns the same command."""
  if out.get("preempted"):
    from mmap_jax.train import cadence  # pylint: disable=g-import-not-at-top
    sys.exit(out.get("exit_code") or cadence.PREEMPTED_EXIT_CODE)

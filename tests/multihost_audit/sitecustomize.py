"""Loaded by the multi-process tests' subprocesses (on PYTHONPATH): a per-process write log.

With $MMAP_JAX_WRITE_LOG set, every file this Python process opens for writing, and every
rename / mkdir / remove, is appended to that file as one tab-separated line (event, path), so a
test can tell which process wrote which output. Native writers (tensorstore) are not seen.
"""
import os
import sys

_PATH = os.environ.get("MMAP_JAX_WRITE_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

if _PATH:
  _log = open(_PATH, "a", buffering=1)

  def _hook(event, args):
    if event == "open":
      path, mode, flags = args
      writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                else bool(flags & _WRITE_FLAGS))
      if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fspath(path) != _PATH:
        _log.write(f"open\t{os.path.abspath(os.fsdecode(path))}\n")
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree",
                   "shutil.move", "os.truncate"):
      path = args[1] if event in ("os.rename", "shutil.move") else args[0]
      if isinstance(path, (str, bytes, os.PathLike)):
        _log.write(f"{event}\t{os.path.abspath(os.fsdecode(path))}\n")

  sys.addaudithook(_hook)

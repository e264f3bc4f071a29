"""Per-example test correctness of a run (`test_correct.npz`), what paired statistics resample.

The trainer's final (and only) test evaluation writes, for every task, a bool array over the
task's test split indexed by record index within the split (the same order for every seed and
method of a sweep: the split comes from data.split_seed). results.json stays the finished marker
and is written after this file. Compact: npz-compressed bools, about 1 bit per image.
"""
from __future__ import annotations

import io
from typing import Mapping, Optional

import jax
import numpy as np

from mmap_jax import paths

CORRECT_FILE = "test_correct.npz"


def write_correct(workdir: paths.PathLike, correct: Mapping[str, np.ndarray]) -> None:
  """{task name: bool [n_test]} -> `<workdir>/test_correct.npz` (process 0; atomic)."""
  if jax.process_index() != 0:
    return
  names = list(correct)
  arrays = {f"task_{i}": np.packbits(np.asarray(correct[n], bool)) for i, n in enumerate(names)}
  sizes = np.asarray([np.asarray(correct[n]).size for n in names], np.int64)
  buf = io.BytesIO()
  np.savez_compressed(buf, names=np.asarray(names, dtype=str), sizes=sizes, **arrays)
  paths.write_bytes_atomic(paths.as_path(workdir) / CORRECT_FILE, buf.getvalue())


def read_correct(workdir: paths.PathLike) -> Optional[dict[str, np.ndarray]]:
  """The file as {task name: bool [n_test]}, or None when the run has none (older runs)."""
  path = paths.as_path(workdir) / CORRECT_FILE
  if not path.is_file():
    return None
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
    names, sizes = [str(n) for n in f["names"]], f["sizes"]
    return {n: np.unpackbits(f[f"task_{i}"], count=int(sizes[i])).astype(bool)
            for i, n in enumerate(names)}

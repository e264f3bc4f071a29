"""Workdir paths through etils.epath (what orbax uses), so `gs://` / `s3://` workdirs work.

`as_path` is the one place a workdir string becomes a path: a URI of a scheme epath serves
(`gs://`, `s3://`, `az://`, `hf://`) is kept exactly as given; a local path is made absolute
(as the trainer always did). Any other `scheme://` is rejected: epath would silently treat it
as a relative local directory named `scheme:`.

Atomic writes: a reader (launch.sweep taking a results.json as "finished", a restarted run
reading groups.json) must never see half a file. Locally that is a temporary file renamed over
the target (POSIX rename is atomic). Object stores have no atomic rename (gcsfs/s3fs "rename"
is copy + delete), but a single object upload is atomic by itself: GCS and S3 publish an
object only once its upload completes, and a killed upload publishes nothing (the previous
version, if any, stays). So on an object store the bytes are uploaded straight to the final
name, in one write from memory.
"""
from __future__ import annotations

import io
import os
import re
from typing import Any, Union

from etils import epath

URI_SCHEMES = ("gs", "s3", "az", "hf")   # the schemes etils.epath serves
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

PathLike = Union[str, os.PathLike]


def uri_scheme(p: PathLike) -> str | None:
  """'gs' for 'gs://b/x', None for a local path."""
  m = _URI.match(os.fspath(p))
  return m.group(1).lower() if m else None


def is_uri(p: PathLike) -> bool:
  return uri_scheme(p) is not None


def as_path(p: PathLike) -> epath.Path:
  """The epath.Path of a workdir (or a file in one): URIs untouched, local paths absolute."""
  if isinstance(p, epath.Path) and (is_uri(p) or os.path.isabs(os.fspath(p))):
    return p
  s = os.fspath(p)
  scheme = uri_scheme(s)
  if scheme is None:
    return epath.Path(os.path.abspath(s))
  if scheme not in URI_SCHEMES:
    raise ValueError(f"{s!r}: unsupported scheme {scheme}:// (supported: "
                     f"{', '.join(f'{x}://' for x in URI_SCHEMES)}, or a local path)")
  return epath.Path(s)


def write_bytes_atomic(path: PathLike, data: bytes) -> epath.Path:
  """`data` as the whole file at `path`, never visible half-written (see the module doc)."""
  path = as_path(path)
  if is_uri(path):
    path.write_bytes(data)   # one object upload: published whole or not at all
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
  return write_bytes_atomic(path, text.encode("utf-8"))


def save_npy(path: PathLike, array: Any) -> epath.Path:
  """np.save into any epath location, atomically."""
  import numpy as np
  buf = io.BytesIO()
  np.save(buf, np.asarray(array))
  return write_bytes_atomic(path, buf.getvalue())


def load_npy(path: PathLike):
  import numpy as np
  return np.load(io.BytesIO(as_path(path).read_bytes()))


def save_figure(path: PathLike, fig: Any, **kwargs) -> epath.Path:
  """A matplotlib Figure as PNG into any epath location, atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kwargs)
  return write_bytes_atomic(path, buf.getvalue())

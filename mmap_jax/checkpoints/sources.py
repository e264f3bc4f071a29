"""Read checkpoint files as {key: array} without trusting them.

A `TensorSource` gives key names and shapes before any data is read (so architecture inference
and shape checks are cheap) and returns floating tensors as float32 numpy arrays (fp16/bf16/fp64
checkpoints are cast). safetensors files are read with safetensors' numpy API; PyTorch files need
torch, imported only here and only when such a file is read, and are never unpickled without
`weights_only=True` (TorchScript archives go through `torch.jit.load`, which does not unpickle
Python objects).
"""
from __future__ import annotations

import abc
import json
import os
import pathlib
import pickle
import zipfile
from typing import Any, Mapping, Sequence, Union

import ml_dtypes  # noqa: F401  # pylint: disable=unused-import  (numpy learns bfloat16)
import numpy as np
from safetensors import SafetensorError, safe_open

from mmap_jax.checkpoints.errors import CheckpointError

PathLike = Union[str, os.PathLike]
Shape = tuple[int, ...]

# safetensors dtype codes of floating tensors (all are cast to float32).
_SAFETENSORS_FLOATS = frozenset({"F16", "BF16", "F32", "F64"})
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class TensorSource(abc.ABC):
  """Named tensors from one checkpoint (possibly several files)."""

  description: str  # what to name in error messages

  @abc.abstractmethod
  def keys(self) -> list[str]:
    ...

  @abc.abstractmethod
  def shape(self, key: str) -> Shape:
    ...

  @abc.abstractmethod
  def dtype(self, key: str) -> str:
    ...

  @abc.abstractmethod
  def get(self, key: str) -> np.ndarray:
    """The tensor as float32 (floating dtypes only: parameters are never integers)."""

  def where(self, key: str) -> str:
    """The file holding `key`, for messages."""
    return self.description

  def __contains__(self, key: str) -> bool:
    return key in self._key_set()

  def _key_set(self) -> frozenset[str]:
    if not hasattr(self, "_keys_cache"):
      self._keys_cache = frozenset(self.keys())
    return self._keys_cache


# ----------------------------------------------------------------------------- safetensors

def _open_safetensors(path: pathlib.Path):
  if not path.is_file():
    raise CheckpointError(f"checkpoint file not found: {path}")
  try:
    return safe_open(str(path), framework="np")
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                          f"{e}") from e


class SafetensorsSource(TensorSource):
  """One or more safetensors files (a sharded checkpoint is several files, disjoint keys)."""

  def __init__(self, paths: Sequence[PathLike], description: str | None = None):
    self._paths = [pathlib.Path(p) for p in paths]
    self.description = description or ", ".join(str(p) for p in self._paths)
    self._handles = {p: _open_safetensors(p) for p in self._paths}
    self._file_of: dict[str, pathlib.Path] = {}
    for p, h in self._handles.items():
      for k in h.keys():
        if k in self._file_of:
          raise CheckpointError(f"key {k!r} is in both {self._file_of[k]} and {p}")
        self._file_of[k] = p

  def keys(self) -> list[str]:
    return list(self._file_of)

  def _slice(self, key: str):
    p = self._file_of[key]
    try:
      return self._handles[p].get_slice(key)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{p}: cannot read tensor {key!r}: {e}") from e

  def shape(self, key: str) -> Shape:
    return tuple(int(d) for d in self._slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return str(self._slice(key).get_dtype())

  def get(self, key: str) -> np.ndarray:
    p, dt = self._file_of[key], self.dtype(key)
    if dt not in _SAFETENSORS_FLOATS:
      raise CheckpointError(f"{p}: tensor {key!r} has dtype {dt}; parameters must be floating "
                            f"point ({sorted(_SAFETENSORS_FLOATS)})")
    try:
      a = self._handles[p].get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise CheckpointError(f"{p}: cannot read tensor {key!r}: {e}") from e
    return np.asarray(a, dtype=np.float32)

  def where(self, key: str) -> str:
    return str(self._file_of.get(key, self.description))


def sharded_safetensors(index_path: PathLike) -> SafetensorsSource:
  """A `model.safetensors.index.json` and the shards its weight_map names."""
  index_path = pathlib.Path(index_path)
  try:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index_path}: not a valid safetensors index: {e!r}") from e
  shards = sorted(set(weight_map.values()))
  source = SafetensorsSource([index_path.parent / s for s in shards], description=str(index_path))
  # The index and the shards must agree, or a tensor would be read from the wrong place.
  for key, shard in weight_map.items():
    actual = source._file_of.get(key)
    if actual is None or actual.name != pathlib.Path(shard).name:
      raise CheckpointError(f"{index_path}: weight_map puts {key!r} in {shard}, but "
                            f"{'no shard has it' if actual is None else f'it is in {actual}'}")
  extra = sorted(set(source.keys()) - set(weight_map))
  if extra:
    raise CheckpointError(f"{index_path}: shards hold keys its weight_map does not list: "
                          f"{extra[:5]}")
  return source


# ----------------------------------------------------------------------------- PyTorch

def import_torch(path: PathLike):
  """torch, or an error saying why it is needed (it is not needed for safetensors inputs)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"reading the PyTorch checkpoint {path} needs torch, which is not installed; "
        "install it (`pip install torch`, the CPU build is enough) on the machine that runs "
        "`launch.convert` -- converted checkpoints are read without torch") from e
  return torch


def is_torchscript_archive(path: PathLike) -> bool:
  """TorchScript zips (OpenAI's released .pt files) carry `constants.pkl` and `code/`."""
  try:
    with zipfile.ZipFile(path) as z:
      return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def load_torch_state_dict(path: PathLike) -> dict[str, Any]:
  """A PyTorch file's {name: tensor}: TorchScript archive, state dict, or {"state_dict": ...}."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"checkpoint file not found: {path}")
  torch = import_torch(path)
  try:
    if is_torchscript_archive(path):
      obj = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
      obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
        f"{path}: refusing to load: it holds Python objects other than tensors and plain "
        f"containers, and checkpoints are only read with torch.load(weights_only=True) "
        f"({_first_line(e)})") from e
  except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                          f"{_first_line(e)}") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]                              # open_clip / Lightning training files
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                          f"got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
  if bad:
    raise CheckpointError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
  keys = list(obj)
  if keys and all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)


class TorchSource(TensorSource):
  """An in-memory PyTorch state dict."""

  def __init__(self, state_dict: Mapping[str, Any], description: str):
    self._sd = dict(state_dict)
    self.description = description

  def keys(self) -> list[str]:
    return list(self._sd)

  def shape(self, key: str) -> Shape:
    return tuple(int(d) for d in self._sd[key].shape)

  def dtype(self, key: str) -> str:
    return str(self._sd[key].dtype).replace("torch.", "")

  def get(self, key: str) -> np.ndarray:
    t = self._sd[key]
    if not t.is_floating_point():
      raise CheckpointError(f"{self.description}: tensor {key!r} has dtype {self.dtype(key)}; "
                            "parameters must be floating point")
    import torch  # pylint: disable=import-outside-toplevel  (already imported to build _sd)
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def open_state_dict(path: PathLike) -> TensorSource:
  """A single-file state dict: safetensors by suffix, otherwise a PyTorch file."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    return SafetensorsSource([path])
  return TorchSource(load_torch_state_dict(path), str(path))

"""Turn a checkpoint's tensors into the params pytree, strictly.

Every key is accounted for before any data is read: each rule's sources must exist with the
layout's shapes, every other key must be a known non-parameter, and the result must match
`clip.param_shapes(cfg)` leaf for leaf. Nothing is ever left at a random init.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

from mmap_jax.checkpoints import naming
from mmap_jax.checkpoints.errors import CheckpointError
from mmap_jax.checkpoints.sources import TensorSource
from mmap_jax.models.config import ClipConfig

Params = dict[str, Any]
_MAX_LISTED = 20


@dataclasses.dataclass
class LoadedCheckpoint:
  """A converted checkpoint: architecture, float32 numpy params, and where it came from."""
  cfg: ClipConfig
  params: Params
  source: dict[str, Any]   # {"format": ..., "path": ..., "dtypes": [...]}, recorded in clip.json


def describe(cfg: ClipConfig) -> str:
  """One line naming every architecture field, for messages and the convert CLI."""
  v, t = cfg.vision, cfg.text
  return (f"ViT image {v.image_size}px patch {v.patch_size} width {v.width} layers {v.layers} "
          f"heads {v.heads}; text width {t.width} layers {t.layers} heads {t.heads} "
          f"context {t.context_length} vocab {t.vocab_size}; embed {cfg.embed_dim}; "
          f"{cfg.activation}")


def _listing(title: str, lines: list[str]) -> list[str]:
  if not lines:
    return []
  more = [f"    ... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else []
  return [f"  {title} ({len(lines)}):"] + [f"    {l}" for l in lines[:_MAX_LISTED]] + more


def _raise_mismatch(what: str, cfg: ClipConfig, missing: list[str], unexpected: list[str],
                    misshaped: list[str]) -> None:
  if missing or unexpected or misshaped:
    raise CheckpointError("\n".join(
        [f"{what} does not match the architecture {describe(cfg)}:"]
        + _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
        + _listing("keys with the wrong shape", misshaped)))


def assemble(source: TensorSource, rules: Iterable[naming.Rule], cfg: ClipConfig,
             non_parameters: frozenset[str]) -> Params:
  """Params (float32 numpy, '/'-structured like `clip.init_params`) from `source` via `rules`."""
  rules = list(rules)
  expected = naming.expected_shapes(cfg)
  if sorted(r.target for r in rules) != sorted(expected):
    raise RuntimeError("internal error: conversion rules do not cover clip.param_shapes exactly")
  wanted: dict[str, tuple[int, ...]] = {}
  for r in rules:
    wanted.update(zip(r.sources, r.source_shapes))
  present = source.keys()
  present_set = set(present)
  missing = [f"{k!r} (expected shape {wanted[k]})" for k in wanted if k not in present_set]
  unexpected = [f"{k!r} with shape {source.shape(k)}" for k in present
                if k not in wanted and k not in non_parameters]
  misshaped = [f"{k!r}: expected {wanted[k]}, found {source.shape(k)}" for k in wanted
               if k in present_set and source.shape(k) != wanted[k]]
  _raise_mismatch(source.description, cfg, missing, unexpected, misshaped)
  flat = {}
  for r in rules:
    leaf = np.asarray(r.combine(*(source.get(s) for s in r.sources)), np.float32, order="C")
    if leaf.shape != expected[r.target]:
      raise RuntimeError(f"internal error: rule for {r.target} built {leaf.shape}, "
                         f"expected {expected[r.target]}")
    flat[r.target] = leaf
  params = naming.unflatten(flat)
  validate_params(params, cfg, source.description)
  return params


def validate_params(params: Mapping[str, Any], cfg: ClipConfig, what: str) -> None:
  """Error unless `params` has exactly the leaves, shapes and float32 dtype `cfg` needs."""
  expected = naming.expected_shapes(cfg)
  flat = naming.flatten(params)
  missing = [f"{k!r} (expected shape {s})" for k, s in expected.items() if k not in flat]
  unexpected = [f"{k!r} with shape {tuple(np.shape(v))}" for k, v in flat.items()
                if k not in expected]
  misshaped = [f"{k!r}: expected {expected[k]}, found {tuple(np.shape(v))}"
               for k, v in flat.items() if k in expected and tuple(np.shape(v)) != expected[k]]
  _raise_mismatch(what, cfg, missing, unexpected, misshaped)
  wrong_dtype = [f"{k!r}: {np.dtype(getattr(v, 'dtype', np.float64))}" for k, v in flat.items()
                 if np.dtype(getattr(v, "dtype", np.float64)) != np.float32]
  if wrong_dtype:
    raise CheckpointError(f"{what}: parameters must be float32, found "
                          + ", ".join(wrong_dtype[:5]))

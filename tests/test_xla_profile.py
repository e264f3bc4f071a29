"""mmap_jax/apps/xla_profile.py: a traced call's thunk events joined with its optimised HLO."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmap_jax.apps import host_runtime, xla_profile

FAST = host_runtime.compiler_options()


def _program(options=None):
  """A plain dot, a batched dot, a softmax (reductions + elementwise) and a transpose."""
  def f(x, w, a, b):
    h = jnp.tanh(x @ w)                                   # [64, 96] x [96, 80]
    s = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", a, b))  # [6, 40, 16] x [6, 48, 16]
    return h.sum() + jnp.swapaxes(s, 1, 2).sum(), jnp.swapaxes(s, 0, 2) * 2.0
  key = iter(jax.random.split(jax.random.key(0), 4))
  args = tuple(jax.random.normal(next(key), s) for s in ((64, 96), (96, 80), (6, 40, 16),
                                                         (6, 48, 16)))
  compiled = jax.jit(f).lower(*args).compile(compiler_options=options)
  return compiled, args


def test_hlo_is_parsed_into_kinds_and_dot_flops():
  compiled, _ = _program(FAST)                           # as launch.benchmark compiles
  instrs, comps = xla_profile.parse_hlo(compiled.as_text())
  dots = {n: i for n, i in instrs.items() if i["opcode"] == "dot"}
  assert sorted(len(i["dims"]) for i in dots.values()) == [2, 3]
  kinds = {len(i["dims"]): xla_profile.kind_of(i, comps) for i in dots.values()}
  assert kinds == {2: None, 3: "batched_dot"}   # rank-2 dots' events are dispatch only
  assert xla_profile.dot_flops(instrs, batched=False) == 2 * 64 * 96 * 80
  assert xla_profile.dot_flops(instrs, batched=False, standalone_only=True) == 2 * 64 * 96 * 80
  assert xla_profile.dot_flops(instrs, batched=True) == 2 * 6 * 40 * 48 * 16
  by_kind = {xla_profile.kind_of(i, comps) for i in instrs.values()
             if i["opcode"] not in ("parameter", "constant")}
  assert {"reduce", "elementwise"} <= by_kind


def test_a_traced_call_is_summarized_per_step(tmp_path):
  compiled, args = _program(FAST)
  expected = compiled(*args)
  out, prof = xla_profile.profile_call(lambda: compiled(*args), compiled.as_text(), steps=2,
                                       trace_dir=str(tmp_path))
  np.testing.assert_array_equal(out[1], expected[1])     # the traced call is the real call
  assert list(tmp_path.rglob("*.xplane.pb"))
  assert set(prof["by_kind_s"]) == set(xla_profile.KINDS)
  assert prof["by_kind_s"]["batched_dot"] > 0 and prof["by_kind_s"]["reduce"] > 0
  assert prof["steps"] == 2 and prof["wall_s"] > 0
  assert prof["unattributed_s"] == pytest.approx(prof["wall_s"] - sum(prof["by_kind_s"].values()))
  assert {op["kind"] for op in prof["largest_ops"]} <= set(xla_profile.KINDS)
  assert prof["dense_dot_gflops_per_s_lower_bound"] > 0


def test_library_fusions_count_their_dots_inside_their_events(tmp_path):
  """XLA's default CPU flags put both dots in YNNPACK fusions: each runs inside its own event,
  so none is left to the unattributed remainder."""
  compiled, args = _program()
  instrs, comps = xla_profile.parse_hlo(compiled.as_text())
  kinds = {xla_profile.kind_of(i, comps) for i in instrs.values() if i["opcode"] == "fusion"}
  if "dot_fusion" not in kinds:
    pytest.skip("this jaxlib does not fuse the plain dot into a library fusion by default")
  assert "batched_dot" in kinds
  assert xla_profile.dot_flops(instrs, batched=False, standalone_only=True) == 0
  _, prof = xla_profile.profile_call(lambda: compiled(*args), compiled.as_text(), steps=1,
                                     trace_dir=str(tmp_path))
  assert prof["by_kind_s"]["dot_fusion"] > 0 and prof["by_kind_s"]["batched_dot"] > 0
  assert prof["standalone_dense_dot_flops"] == 0

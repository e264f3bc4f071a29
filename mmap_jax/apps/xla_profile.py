"""Where a compiled XLA:CPU program's time goes, read from a JAX profiler trace of its calls.

Why: the train step reaches ~65% of the matmul probe while its large dense products run near the
probe alone, so the rest of the time has to be found op by op. XLA:CPU records one trace event
per executed thunk, named after its HLO instruction; this joins those events with the program's
optimised HLO (opcode, output shape, what a fusion computes) and sums them by kind.

One caveat shapes the output: a plain (rank-2) dot's own thunk only dispatches Eigen's
contraction to the intra-op pool, so its event covers the dispatch, not the work. Those dots'
time is therefore not in `by_kind_s`; it is in `unattributed_s` (wall time minus every
attributed event: the dense products' work plus idle and dispatch gaps), and
`dense_dot_gflops_per_s_lower_bound` is their FLOPs over that remainder. Dots inside library
fusions (YNNPACK, when its fusions are on) run inside their event and count as `dot_fusion`.
Thunks that run concurrently on the two threads are each counted in full, so the kinds can
overlap each other a little.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Any, Callable, Optional

import jax

# HLO text: `%name = f32[a,b]{1,0} opcode(...)` (ROOT optional; tuples are not matched).
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([0-9,]*)\]\S*\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_OPERAND = re.compile(r"\s*%?([\w.\-]+)")
CONTAINERS = frozenset({"while", "call", "conditional", "async-start", "async-done"})
MOVEMENT = frozenset({"parameter", "bitcast", "broadcast", "transpose", "copy", "concatenate",
                      "slice", "dynamic-slice", "dynamic-update-slice", "reshape", "pad",
                      "constant", "iota", "tuple", "get-tuple-element", "reverse"})
KINDS = ("batched_dot", "dot_fusion", "elementwise", "reduce", "data_movement", "other")


def parse_hlo(hlo_text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
  """(instruction name -> {opcode, dims, calls, contracted, lhs, computation},
  computation -> its opcodes, with a fusion's dots as "dot" / "batched-dot" by output rank)."""
  instrs: dict[str, dict[str, Any]] = {}
  comps: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, dims, opcode, rest = m.groups()
    calls = _CALLS.search(rest)
    contract = _CONTRACT.search(rest)
    operand = _OPERAND.match(rest)
    instrs[name] = {"opcode": opcode, "dims": [int(d) for d in dims.split(",") if d],
                    "calls": calls.group(1) if calls else None,
                    "contracted": [int(c) for c in contract.group(1).split(",") if c]
                    if contract else [], "lhs": operand.group(1) if operand else None,
                    "computation": current}
    if current is not None:
      comps[current].append("batched-dot" if opcode == "dot" and len(instrs[name]["dims"]) > 2
                            else opcode)
  return instrs, dict(comps)


def kind_of(instr: dict[str, Any], comps: dict[str, list[str]]) -> Optional[str]:
  """The kind an executed thunk counts under; None for containers and rank-2 dots (see module)."""
  opcode = instr["opcode"]
  if opcode in CONTAINERS:
    return None
  if opcode == "dot":
    return "batched_dot" if len(instr["dims"]) > 2 else None
  body = comps.get(instr["calls"] or "", [opcode]) if opcode == "fusion" else [opcode]
  if "batched-dot" in body:
    return "batched_dot"
  if "dot" in body:
    return "dot_fusion"
  if any(op in ("reduce", "reduce-window") for op in body):
    return "reduce"
  if all(op in MOVEMENT for op in body):
    return "data_movement"
  if opcode in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "select",
                "maximum", "minimum", "negate", "convert", "rsqrt", "tanh", "logistic"):
    return "elementwise"
  return "other"


def dot_flops(instrs: dict[str, dict[str, Any]], batched: bool,
              standalone_only: bool = False) -> float:
  """2 x output elements x contracted size, summed over the program's plain or batched dots
  (`standalone_only`: only dots that are thunks of their own, not inside a fusion). A loop's body
  is counted once: for a scan over K steps, one step's."""
  fused = {i["calls"] for i in instrs.values() if i["opcode"] == "fusion" and i["calls"]}
  total = 0.0
  for ins in instrs.values():
    if ins["opcode"] != "dot" or (len(ins["dims"]) > 2) != batched:
      continue
    if standalone_only and ins["computation"] in fused:
      continue
    lhs = instrs.get(ins["lhs"] or "")
    if lhs is None:
      continue
    n = 2.0
    for d in ins["dims"]:
      n *= d
    for c in ins["contracted"]:
      n *= lhs["dims"][c]
    total += n
  return total


def summarize_trace(xplane_path: str, hlo_text: str, wall_s: float, steps: int,
                    top: int = 25) -> dict[str, Any]:
  """Per-step seconds by kind, the largest ops, and the dense dots' remainder (see module)."""
  instrs, comps = parse_hlo(hlo_text)
  by_name: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  data = jax.profiler.ProfileData.from_file(xplane_path)
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in instrs:
          by_name[ev.name] += ev.duration_ns * 1e-9
          counts[ev.name] += 1
  kinds = {name: kind_of(instrs[name], comps) for name in by_name}
  by_kind = {k: 0.0 for k in KINDS}
  for name, s in by_name.items():
    if kinds[name] is not None:
      by_kind[kinds[name]] += s
  attributed = sum(by_kind.values())
  dense_flops = dot_flops(instrs, batched=False, standalone_only=True)
  per = lambda s: s / steps
  remainder = max(wall_s - attributed, 1e-12)
  largest = sorted(((s, n) for n, s in by_name.items() if kinds[n]), reverse=True)[:top]
  return {
      "steps": steps, "wall_s": per(wall_s),
      "by_kind_s": {k: per(v) for k, v in by_kind.items()},
      "unattributed_s": per(wall_s - attributed),
      "batched_dot_flops": dot_flops(instrs, batched=True),
      "dense_dot_flops": dot_flops(instrs, batched=False),
      "standalone_dense_dot_flops": dense_flops,
      "dense_dot_gflops_per_s_lower_bound": dense_flops / per(remainder) / 1e9,
      "largest_ops": [{"name": n, "kind": kinds[n], "shape": instrs[n]["dims"],
                       "s": round(per(s), 5), "events": counts[n]} for s, n in largest],
      "note": ("per-step seconds from one traced call; rank-2 dots' work is in unattributed_s "
               "(their thunk events cover only the dispatch); concurrent thunks each count"),
  }


def profile_call(call: Callable[[], Any], hlo_text: str, steps: int,
                 trace_dir: Optional[str] = None) -> tuple[Any, dict[str, Any]]:
  """Traces one `call()` (compiled and warm; `steps` train steps in it): (its output, summary)."""
  with tempfile.TemporaryDirectory() as tmp:
    where = trace_dir or tmp
    jax.profiler.start_trace(where)
    try:
      t0 = time.perf_counter()
      out = jax.block_until_ready(call())
      wall = time.perf_counter() - t0
    finally:
      jax.profiler.stop_trace()
    found = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not found:
      raise RuntimeError(f"the profiler wrote no *.xplane.pb under {where}")
    return out, summarize_trace(found[-1], hlo_text, wall, steps)

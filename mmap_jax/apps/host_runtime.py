"""Process-level host settings that must be in place before JAX starts: allocator and XLA flags.

Why an allocator: XLA:CPU allocates each execution's temporary buffer afresh (3.96 GB for the
benchmark's ViT-B/16 train step: the JSON's `train_step.temp_bytes`). glibc serves allocations
above 32 MiB with mmap and returns them with munmap, so every step faults in fresh 4 KiB pages. `bash benchmarks/allocators.sh`
on the 2-core dev VM: glibc 1.08M faults and 18.15 s per step, tcmalloc (gperftools, default
settings) 8.2 thousand faults and 13.44 s, same arithmetic. The allocator is chosen when the
process is loaded, so `reexec_with_tcmalloc` re-executes the launcher once with LD_PRELOAD set.
It changes no arithmetic, so it is on by default for the launchers; opt out with
MMAP_JAX_ALLOCATOR=system. TPU VM images usually preload tcmalloc already (then nothing
happens). The cost: a retaining allocator can split the freed temporary span, and peak RSS then
holds two of them (9.2 GiB instead of 5.2-5.7 GiB on that step; WORKSPACE.md, Performance).
Also measured there and not used: TCMALLOC_RELEASE_RATE=0, jemalloc without decay.

Why XLA flags: `CPU_FAST_XLA_FLAGS` make XLA:CPU run the attention's small batched products with
its own dots instead of YNNPACK's fusions: 1.14x faster on the benchmark step, same loss
(`python3 benchmarks/xla_cpu_dots.py`, results/xla_cpu_dots.json). They change float rounding (a different matmul kernel), so they are applied
where the result is a timing (launch.benchmark) and are opt-in for training runs, whose
committed accuracies must stay reproducible: export XLA_FLAGS yourself to use them.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

# XLA:CPU: no YNNPACK library fusions (XLA's Eigen dots and loop fusions instead). Only the CPU
# backend reads it. benchmarks/xla_cpu_dots.py (same process, interleaved runs, tcmalloc):
# 14.21 s vs 16.17 s median per benchmark step, identical loss.
CPU_FAST_XLA_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)

ALLOCATOR_ENV = "MMAP_JAX_ALLOCATOR"          # "system": keep the process's allocator
TCMALLOC_ENV = "MMAP_JAX_TCMALLOC"            # an explicit path to libtcmalloc*.so
REEXEC_MARK = "MMAP_JAX_REEXECED"             # set in the child: never re-exec twice
TCMALLOC_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",   # Debian/Ubuntu: libtcmalloc-minimal4
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",                  # Fedora/RHEL: gperftools-libs
    "/usr/lib64/libtcmalloc.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc.so.4",
)


def apply_xla_flags(flags: Sequence[str], environ: Optional[MutableMapping[str, str]] = None
                    ) -> list[str]:
  """Append `flags` to $XLA_FLAGS, except those whose name the user already set; the added ones.

  Must run before the XLA backend initialises (the first jax.devices() or computation).
  """
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  present = {f.split("=")[0] for f in current.split()}
  added = [f for f in flags if f.split("=")[0] not in present]
  if added:
    environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def find_tcmalloc(environ: Optional[Mapping[str, str]] = None,
                  candidates: Sequence[str] = TCMALLOC_GLOBS) -> Optional[str]:
  """The tcmalloc shared library to preload: $MMAP_JAX_TCMALLOC, else the first candidate found.

  An explicit path that does not exist is an error (it names the variable), not a silent skip.
  """
  environ = os.environ if environ is None else environ
  explicit = environ.get(TCMALLOC_ENV)
  if explicit:
    if not os.path.isfile(explicit):
      raise FileNotFoundError(f"${TCMALLOC_ENV}={explicit!r}: no such file")
    return explicit
  for pattern in candidates:
    for path in sorted(glob.glob(pattern)):
      if os.path.isfile(path):
        return path
  return None


def allocator_env(environ: Mapping[str, str], library: Optional[str]) -> Optional[dict[str, str]]:
  """The environment to re-exec with (tcmalloc preloaded), or None: nothing to do.

  Nothing to do: no library, opted out ($MMAP_JAX_ALLOCATOR=system), already re-executed, or
  tcmalloc already preloaded (as on TPU VM images).
  """
  choice = environ.get(ALLOCATOR_ENV, "tcmalloc")
  if choice not in ("tcmalloc", "system"):
    raise ValueError(f"${ALLOCATOR_ENV}={choice!r}: expected 'tcmalloc' or 'system'")
  if library is None or sys.platform != "linux":
    return None
  preload = environ.get("LD_PRELOAD", "")
  if choice == "system" or environ.get(REEXEC_MARK) or "tcmalloc" in preload:
    return None
  env = dict(environ)
  env["LD_PRELOAD"] = " ".join(p for p in (library, preload) if p)
  env[REEXEC_MARK] = "1"
  return env


def reexec_with_tcmalloc(argv: Optional[Sequence[str]] = None,
                         environ: Optional[Mapping[str, str]] = None,
                         candidates: Sequence[str] = TCMALLOC_GLOBS) -> None:
  """Re-execute this Python process with tcmalloc preloaded, when `allocator_env` says so.

  Call it first thing in a launcher's `__main__` (before JAX or any thread starts). Returns
  only when nothing is to be done; otherwise the process image is replaced (same argv).
  """
  environ = os.environ if environ is None else environ
  env = allocator_env(environ, find_tcmalloc(environ, candidates))
  if env is None:
    return
  argv = list(sys.orig_argv if argv is None else argv)
  print(f"[mmap_jax] re-executing with LD_PRELOAD={env['LD_PRELOAD']} (set {ALLOCATOR_ENV}=system to keep the system allocator)", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)


def allocator_in_use(environ: Optional[Mapping[str, str]] = None) -> str:
  """What the benchmark records: the preloaded allocator library, or 'system'."""
  environ = os.environ if environ is None else environ
  preload = [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if "malloc" in p]
  return preload[0] if preload else "system"

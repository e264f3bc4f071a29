"""Process-level host settings that must be in place before JAX starts: allocator and XLA flags.

Why an allocator (opt-in, CPU hosts only): XLA:CPU allocates each execution's temporary buffer
afresh (3.96 GB for the benchmark's ViT-B/16 train step). glibc serves allocations above 32 MiB
with mmap and returns them with munmap, so every step faults in fresh pages (the faults cost the
step 2-7%: WORKSPACE.md, Performance). `MMAP_JAX_ALLOCATOR` chooses a cure, applied when the
process is loaded, so `reexec_with_allocator` re-executes the launcher once:
- `tcmalloc`: gperftools' tcmalloc (a system package) preloaded with LD_PRELOAD, pages reused;
- `glibc`: glibc itself tuned by `GLIBC_TUNABLES` (no package): `hugetlb=1` backs malloc with
  transparent huge pages, `mmap_max=0` + a 64 GiB `trim_threshold` keep freed temporaries in
  the heap for the next call instead of returning them to the kernel.
Unset (or `system`), the default, leaves the process alone: a retaining allocator keeps every
freed byte resident (grain's worker processes inherit it too), and a launcher should behave as
an `import` or a notebook does. It is never applied when JAX will not run on the CPU
(`JAX_PLATFORMS` names another platform, or a GPU / TPU device node exists): the temporaries
then live in device memory. Neither cure changes arithmetic.

Why XLA flags: `CPU_FAST_XLA_FLAGS` make XLA:CPU (1) run the attention's small batched products
with its own dots instead of YNNPACK's fusions and (2) skip the tree-reduction rewrite, which
turns every reduction over more than 32 elements (LayerNorm's 768 features, softmax's 213 keys)
into an unfused reduce-window kernel. Each was measured alone and together in one process
(1.28x and 1.31x together; the script and its JSON are in git history:
`git show 076d4cf:benchmarks/results/xla_cpu_dots_2026-12-03.json`).
They change float rounding (another matmul kernel; sequential instead of 32-wide partial sums:
loss 4.1902475 vs 4.190248 there), so they are applied where the result is a
timing (launch.benchmark) and are opt-in for training runs, whose committed accuracies must stay
reproducible: export XLA_FLAGS yourself to use them. Both are CPU compiler passes; GPU and TPU
compilers do not read them.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

# XLA:CPU: no YNNPACK library fusions (XLA's Eigen dots and loop fusions instead), and no
# tree-reduction rewrite (reductions stay fusible). Evidence: the module docstring.
CPU_FAST_XLA_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",
                                       "--xla_disable_hlo_passes=tree_reduction_rewriter")

ALLOCATOR_ENV = "MMAP_JAX_ALLOCATOR"          # unset / "system" (default): allocator untouched
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


ALLOCATOR_CHOICES = ("tcmalloc", "glibc", "system")
GLIBC_TUNABLES_ENV = "GLIBC_TUNABLES"
# glibc malloc tuned for XLA:CPU's per-call temporaries (see the module docstring).
GLIBC_TUNED = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0",
               "glibc.malloc.trim_threshold=68719476736")


def glibc_tunables(current: str) -> str:
  """`current` ($GLIBC_TUNABLES, colon separated) plus GLIBC_TUNED, never overriding a tunable
  the user already set."""
  present = {kv.split("=")[0] for kv in current.split(":") if kv}
  return ":".join([kv for kv in current.split(":") if kv]
                  + [kv for kv in GLIBC_TUNED if kv.split("=")[0] not in present])


# Device nodes of an accelerator JAX would use instead of the CPU: NVIDIA GPUs, TPU v4+ (accel),
# TPU v5e+ / v6 (vfio).
ACCELERATOR_DEVICE_GLOBS = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def runs_on_cpu(environ: Mapping[str, str],
                device_globs: Sequence[str] = ACCELERATOR_DEVICE_GLOBS) -> bool:
  """Whether JAX will compute on the CPU, decided before JAX starts: `JAX_PLATFORMS` when set
  (every entry 'cpu'), else no GPU / TPU device node on the host."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  return not any(glob.glob(g) for g in device_globs)


def allocator_choice(environ: Mapping[str, str]) -> str:
  """$MMAP_JAX_ALLOCATOR, checked: 'system' (the default: unset or empty), 'tcmalloc', 'glibc'."""
  choice = environ.get(ALLOCATOR_ENV) or "system"
  if choice not in ALLOCATOR_CHOICES:
    raise ValueError(f"${ALLOCATOR_ENV}={choice!r}: expected one of {ALLOCATOR_CHOICES} "
                     "(unset: the system allocator, untouched)")
  return choice


def allocator_env(environ: Mapping[str, str], library: Optional[str], *,
                  on_cpu: bool = True) -> Optional[dict[str, str]]:
  """The environment to re-exec with (tcmalloc preloaded, or glibc tuned), or None: nothing to do.

  Nothing to do: not opted in ($MMAP_JAX_ALLOCATOR unset or 'system'), not Linux, JAX not on
  the CPU (`on_cpu`), already re-executed, tcmalloc already preloaded (as on TPU VM images), or
  every tunable already set. Asking for tcmalloc where `library` is None is an error.
  """
  choice = allocator_choice(environ)
  preload = environ.get("LD_PRELOAD", "")
  if (choice == "system" or sys.platform != "linux" or not on_cpu
      or environ.get(REEXEC_MARK) or "tcmalloc" in preload):
    return None
  env = dict(environ)
  env[REEXEC_MARK] = "1"
  if choice == "tcmalloc":
    if library is None:
      raise FileNotFoundError(
          f"${ALLOCATOR_ENV}=tcmalloc but no libtcmalloc is installed (apt install "
          f"libtcmalloc-minimal4, or set ${TCMALLOC_ENV}=/path/to/libtcmalloc.so, or use "
          f"{ALLOCATOR_ENV}=glibc)")
    env["LD_PRELOAD"] = " ".join(p for p in (library, preload) if p)
    return env
  current = environ.get(GLIBC_TUNABLES_ENV, "")
  tuned = glibc_tunables(current)
  if tuned == current:   # the user set all of them already
    return None
  env[GLIBC_TUNABLES_ENV] = tuned
  return env


def reexec_with_allocator(argv: Optional[Sequence[str]] = None,
                          environ: Optional[Mapping[str, str]] = None,
                          candidates: Sequence[str] = TCMALLOC_GLOBS,
                          device_globs: Sequence[str] = ACCELERATOR_DEVICE_GLOBS) -> None:
  """Re-execute this Python process with tcmalloc preloaded or glibc tuned, when
  $MMAP_JAX_ALLOCATOR asks for it and `allocator_env` says so.

  Call it first thing in a launcher's `__main__` (before JAX or any thread starts). Returns
  when nothing is to be done (the default); otherwise the process image is replaced (same argv).
  """
  environ = os.environ if environ is None else environ
  choice = allocator_choice(environ)
  if choice == "system":
    return
  on_cpu = runs_on_cpu(environ, device_globs)
  if not on_cpu:
    print(f"[mmap_jax] {ALLOCATOR_ENV}={choice} ignored: JAX does not run on the CPU here",
          file=sys.stderr, flush=True)
  library = find_tcmalloc(environ, candidates) if choice == "tcmalloc" else None
  env = allocator_env(environ, library, on_cpu=on_cpu)
  if env is None:
    return
  argv = list(sys.orig_argv if argv is None else argv)
  what = (f"LD_PRELOAD={env['LD_PRELOAD']}" if env.get("LD_PRELOAD") != environ.get("LD_PRELOAD")
          else f"{GLIBC_TUNABLES_ENV}={env[GLIBC_TUNABLES_ENV]}")
  print(f"[mmap_jax] {ALLOCATOR_ENV}={choice}: re-executing with {what}", file=sys.stderr,
        flush=True)
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)


def allocator_in_use(environ: Optional[Mapping[str, str]] = None) -> str:
  """What the benchmark records: the preloaded allocator library, 'glibc (GLIBC_TUNABLES=...)'
  when glibc malloc is tuned, or 'system'."""
  environ = os.environ if environ is None else environ
  preload = [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if "malloc" in p]
  if preload:
    return preload[0]
  tunables = environ.get(GLIBC_TUNABLES_ENV, "")
  if "glibc.malloc." in tunables:
    return f"glibc ({GLIBC_TUNABLES_ENV}={tunables})"
  return "system"

"""On the CPU backend, each step's scratch memory is reused by the process instead of mapped afresh.

XLA's CPU executable allocates its scratch buffer (157 MB for the demo's train step, gigabytes for
smolvlm_256m's) at every execution. jax runs CPU executions on a pool thread by default, and glibc's
malloc serves a pool thread's allocations above 64 MB with a fresh `mmap`, returned with `munmap` when
freed: every step then faults in and zeroes every page of that buffer again (40,000 page faults a demo
step). Two settings together make the memory stay:

- `prepare()`, before jax starts its backends: CPU executions run on the calling thread
  (`jax_cpu_enable_async_dispatch` off), so the buffer comes from the main thread's malloc arena;
- `retain(platform)`, once the platform is known to be the CPU: glibc's `mallopt` stops that arena
  from serving large allocations with `mmap` and from trimming freed memory back to the kernel, so the
  next step's buffer is the last step's memory. The trainer then also waits for each batch's copy to the
  device before starting the step (`retained()`): a step whose inputs are not ready yet would start on a
  pool thread after all.

The demo's step runs 1.2x as fast and smolvlm_256m's 1.21x (BENCHMARKS.md, "The step's scratch memory
kept"); the process's peak resident memory is unchanged, and it no longer shrinks after the peak. Either
setting alone gains nothing (the first alone is slower), so `prepare` does nothing where the second cannot
follow (a C library without glibc's `mallopt`). Accelerators' runs are untouched: the setting of
`prepare` concerns the CPU client only, and `retain` does nothing on other platforms. The main job,
`python -m pixrec_jax.compare` and `bench/train_step.py` apply both unless the config sets
`cpu.reuse_step_memory=False`; code that calls `run.setup` itself applies them by calling `prepare` first.
"""

from __future__ import annotations

import ctypes
import functools

import jax
from jax._src import xla_bridge  # backends_are_initialized: jax has no public form of it

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt(3): -1 disables trimming (2 GiB, an int's largest threshold, let smolvlm_256m's buffer go back).
TRIM_THRESHOLD = -1


@functools.cache
def _mallopt():
  """glibc's mallopt, or None under another C library."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only
    fn = libc.mallopt
  except (OSError, AttributeError):
    return None
  fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return fn


_prepared = False
_retained = False


def prepare(enabled: bool = True) -> bool:
  """Before jax starts its backends: CPU executions on the calling thread. Returns whether it applied: not
  when disabled, where `retain` could not follow, or once jax's backends exist (the CPU client reads the
  setting when it is made; entry points call this first, and a process that started jax earlier, such as
  a test session, keeps its settings)."""
  global _prepared
  if not enabled or _mallopt() is None or xla_bridge.backends_are_initialized():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _prepared = True
  return True


def retain(platform: str) -> bool:
  """On the CPU platform, after `prepare` applied: malloc keeps large and freed memory in its heap.
  Returns whether it applied."""
  mallopt = _mallopt()
  if not _prepared or platform != "cpu" or mallopt is None:
    return False
  global _retained
  _retained = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
  return _retained


def retained() -> bool:
  """Whether `retain` applied in this process."""
  return _retained

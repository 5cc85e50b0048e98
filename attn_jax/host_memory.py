"""Host memory reuse for XLA:CPU programs on glibc (Linux).

XLA:CPU allocates each execution's temporaries as one block and frees it when the call
ends. glibc serves a block above 32 MiB (its largest automatic mmap threshold) with a fresh
``mmap`` every time, and its per-thread arenas trim freed memory back to the kernel, so
every call page-faults its scratch in again. On this machine a blocked-attention gradient
at T = 8192 (4 heads, block-sparse 1/32, one pinned core) took 8452 page faults and
18-22 ms of system time per 112-118 ms call; with the heap kept it takes no faults and
98-102 ms. Short calls (sparse attention, small training steps) pay the most.

``keep_freed_memory()`` sets glibc to one arena, no mmap'd chunks and no trimming, so
freed blocks stay mapped and are reused. The cost is that the process keeps its peak heap
(memory freed by the program is not returned to the system). Call it before JAX starts
its threads (before the first computation); it changes nothing on other C libraries.
"""

import ctypes
import platform

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
  """Makes glibc keep and reuse freed memory (module doc). Returns True when applied (or
  already applied), False where the C library is not glibc or refused a setting."""
  global _applied
  if _applied:
    return True
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  # One arena: threads created later (XLA's) share the main heap instead of trimmed ones.
  # No mmap'd chunks: large blocks come from the heap. No trimming: freed memory stays.
  ok = all(
    libc.mallopt(param, value) == 1
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
  )
  _applied = ok
  return ok

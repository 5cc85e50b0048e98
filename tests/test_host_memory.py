"""attn_jax.host_memory: freed blocks above glibc's mmap threshold are reused, not faulted in
again (checked in fresh processes: the setting is process-wide, and the test run keeps
glibc's defaults)."""

import platform
import subprocess
import sys

import pytest

from attn_jax import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, touches and frees a 48 MiB block (above glibc's 32 MiB mmap ceiling) a few
# times; prints the page faults of the last rounds per round.
_PROBE = """
import ctypes, resource, sys
if sys.argv[1] == "keep":
  from attn_jax import host_memory
  assert host_memory.keep_freed_memory() and host_memory.keep_freed_memory()  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_():
  size = 48 << 20
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)  # touch every page
  libc.free(p)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  round_()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _faults_per_round(mode):
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True
  )
  return float(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
  pages = (48 << 20) // 4096
  default = _faults_per_round("default")
  kept = _faults_per_round("keep")
  assert default > 0.9 * pages, default  # glibc maps the block afresh every round
  assert kept < 0.05 * pages, kept  # the freed block is reused in place


@pytest.mark.skipif(GLIBC, reason="the setting is process-wide: not applied to the test run")
def test_reports_false_without_glibc():
  assert host_memory.keep_freed_memory() is False

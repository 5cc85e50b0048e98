"""Test set-up: float64 oracles, several CPU devices for mesh tests, jaxtyping checks on.

Runtime shape checking (jaxtyping + beartype, see pyproject.toml addopts) covers the oracle
and the blocked path; the API front door and masks are left unhooked so the bad-input tests
see the ValueError a user sees, raised by attn_jax's own validation.
"""

import os
import zlib

# Must be set before jax initialises its backends. The suite is bound by XLA:CPU compile
# time (hundreds of small programs, each run a few times): skipping LLVM's expensive
# optimisation passes about halves it and leaves the semantics of every op unchanged; the
# tolerances against the float64 oracles are the same either way.
TEST_XLA_FLAGS = (
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
  "--xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The oracle runs in float64 against float32 fast paths (DESIGN.md: every family has an oracle).
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng(request):
  """A fresh PRNG key per test, derived from the test's name (reproducible, never zeros)."""
  seed = zlib.crc32(request.node.nodeid.encode())
  return jax.random.key(seed)


def normal(key, shape, dtype):
  return jax.random.normal(key, shape, np.float32).astype(dtype)


@pytest.fixture(params=["heads_first", "natural"])
def both_xla_layouts(request, monkeypatch):
  """Runs a test once per layout of the blocked xla path's forward without gradient:
  re-laid by heads (long tile lists) and the natural [B, T, heads, H] layout (short
  lists). The gradient path works by heads in both."""
  from attn_jax.attention import xla

  natural = request.param == "natural"
  monkeypatch.setattr(xla, "NATURAL_LAYOUT_MEAN_TILES", float("inf") if natural else -1)
  return request.param

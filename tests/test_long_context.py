"""Slow: 131,072-token causal attention forward + backward fits this machine (make test-slow).

Runs experiments/long_context.py in a subprocess (about 15 minutes on 2 cores) and checks
its record: finite results, rows equal to the float64 oracle, peak memory under 24 GB.
ATTN_JAX_LONG_T overrides the length for a quick look.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_long_context_forward_backward_fits_in_memory(tmp_path):
  seq_len = int(os.environ.get("ATTN_JAX_LONG_T", "131072"))
  out = tmp_path / "long_context.json"
  script = os.path.join(ROOT, "experiments", "long_context.py")
  subprocess.run(
    [sys.executable, script, "--seq-len", str(seq_len), "--out", str(out)], check=True, cwd=ROOT
  )
  record = json.loads(out.read_text())
  assert record["T"] == seq_len and record["all_finite"]
  assert max(record["errors_vs_oracle"].values()) < 1e-5
  assert record["peak_rss_mib"] < 24 * 1024

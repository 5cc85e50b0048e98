"""Experiment scripts' own logic: the algorithmic-task targets (positional_tasks) against
brute force, the out-of-distribution range rule, smoke runs of bench_sparse.py,
bench_linear.py and device_check.py (interpret mode), recall_state.py's state sizes,
mqar_heads.py's rows, and (slow) two-step smoke runs of positional_tasks.py and
diff_attention_maps.py."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import bench_attention  # noqa: E402
import bench_linear  # noqa: E402
import bench_sparse  # noqa: E402
import device_check  # noqa: E402
import diff_attention_maps  # noqa: E402
import mqar_heads  # noqa: E402
import positional_tasks as pt  # noqa: E402
import recall_state  # noqa: E402


def test_task_targets_equal_brute_force():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 8))
  for i in range(8):
    prefix = x[:, : i + 1]
    np.testing.assert_allclose(pt.TASKS["median"](x)[:, i], np.median(prefix, axis=1))
    best = np.full(20, -np.inf)
    for a, b in itertools.combinations_with_replacement(range(i + 1), 2):
      best = np.maximum(best, x[:, a : b + 1].sum(1))
    np.testing.assert_allclose(pt.TASKS["max_subarray"](x)[:, i], best)
    np.testing.assert_allclose(pt.TASKS["sum"](x)[:, i], prefix.sum(1))
    np.testing.assert_allclose(pt.TASKS["min"](x)[:, i], prefix.min(1))
  np.testing.assert_allclose(pt.TASKS["sort"](x), np.sort(x, axis=1))


def test_ranges_and_splits():
  rng = np.random.default_rng(1)
  lo, hi = pt.sample_ranges(rng, 500, 10.0, reject_inside=2.0)
  assert np.all(lo <= hi) and np.all(lo >= -10) and np.all(hi <= 10)
  assert not np.any((lo >= -2) & (hi <= 2))  # no OOD range lies inside the training one
  x, y = pt.make_split(rng, "sort", 50, 2.0, ood=False)
  assert x.shape == (50, 9, 1) and y.shape == (50, 8) and np.all(x[:, 8] == 0)
  assert np.all(np.abs(x) <= 2)


@pytest.mark.slow  # trains six small models (~30 s); make test-slow
def test_scripts_run_and_write_tables(tmp_path):
  rows = pt.main(
    [
      "--tasks=min",
      "--steps=2",
      "--num_train=64",
      "--batch=32",
      "--num_test=16",
      f"--out={tmp_path / 'pt'}",
    ]
  )
  assert [r["model"] for r in rows] == ["standard", "positional"]
  saved = json.loads((tmp_path / "pt.json").read_text())
  assert len(saved["rows"]) == 2 and "ood [-20,20]" in saved["rows"][0]["mse"]
  diff_attention_maps.main(
    ["--max_steps=2", "--eval_every=1", "--num_test=8", "--batch=8", f"--out={tmp_path / 'dm'}"]
  )
  res = json.loads((tmp_path / "dm.json").read_text())["results"]
  assert set(res) == {"mha", "diff_attn"}
  assert 0 <= res["diff_attn"]["signal_share_best_head"] <= 1
  assert (tmp_path / "dm.png").stat().st_size > 0


def test_bench_sparse_runs_and_counts_tiles(tmp_path):
  rows = bench_sparse.main(
    [
      "--ts=256",
      "--densities=4",
      "--block=64",
      "--reps=1",
      "--patterns=sliding_window,block_sparse",
      f"--out={tmp_path / 'bs'}",
    ]
  )
  assert [r["pattern"] for r in rows] == ["sliding_window", "block_sparse"]
  assert all(r["ideal_speedup"] >= 1 and r["fwd_s"] > 0 for r in rows)
  assert rows[0]["causal_tiles"] == 10  # 4 q blocks: 1 + 2 + 3 + 4 causal tiles
  assert (tmp_path / "bs.md").exists()
  # Heads split over 2 of the test session's host devices, MoBA included.
  split = bench_sparse.main(
    [
      "--ts=256",
      "--densities=4",
      "--block=64",
      "--reps=1",
      "--patterns=sliding_window,moba",
      "--cpu_devices=2",
      f"--out={tmp_path / 'bs2'}",
    ]
  )
  assert split[0]["tiles"] == rows[0]["tiles"]  # the same window, split or not
  assert all(r["fwd_s"] > 0 and r["dense_fwd_bwd_s"] > 0 for r in split)
  assert "split into 2 devices" in (tmp_path / "bs2.md").read_text()


def test_bench_sparse_kernel_path_runs(tmp_path):
  """The script's kernel path (run on a TPU / GPU with pallas_tpu / pallas_gpu), here with
  the TPU kernels simulated: dense causal on the flash kernel, the window and the random
  pattern on the block-sparse kernel, counted at the benchmark's block."""
  rows = bench_sparse.main(
    [
      "--ts=256",
      "--densities=4",
      "--block=128",
      "--reps=1",
      "--patterns=sliding_window,block_sparse",
      "--implementation=pallas_interpret",
      f"--out={tmp_path / 'bk'}",
    ]
  )
  assert [r["pattern"] for r in rows] == ["sliding_window", "block_sparse"]
  assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["causal_tiles"] == 3 for r in rows)
  assert "implementation pallas_interpret" in (tmp_path / "bk.md").read_text()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin two workers")
def test_device_check_runs_in_interpret_mode(tmp_path):
  """The device run, with the kernels interpreted on tiny shapes: every correctness case
  passes against its float64 oracle, and both timing sections write their rows."""
  result = device_check.main(
    ["--interpret", "--quick", "--backend=tpu", "--dtype=float32", f"--out={tmp_path}"]
  )
  rows = result["correctness"]
  assert len(rows) == 5 and all(r["passed"] for r in rows), rows
  assert all(r["worst"] < 1e-5 for r in rows)
  dense = {r["path"]: r for r in result["dense"]}
  assert set(dense) == {"kernel", "attn_jax xla", "jax.nn xla"}
  assert all(r["fwd"] > 0 and r["fwd+bwd"] > 0 for r in dense.values())
  (sparse,) = result["sparse"]
  assert sparse["density"] == "1/2" and sparse["ideal"] == 1.5 and sparse["fwd ratio"] > 0
  assert [r["tiles"] for r in result["tiles"]] == ["default", "256x256"]
  assert result["tiles"][0]["fwd vs default"] == 1.0
  saved = json.loads((tmp_path / "device_check.json").read_text())
  assert saved["environment"]["interpret"] and len(saved["correctness"]) == 5
  assert "5 of 5 passed" in (tmp_path / "device_check.md").read_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_device_check_lowers_every_kernel_call(tmp_path, platform):
  """--lower: every call of the full device run (correctness cases and timed kernels, at
  their real sizes) lowers for the hardware with a Pallas kernel call in it."""
  result = device_check.main([f"--lower={platform}", f"--out={tmp_path}"])
  rows = [r for name in device_check.SECTIONS for r in result[name]]
  assert len(rows) == 29 and all(r.get("lowered") == platform for r in rows), rows
  assert "29 of 29 calls lowered" in (tmp_path / "device_check.md").read_text()


def test_device_check_records_a_failing_case_and_goes_on(tmp_path, monkeypatch):
  """A case that raises is recorded with its error (not passed) and the others still run
  (lowering only, to be quick); a wrong kernel result fails its tolerance."""

  def broken(*args, **kwargs):
    raise RuntimeError("no kernel")

  monkeypatch.setattr(device_check, "check_block_sparse_lists", broken)
  wrong = device_check.compare(
    "wrong",
    "float32",
    lambda q, k, v: q * 1.001,
    lambda q, k, v: q,
    [np.ones((1, 4, 1, 8))] * 3,
    np.random.default_rng(0),
  )
  assert not wrong["passed"] and abs(wrong["errors"]["out"] - 1e-3) < 1e-5
  result = device_check.main(
    ["--lower=cuda", "--quick", "--sections=correctness", f"--out={tmp_path}"]
  )
  rows = {r["case"]: r for r in result["correctness"]}
  assert "no kernel" in rows["block_sparse_lists"]["error"]
  assert rows["linear_chunk"]["passed"] and rows["delta_chunk"]["passed"]


def test_bench_sparse_pinned_processes_merge_the_slowest(tmp_path):
  """--processes=2: two pinned workers with 4 heads each; a cell's time is the slower one's."""
  rows = bench_sparse.main(
    [
      "--ts=256",
      "--densities=4",
      "--block=64",
      "--reps=1",
      "--patterns=sliding_window,moba",
      "--processes=2",
      f"--out={tmp_path / 'bsp'}",
    ]
  )
  assert [r["pattern"] for r in rows] == ["sliding_window", "moba"]
  for r in rows:
    assert len(r["per_process_ratios"]) == 2
    assert r["fwd_s"] > 0 and r["dense_fwd_bwd_s"] > 0
    rounds = r["fwd_bwd_rounds"]  # one round: its dense time over its batch's mean
    assert r["fwd_bwd_speedup"] == pytest.approx(rounds["dense"][0] / np.mean(rounds["sparse"][0]))
  assert "2 processes each pinned to one core" in (tmp_path / "bsp.md").read_text()
  with pytest.raises(SystemExit, match="dividing N=8"):
    bench_sparse.main(["--ts=256", "--processes=3", f"--out={tmp_path / 'x'}"])


def test_bench_sparse_rounds_merge_per_call_and_pair_each_round():
  """Workers' rounds merge call by call (the slower worker's time); the speedup is the
  median over rounds of dense / mean(batch), not the ratio of the median times."""

  def cell(dense, sparse, tiles):
    return {"causal_tiles": 32, "tiles": tiles, "fwd_ratio": 0, "fwd_bwd_ratio": 0} | {
      f"{kind}_rounds": {"dense": dense, "sparse": sparse} for kind in bench_sparse.KINDS
    }

  a = cell([10.0, 20.0, 12.0], [[1.0, 3.0], [4.0, 4.0], [1.0, 1.0]], tiles=4)
  b = cell([11.0, 18.0, 12.0], [[2.0, 1.0], [5.0, 3.0], [1.5, 1.0]], tiles=8)
  row = bench_sparse.merge_cells([a, b])
  assert row["fwd_rounds"]["dense"] == [11.0, 20.0, 12.0]
  assert row["fwd_rounds"]["sparse"] == [[2.0, 3.0], [5.0, 4.0], [1.5, 1.0]]
  # Per-round speedups 11/2.5 = 4.4, 20/4.5 = 4.44, 12/1.25 = 9.6 -> median 4.44.
  assert row["fwd_speedup"] == pytest.approx(20 / 4.5)
  assert row["dense_fwd_s"] == 12.0 and row["fwd_s"] == 2.5 and row["fwd_batch"] == 2
  assert row["tiles"] == 6.0 and row["ideal_speedup"] == pytest.approx(32 / 6)
  assert row["fwd_ratio"] == pytest.approx(20 / 4.5 / (32 / 6))


def test_bench_attention_per_core_worker_splits_the_cpu(tmp_path):
  """xla_per_core's worker sees one XLA device per core; the ratio columns name it."""
  assert (
    bench_attention.main(
      [
        "--quick",
        "--max-t=512",
        "--reps=1",
        "--implementations=xla,xla_per_core,jax_nn",
        f"--outdir={tmp_path}",
      ]
    )
    == 0
  )
  report = json.loads((tmp_path / "bench_attention.json").read_text())
  rows = {r["impl"]: r for r in report["results"]}
  assert all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in rows.values()), rows
  assert rows["xla"]["devices"] == 1 and rows["xla_per_core"]["devices"] == (os.cpu_count() or 1)
  assert "jax_nn / xla_per_core fwd" in (tmp_path / "bench_attention.md").read_text()


def test_bench_linear_runs_and_finds_the_crossover(tmp_path):
  rows = bench_linear.main(
    [
      "--ts=128,256",
      "--ops=softmax,lightning,delta_rule",
      "--softmax_max=128",
      "--chunk=32",
      "--reps=1",
      f"--out={tmp_path / 'bl'}",
    ]
  )
  assert [(r["op"], r["T"]) for r in rows] == [
    ("softmax", 128),
    ("lightning", 128),
    ("delta_rule", 128),
    ("lightning", 256),
    ("delta_rule", 256),
  ]
  assert all(r["fwd_s"] > 0 and r["fwd_bwd_peak_mb"] > 0 for r in rows)
  saved = json.loads((tmp_path / "bl.json").read_text())
  assert saved["settings"]["complete"] and set(saved["crossover_T"]) == {"lightning", "delta_rule"}
  assert "Crossover" in (tmp_path / "bl.md").read_text()


def test_recall_state_sizes_and_table(tmp_path):
  model = {"num_heads": 1, "num_kv_heads": 1, "d_model": 64, "head_dim": 64}
  size = recall_state.layer_state_bytes
  assert size("mha", model, 64) == 2 * 64 * 64 * 4  # keys and values of 64 tokens
  assert size("sliding_window", {**model, "attention_options": {"window": 8}}, 64) == 2 * 8 * 256
  assert size("linear_attn", model, 64) == 64 * 65 * 4  # z normaliser column
  assert size("delta_rule", model, 4096) == 64 * 64 * 4  # independent of the length
  based = {**model, "attention_options": {"based_dim": 16}}
  assert size("based", based, 64) == (1 + 16 + 256) * 65 * 4
  conv = {**model, "attention_options": {"short_conv": 4}}  # + the last 3 q, k, v rows
  assert size("delta_rule", conv, 64) == 64 * 64 * 4 + 3 * (64 + 64 + 64) * 4
  based_conv = {**model, "attention_options": {"based_dim": 16, "short_conv": 4}}
  assert size("based", based_conv, 64) == (1 + 16 + 256) * 65 * 4 + 3 * (16 + 16 + 64) * 4
  results = os.path.join(ROOT, "experiments", "results")
  rows = recall_state.main(
    [
      f"--inputs={results}/mqar_sparse.json,{results}/mqar_sweep.json",
      f"--out={tmp_path / 'rs'}",
    ]
  )
  by = {r["mechanism"]: r for r in rows}
  assert by["sliding_window:window=8"]["state_bytes"] == 2 * 2 * 8 * 256  # 2 layers
  assert by["mha"]["state_bytes"] == 2 * 2 * 64 * 256
  assert [r["state_bytes"] for r in rows] == sorted(r["state_bytes"] for r in rows)
  assert (tmp_path / "rs.png").stat().st_size > 0


def test_mqar_heads_rows_are_causal_stack_mechanisms():
  """Every row of every family names a registered mechanism the causal decoder can run, with
  options its module declares and a head count that its config argument sets; each (family,
  setting) has its own runs directory."""
  from attn_jax.attention import registry
  from attn_jax.nn import transformer

  for family, rows in mqar_heads.FAMILIES.items():
    for name, (heads_dir, config_arg, _) in rows.items():
      kind, options = mqar_heads.mqar_sweep.parse_mechanism(name)
      mech = registry.get(kind)
      assert mech.causal and "self_causal" in mech.patterns and mech.module, (family, name)
      transformer.check_known_options(options, [kind])
      assert config_arg == f"num_heads={heads_dir[1:].split('k')[0]}", name
  roots = {mqar_heads.runs_root(f, s) for f in mqar_heads.FAMILIES for s in mqar_heads.SETTINGS}
  assert len(roots) == len(mqar_heads.FAMILIES) * len(mqar_heads.SETTINGS)
  with pytest.raises(SystemExit, match="unknown row"):
    mqar_heads.main(["--rows=no_such_row", "--only_finished"])
  with pytest.raises(SystemExit, match="unknown row"):
    mqar_heads.main(["--family=sparse", "--rows=mha", "--only_finished"])


def test_mqar_heads_only_finished_skips_interrupted_runs(tmp_path):
  """--only_finished must not pick up a preempted run (collecting it would resume training)."""
  for status, want in (("preempted", False), ("completed", True), ("early_stopped", True)):
    run = tmp_path / status
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": status}))
    assert (mqar_heads.mqar_sweep.finished_summary(str(run)) is not None) is want
  assert mqar_heads.mqar_sweep.finished_summary(str(tmp_path / "missing")) is None

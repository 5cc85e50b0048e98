"""The trainer, configs, checkpoints and sharding: resume exactness, preemption, bad input,
sharded == single-device, multi-process."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS
from flax import nnx
from jax.sharding import PartitionSpec

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config_lib, data, optim, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/mqar.py:runlocal,seq_len=16,num_pairs=2,d_model=16,num_heads=2"


def tiny(**overrides):
  config = config_lib.load(os.path.join(ROOT, TINY), overrides)
  config.batch_size = overrides.get("batch_size", 8)
  return config


def read_metrics(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def comparable(rows):
  """Metric rows without wall-clock fields, keyed by (step, kind)."""
  out = {}
  for r in rows:
    kind = "eval" if "eval_loss" in r else "train"
    out[(r["step"], kind)] = {k: v for k, v in r.items() if k != "tokens_per_sec"}
  return out


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads_with_runlocal(path):
  config = config_lib.load(f"{path}:runlocal")
  config_lib.validate(config)
  assert config.total_steps <= 100 and config.batch_size <= 64
  model = nnx.eval_shape(lambda: train.build_model(config.model, nnx.Rngs(0)))
  assert jax.tree.leaves(nnx.state(model))


def test_config_argument_parsing():
  c = config_lib.parse_arg("a=3,b=0.5,c,d=x+y,e=mha", a=1, b=1.0, c=False, d="", e="")
  assert (c.a, c.b, c.c, list(c.d), c.e) == (3, 0.5, True, ["x", "y"], "mha")
  with pytest.raises(ValueError, match="unknown config argument 'zz'"):
    config_lib.parse_arg("zz=1", a=1)
  with pytest.raises(ValueError, match="no field 'num_layer'"):
    tiny(**{"model.num_layer": 3})


def test_two_steps_then_resume_continues_at_the_right_step(tmp_path):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny(total_steps=2, log_every=1), workdir, progress=False)
  assert first["step"] == 2 and os.path.exists(f"{workdir}/config.json")
  assert ckpt_lib.Checkpointer(f"{workdir}/checkpoints").latest_step() == 2
  second = train.train_and_evaluate(tiny(total_steps=4, log_every=1), workdir, progress=False)
  assert second["step"] == 4
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == [1, 2, 3, 4]


def subprocess_env(devices: int) -> dict:
  """The environment of a trainer subprocess: ``devices`` host devices, fast compilation."""
  flags = TEST_XLA_FLAGS.replace("device_count=8", f"device_count={devices}")
  return {**os.environ, "XLA_FLAGS": flags}


def _launch(workdir, steps, extra=()):
  cmd = [
    sys.executable,
    "-m",
    "attn_jax.main",
    f"--config={TINY}",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
    "--config.batch_size=8",
    "--config.log_every=1",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    *extra,
  ]
  env = subprocess_env(1)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigterm_saves_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
  steps = 40
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  proc = _launch(interrupted, steps)
  deadline = time.time() + 240
  while time.time() < deadline:  # wait until training is under way, then preempt
    if os.path.exists(f"{interrupted}/metrics.jsonl") and len(read_metrics(interrupted)) >= 13:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=240)[0].decode()
  assert proc.returncode == 0, out
  with open(f"{interrupted}/summary.json") as f:
    summary = json.load(f)
  assert summary["status"] == "preempted" and 12 <= summary["step"] < steps, summary
  assert ckpt_lib.Checkpointer(f"{interrupted}/checkpoints").latest_step() == summary["step"]

  for workdir in (interrupted, straight):
    proc = _launch(workdir, steps)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
  a, b = comparable(read_metrics(straight)), comparable(read_metrics(interrupted))
  assert a.keys() == b.keys()
  assert a == b  # bit-identical losses, accuracies, gradient norms and evals


def test_model_mismatch_in_a_workdir_raises_and_overwrites_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny(total_steps=2), workdir, progress=False)
  with open(f"{workdir}/config.json") as f:
    before = f.read()
  with pytest.raises(ValueError, match="different model section"):
    train.train_and_evaluate(tiny(total_steps=4, **{"model.d_model": 32}), workdir, progress=False)
  with open(f"{workdir}/config.json") as f:
    assert f.read() == before
  assert ckpt_lib.Checkpointer(f"{workdir}/checkpoints").latest_step() == 2


def test_resume_from_reads_the_model_config_back(tmp_path):
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  train.train_and_evaluate(tiny(total_steps=2, **{"model.num_layers": 1}), src, progress=False)
  out = train.train_and_evaluate(tiny(total_steps=3), dst, resume_from=src, progress=False)
  assert out["step"] == 3
  assert config_lib.read_json(f"{dst}/config.json").model.num_layers == 1


def _small_state():
  return {"w": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4, jnp.int32)}}


def test_checkpoint_round_trip_mismatch_and_corruption(tmp_path):
  directory = str(tmp_path / "ck")
  ck = ckpt_lib.Checkpointer(directory, keep=2, async_save=False)
  state = _small_state()
  ck.save(5, state, {"position": 3}, {"seed": 1})
  ck.wait()
  abstract = jax.eval_shape(lambda: state)
  restored, data_state, config = ck.restore(5, abstract)
  assert data_state == {"position": 3} and config == {"seed": 1}
  jax.tree.map(np.testing.assert_array_equal, restored, state)

  wrong = jax.eval_shape(lambda: {"w": jnp.zeros((3, 3)), "b": {"c": jnp.ones(4, jnp.int32)}})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"w: saved \(2, 3\) vs model \(3, 3\)"):
    ck.restore(5, wrong)

  # An interrupted save leaves only a temporary directory: it is not a checkpoint.
  os.makedirs(f"{directory}/9.orbax-checkpoint-tmp-123/state")
  fresh = ckpt_lib.Checkpointer(directory, async_save=False)
  assert fresh.latest_step() == 5
  jax.tree.map(np.testing.assert_array_equal, fresh.restore(5, abstract)[0], state)

  # A damaged checkpoint gives a clear error, not garbage.
  for path in glob.glob(f"{directory}/5/state/**/*", recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError):
    ckpt_lib.Checkpointer(directory, async_save=False).restore(5, abstract)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny(total_steps=30, log_every=1, checkpoint_every=1, **{"optim.lr": 1e30})
  config.optim.clip = 0.0
  config.optim.warmup_steps = 0
  with pytest.raises(train.NonFiniteLossError, match=r"(at|after) step \d+") as info:
    train.train_and_evaluate(config, workdir, progress=False)
  last = ckpt_lib.Checkpointer(f"{workdir}/checkpoints").latest_step()
  assert f"(step {last})" in str(info.value)


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"batch_size": 12, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}}, "not divisible"),
    ({"mesh": {"data": 16, "fsdp": 1, "tensor": 1}}, "needs 16 devices"),
    ({"model.attention": "nope"}, "registered ids"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4}, "multiple of model.num_kv_heads"),
    ({"model.implementation": "pallas_tpu"}, "needs a TPU backend"),
    ({"model.implementation": "flash"}, "is not one of"),
  ],
)
def test_bad_configs_raise_before_compiling(tmp_path, overrides, match):
  config = tiny(total_steps=2)
  for key, value in overrides.items():
    if key == "batch_size":
      config.batch_size = value
    elif key == "mesh":
      config.mesh = value
    else:
      config_lib._set_path(config, key, value)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_sharded_step_matches_single_device_and_params_follow_the_rules():
  config = tiny(total_steps=4)
  config.batch_size = 8
  rules = sharding.DEFAULT_RULES
  src, _, num_scored = train.make_sources(config)
  batch = next(data.make_iterator(src, global_batch_size=8, seed=0))
  results = []
  for shape, devices in [
    ({"data": 1}, jax.devices()[:1]),
    ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8]),
  ]:
    mesh = sharding.make_mesh(shape, devices)
    setup = train.sharded_setup(config, mesh, rules, num_scored)
    state = setup.init(jax.random.key(0))
    wq = state["params"]["stack"]["blocks"][0]["attn"]["wq"]
    if mesh.size == 8:  # [D=16, N=2, H=8]: embed -> fsdp, heads -> tensor
      assert wq.get_value().sharding.spec == PartitionSpec("fsdp", "tensor", None)
      assert len(wq.get_value().addressable_shards) == 8
    for _ in range(2):
      state, metrics = setup.train_step(state, data.to_global_arrays(batch, setup.batch_sharding))
    results.append((jax.device_get(metrics), jax.device_get(state["params"])))
  (m1, p1), (m8, p8) = results
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), p1, p8)


def test_mesh_validation():
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="mesh axes must be among"):
    sharding.make_mesh({"pipeline": 2})
  spec = sharding.fit_spec(
    PartitionSpec("fsdp", "tensor"),
    (16, 1),
    sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
  )
  assert spec == PartitionSpec("fsdp", None)  # one head cannot split over 2 tensor shards


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_distributed_run(tmp_path):
  port = _free_port()
  workdir = str(tmp_path / "run")
  env = subprocess_env(2)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(ROOT, "tests", "distributed_worker.py"),
        str(port),
        str(i),
        workdir,
        TINY,
      ],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=400)[0].decode() for p in procs]
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  with open(f"{workdir}/summary.json") as f:
    summary = json.load(f)
  assert summary["step"] == 4 and summary["status"] == "completed"
  assert "devices=4 processes=2" in outs[0]


def test_mqar_sweep_script_runs_tabulates_and_reuses(tmp_path):
  out = str(tmp_path / "res")
  cmd = [
    sys.executable,
    os.path.join(ROOT, "experiments", "mqar_sweep.py"),
    "--mechanisms=mha,sliding_window:window=4",
    "--cells=16x2",
    "--d_models=16",
    "--config_arg=vocab_size=64,batch_size=8,num_train=512",
    "--sets=total_steps=3,eval_every=3,checkpoint_every=3,eval_examples=16,log_every=1",
    f"--runs_dir={tmp_path / 'runs'}",
    f"--out={out}",
  ]
  env = subprocess_env(1)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  results = json.load(open(out + ".json"))
  assert [r["mechanism"] for r in results] == ["mha", "sliding_window:window=4"]
  assert all(r["steps"] == 3 and 0.0 <= r["accuracy"] <= 1.0 for r in results)
  assert os.path.exists(out + ".png") and "| mha | 16 | 2 | 16 |" in open(out + ".md").read()
  cfg = config_lib.read_json(
    str(tmp_path / "runs" / "sliding_window_window4_L16_P2_d16" / "config.json")
  )
  assert cfg.model.attention_options.window == 4
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and again.stdout.count("[reuse]") == 2


def test_trainer_adds_sown_auxiliary_losses_with_their_weight(rng):
  """With ``aux_loss_weight`` w the training objective is CE + w · Σ (sown "aux_loss"); the
  reported loss stays the cross-entropy."""
  config = config_lib.load(os.path.join(ROOT, TINY.replace("num_heads=2", "num_heads=4")), {})
  config.model.attention = "moh"
  config.model.attention_options = {**config.model.attention_options, "moh_top_k": 1}
  model = train.build_model(config.model, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(rng, (4, 16), 0, config.model.vocab_size)
  targets = jnp.where(jnp.arange(16) % 3 == 0, tokens, -1)
  batch = {"inputs": tokens, "targets": targets}
  num_scored = 6
  tx = optim.make_optimizer(config.optim, config.total_steps)
  objective = {}
  for weight in (0.0, 0.5):
    config.aux_loss_weight = weight
    train_step, _ = train.make_steps(graphdef, tx, num_scored, config)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    _, metrics = jax.jit(train_step)(state, batch)
    objective[weight] = metrics
  _, inter = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)(tokens)
  sown = [v for p, v in jax.tree_util.tree_flatten_with_path(inter)[0] if "aux_loss" in str(p)]
  assert len(sown) == config.model.num_layers  # one moh layer per block, one loss each
  np.testing.assert_allclose(objective[0.5]["loss"], objective[0.0]["loss"], rtol=1e-6)
  assert not np.allclose(objective[0.5]["grad_norm"], objective[0.0]["grad_norm"], rtol=1e-4)

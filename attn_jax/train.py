"""The trainer: one flat file, read top to bottom (big_vision style).

Sections: tasks and data · model and optimizer · sharded init · steps · checkpoint and
resume · the loop (eval, metrics, progress, preemption, non-finite loss).

A run lives in its workdir: ``config.json`` (written before step 0), ``metrics.jsonl`` (one
JSON object per logged step), ``tb/`` (TensorBoard events), ``checkpoints/<step>/`` (train
state + data-iterator state + config). Launching again on the same workdir resumes from
the latest checkpoint; the model section always comes from the run's ``config.json``.
"""

import json
import math
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import checkpoint as ckpt_lib
from attn_jax import config_lib, data, models, optim, sharding
from attn_jax.nn import transformer


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------
# Tasks and data: sources, and how many target positions each example scores.
# --------------------------------------------------------------------------------------


def make_sources(config):
  d = config.data
  if config.task == "mqar":
    common = dict(
      seq_len=d.seq_len,
      num_pairs=d.num_pairs,
      vocab_size=d.vocab_size,
      seed=config.seed,
      random_non_queries=d.random_non_queries,
    )
    train = data.MQARSource(num_examples=d.num_train, split="train", **common)
    test = data.MQARSource(num_examples=d.num_test, split="test", **common)
    return train, test, d.num_pairs
  if config.task == "induction":
    common = dict(seq_len=d.seq_len, vocab_size=d.vocab_size, seed=config.seed)
    train = data.InductionSource(d.num_train, split="train", **common)
    test = data.InductionSource(d.num_test, split="test", **common)
    return train, test, 1
  raise ValueError(f"unknown task {config.task!r}; known: 'mqar', 'induction'")


# --------------------------------------------------------------------------------------
# Model and optimizer.
# --------------------------------------------------------------------------------------


def model_kwargs(model_config) -> dict:
  kwargs = config_lib.to_dict(model_config)
  name = kwargs.pop("name")
  if kwargs.get("implementation") in ("auto", "", None):
    kwargs["implementation"] = None
  kwargs["attention_options"] = dict(kwargs.get("attention_options") or {})
  kwargs["options"] = kwargs.pop("attention_options")
  return name, kwargs


def build_model(model_config, rngs):
  name, kwargs = model_kwargs(model_config)
  return models.build(name, rngs=rngs, **kwargs)


def validate(config, mesh) -> None:
  """Config errors that must surface before anything compiles."""
  config_lib.validate(config)
  m = config.model
  if m.num_heads % m.num_kv_heads:
    raise ValueError(
      f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"
    )
  transformer.layer_kinds(m.attention, m.num_layers)  # unknown ids list the valid ones
  data_size = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % data_size:
    raise ValueError(
      f"batch_size={config.batch_size} is not divisible by the data-parallel size {data_size} "
      f"(mesh {dict(mesh.shape)})"
    )
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} must divide over {jax.process_count()} hosts")
  impl = m.get("implementation", "auto")
  backend = jax.default_backend()
  needs = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
  if impl not in ("auto", None, "", "reference", "xla", "pallas_interpret", *needs):
    raise ValueError(
      f"model.implementation={impl!r} is not one of 'auto', 'xla', 'reference', "
      "'pallas_tpu', 'pallas_gpu', 'pallas_interpret'"
    )
  if impl in needs and backend != needs[impl]:
    raise ValueError(
      f"model.implementation={impl!r} needs a {needs[impl].upper()} backend; this run is on "
      f"{backend!r}: use 'auto' (the best for the backend), 'xla' or 'pallas_interpret'"
    )


@jax.jit
def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def count_params(params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


# --------------------------------------------------------------------------------------
# Steps: loss on scored positions only (logits only where a target exists).
# --------------------------------------------------------------------------------------


def scored_positions(targets_BT, num_scored):
  """Indices of the (first ``num_scored``) scored positions per example, and their mask."""
  idx_BP = jax.vmap(lambda t: jnp.nonzero(t >= 0, size=num_scored, fill_value=0)[0])(targets_BT)
  tgt_BP = jnp.take_along_axis(targets_BT, idx_BP, axis=1)
  return idx_BP, tgt_BP >= 0, tgt_BP


def make_steps(graphdef, tx, num_scored, config):
  aux_weight = float(config.get("aux_loss_weight", 0.0))

  def forward(params, batch):
    model = nnx.merge(graphdef, params)
    idx_BP, valid_BP, tgt_BP = scored_positions(batch["targets"], num_scored)
    aux_loss = 0.0
    if aux_weight:  # modules sow auxiliary losses (e.g. load balancing) as "aux_loss"
      logits_BPV, aux = nnx.capture(model, nnx.Intermediate)(
        batch["inputs"], logit_positions_BP=idx_BP
      )
      for path, x in jax.tree_util.tree_flatten_with_path(aux)[0]:
        if "aux_loss" in jax.tree_util.keystr(path):
          aux_loss = aux_loss + jnp.sum(x)
    else:
      logits_BPV = model(batch["inputs"], logit_positions_BP=idx_BP)
    ce_BP = optax.softmax_cross_entropy_with_integer_labels(logits_BPV, jnp.maximum(tgt_BP, 0))
    count = jnp.maximum(valid_BP.sum(), 1)
    loss = jnp.where(valid_BP, ce_BP, 0).sum() / count
    correct = jnp.where(valid_BP, logits_BPV.argmax(-1) == tgt_BP, False).sum()
    return loss + aux_weight * aux_loss, (loss, correct, valid_BP.sum())

  def train_step(state, batch):
    grad_fn = jax.value_and_grad(forward, has_aux=True)
    (_, (loss, correct, count)), grads = grad_fn(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "accuracy": correct / jnp.maximum(count, 1),
      "grad_norm": optax.tree.norm(grads),
    }
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  def eval_step(params, batch):
    _, (loss, correct, count) = forward(params, batch)
    return {"loss_sum": loss * count, "correct": correct, "count": count}

  return train_step, eval_step


class Setup(NamedTuple):
  graphdef: Any
  abstract: Any  # the train state as ShapeDtypeStructs carrying their shardings
  state_sharding: Any
  batch_sharding: NamedSharding
  init: Any  # key -> train state, created already sharded
  train_step: Any  # (state, batch) -> (state, metrics); state donated
  eval_step: Any  # (params, batch) -> sums


def sharded_setup(config, mesh, rules, num_scored) -> Setup:
  """Shapes via ``eval_shape``, shardings from the logical axes, jitted init and steps."""
  tx = optim.make_optimizer(config.optim, config.total_steps)

  def init_state(key):
    params = nnx.state(build_model(config.model, nnx.Rngs(key)))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0))))
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  state_sharding = sharding.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
  )
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  replicated = NamedSharding(mesh, PartitionSpec())
  train_step, eval_step = make_steps(graphdef, tx, num_scored, config)

  def with_rules(fn):  # activation constraints resolve against this mesh when traced
    def wrapped(*args):
      with sharding.activation_sharding(mesh, rules):
        return fn(*args)

    return wrapped

  return Setup(
    graphdef=graphdef,
    abstract=abstract,
    state_sharding=state_sharding,
    batch_sharding=batch_sharding,
    init=jax.jit(init_state, out_shardings=state_sharding),
    train_step=jax.jit(
      with_rules(train_step),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    ),
    eval_step=jax.jit(
      with_rules(eval_step),
      in_shardings=(state_sharding["params"], batch_sharding),
      out_shardings=replicated,
    ),
  )


# --------------------------------------------------------------------------------------
# Workdir: config.json, metrics.jsonl, TensorBoard.
# --------------------------------------------------------------------------------------


def resolve_config(config, workdir, resume_from=None):
  """The config to run: the model section comes from an existing run when resuming."""
  source_dir = resume_from or (workdir if os.path.exists(f"{workdir}/config.json") else None)
  if source_dir is None:
    return config
  path = f"{source_dir}/config.json"
  if not os.path.exists(path):
    raise ValueError(f"--resume_from={source_dir!r} has no config.json; is it a run directory?")
  saved = config_lib.read_json(path)
  config = config.copy_and_resolve_references()
  if resume_from is None and config_lib.to_dict(config.model) != config_lib.to_dict(saved.model):
    raise ValueError(
      f"{workdir} holds a run with a different model section; resume it with the same model "
      f"or use a new --workdir (saved model: {json.dumps(config_lib.to_dict(saved.model))})"
    )
  config.model = saved.model
  return config


class MetricsLog:
  """``metrics.jsonl`` (truncated to the resumed step) plus TensorBoard events."""

  def __init__(self, workdir, start_step, enabled=True):
    self.enabled, self.path = enabled, f"{workdir}/metrics.jsonl"
    self.tb = None
    if not enabled:
      return
    if os.path.exists(self.path):  # drop lines a resumed run will log again
      with open(self.path) as f:
        kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= start_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)
    try:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(f"{workdir}/tb")
    except ImportError:  # TensorBoard events are optional; JSON lines are not
      self.tb = None

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self.tb is not None:
      self.tb.close()


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir, *, resume_from=None, progress=True) -> dict:
  """Trains ``config`` in ``workdir``; returns a summary dict (also ``summary.json``).

  Raises:
    ValueError: a bad config (before compiling) or a checkpoint that does not match.
    NonFiniteLossError: the loss became NaN/inf (the message names the step).
  """
  t_start = time.time()
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  config = resolve_config(config, workdir, resume_from)
  mesh = sharding.make_mesh(config.mesh)
  validate(config, mesh)
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
  if lead:
    config_lib.write_json(config, f"{workdir}/config.json")

  # Data: each host reads its shard; batches become global arrays.
  train_src, test_src, num_scored = make_sources(config)
  train_iter = data.make_iterator(
    train_src, global_batch_size=config.batch_size, seed=config.seed, shuffle=True
  )

  # Model, optimizer, sharded init: shapes first, then init straight into the shardings.
  setup = sharded_setup(config, mesh, rules, num_scored)
  batch_sharding, p_train, p_eval = setup.batch_sharding, setup.train_step, setup.eval_step
  abstract, key = setup.abstract, jax.random.key(config.seed)

  # Checkpoints: resume from this workdir, else from --resume_from, else start fresh.
  ckpt = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", keep=config.keep_checkpoints)
  step, state = 0, None
  for source in (
    ckpt,
    ckpt_lib.Checkpointer(f"{resume_from}/checkpoints") if resume_from else None,
  ):
    if source is not None and source.latest_step() is not None:
      step = source.latest_step()
      state, data_state, _ = source.restore(step, abstract)
      data.set_iterator_state(train_iter, data_state)
      break
  if state is None:
    state = setup.init(key)
  num_params = count_params(state["params"])
  log = MetricsLog(workdir, step, enabled=lead)

  def evaluate(params):
    it = data.make_iterator(
      test_src, global_batch_size=config.batch_size, seed=0, shuffle=False, num_epochs=1
    )
    total = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for i, batch in enumerate(it):
      if i * config.batch_size >= config.eval_examples:
        break
      out = p_eval(params, data.to_global_arrays(batch, batch_sharding))
      total = {k: total[k] + float(v) for k, v in out.items()}
    count = max(total["count"], 1.0)
    return {"eval_loss": total["loss_sum"] / count, "eval_accuracy": total["correct"] / count}

  def save(at_step, force=False):
    if ckpt.latest_step() == at_step:  # already saved at this step (e.g. SIGTERM right after)
      return
    if not bool(all_finite(state["params"])):  # never replace a good checkpoint with NaNs
      raise NonFiniteLossError(
        f"non-finite parameters after step {at_step}; not saved. The last good checkpoint "
        f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}"
      )
    ckpt.save(
      at_step,
      state,
      data.get_iterator_state(train_iter),
      config_lib.to_dict(config),
      force=force,
    )

  # Preemption: SIGTERM asks the loop to save and stop cleanly at the next step boundary.
  stop = threading.Event()
  previous_handler = None
  if threading.current_thread() is threading.main_thread():
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.set())

  tokens_per_step = config.batch_size * config.data.seq_len
  bar = None
  if lead and progress:
    from tqdm import tqdm

    bar = tqdm(total=config.total_steps, initial=step, desc=os.path.basename(workdir.rstrip("/")))
  status, last_eval, pending, t_log, log_step = "completed", {}, [], time.time(), step
  try:
    while step < config.total_steps:
      batch = data.to_global_arrays(next(train_iter), batch_sharding)
      state, metrics = p_train(state, batch)
      step += 1
      pending.append(metrics)
      if bar is not None:
        bar.update(1)
      done = step == config.total_steps
      if step % config.log_every == 0 or done or stop.is_set():
        rows = jax.device_get(pending)
        for i, row in enumerate(rows):
          if not np.isfinite(row["loss"]):
            bad = step - len(rows) + i + 1
            raise NonFiniteLossError(
              f"non-finite loss {row['loss']} at step {bad}; the last good checkpoint "
              f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}"
            )
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
        now = time.time()
        mean["tokens_per_sec"] = tokens_per_step * (step - log_step) / max(now - t_log, 1e-9)
        mean["learning_rate"] = float(
          optim.learning_rate_schedule(config.optim, config.total_steps)(step)
        )
        t_log, log_step, pending = now, step, []
        log.write(step, mean)
        if bar is not None:
          bar.set_postfix(
            loss=f"{mean['loss']:.3f}",
            acc=f"{mean['accuracy']:.3f}",
            tok_s=f"{mean['tokens_per_sec']:.0f}",
            **({"eval": f"{last_eval['eval_accuracy']:.3f}"} if last_eval else {}),
          )
      if step % config.eval_every == 0 or done:
        last_eval = evaluate(state["params"])
        log.write(step, last_eval)
        t_log = time.time()  # tokens/s counts training time only
      if step % config.checkpoint_every == 0 or done:
        save(step)
        t_log = time.time()
      if (
        last_eval
        and step % config.eval_every == 0
        and (last_eval["eval_accuracy"] >= config.get("early_stop_accuracy", 2.0))
      ):
        status = "early_stopped"
        save(step, force=True)
        break
      if stop.is_set():
        status = "preempted"
        save(step, force=True)
        break
  finally:
    ckpt.close()
    log.close()
    if bar is not None:
      bar.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)

  if status != "preempted" and not last_eval:
    last_eval = evaluate(state["params"])
  summary = {
    "status": status,
    "step": step,
    "num_params": num_params,
    "wall_time_s": time.time() - t_start,
    "attention": config.model.attention,
    **last_eval,
  }
  if lead:
    with open(f"{workdir}/summary.json", "w") as f:
      json.dump(summary, f, indent=2)
  return summary

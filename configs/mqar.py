r"""MQAR (multi-query associative recall), the Zoology Figure-2 setting, one cell per run.

Zoology: Measuring and Improving Recall in Efficient Language Models. A 2-layer decoder with
learned absolute positions, no MLP, pre-LayerNorm, tied embeddings; AdamW (wd 0.1) with
warmup + cosine; cross-entropy and accuracy on the query positions only. ``attn`` is a
registry id, or ``a+b`` for one id per layer.

Launch (CPU or TPU VM, same command):
  python -m attn_jax.main --config=configs/mqar.py:attn=mha,seq_len=64,num_pairs=4 \
    --workdir=runs/mqar_mha_64_4
  python -m attn_jax.main --config=configs/mqar.py:attn=sliding_window,runlocal \
    --workdir=runs/smoke --config.model.attention_options.window=16
Differences from the paper: no dropout on attention probabilities (the functional API has
none); training stops early once test accuracy reaches ``early_stop_accuracy``. Without that
dropout, repeated epochs over the paper's 100k examples are memorised (at (64,4), d=64,
step 1000: 0.85 accuracy on seen training examples, 0.68 on unseen ones), so the sweep
(experiments/mqar_sweep.py) trains on fresh examples: ``num_train=3072000,epochs=1``.
"""

import ml_collections

from attn_jax import config_lib, sharding
from attn_jax.nn import transformer


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    attn="mha",
    seq_len=64,
    num_pairs=4,
    d_model=64,
    num_heads=1,
    vocab_size=8192,
    lr=2.15e-3,
    epochs=64,
    batch_size=0,
    num_train=100_000,
    runlocal=False,
  )
  c = ml_collections.ConfigDict()
  c.task = "mqar"
  c.data = dict(
    seq_len=arg.seq_len,
    num_pairs=arg.num_pairs,
    vocab_size=arg.vocab_size,
    num_train=arg.num_train,
    num_test=3000,
    random_non_queries=False,
  )
  c.model = dict(
    name="decoder_lm",
    attention=arg.attn,
    attention_options=transformer.default_options(arg.attn),
    d_model=arg.d_model,
    num_layers=2,
    num_heads=arg.num_heads,
    num_kv_heads=arg.num_heads,
    head_dim=arg.d_model // arg.num_heads,
    positions="learned",
    mlp="none",
    mlp_dim=4 * arg.d_model,
    norm="layernorm",
    qk_norm=False,
    tie_embeddings=True,
    max_len=arg.seq_len,
    vocab_size=arg.vocab_size,
    dtype="float32",
    implementation="auto",
    remat=False,
  )
  batch = arg.batch_size or (512 if arg.seq_len <= 128 else 256 if arg.seq_len <= 256 else 128)
  c.batch_size = batch
  c.total_steps = max(1, arg.epochs * arg.num_train // batch)
  c.optim = dict(
    lr=arg.lr, weight_decay=0.1, warmup_steps=c.total_steps // 50, b1=0.9, b2=0.98, clip=1.0
  )
  # Weight of the auxiliary losses attention modules sow (MoH / MoA load balancing); no effect
  # for mechanisms that sow none.
  c.aux_loss_weight = 0.01
  c.eval_every = 500
  c.eval_examples = 3000
  c.early_stop_accuracy = 0.99
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.log_every = 50
  c.seed = 0
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]

  if arg.runlocal:
    c.data.num_train = 4096
    c.data.num_test = 256
    c.data.vocab_size = min(c.data.vocab_size, 256)
    c.model.vocab_size = c.data.vocab_size
    c.batch_size = 32
    c.total_steps = 20
    c.optim.warmup_steps = 2
    c.eval_every = 10
    c.eval_examples = 256
    c.checkpoint_every = 10
    c.log_every = 5
  return c

r"""A tiny causal LM on synthetic induction-head data: the smallest end-to-end LM config.

Each sequence holds a trigger token A followed by B early on and ends with A again; the
model must predict B (a 2-layer attention model learns the induction circuit).

  python -m attn_jax.main --config=configs/lm_tiny.py --workdir=runs/lm_tiny
  python -m attn_jax.main --config=configs/lm_tiny.py:attn=alibi,runlocal --workdir=runs/x
"""

import ml_collections

from attn_jax import config_lib, sharding
from attn_jax.models import decoder_lm
from attn_jax.nn import transformer


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, attn="mha", variant="tiny", seq_len=32, runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = "induction"
  c.data = dict(seq_len=arg.seq_len, vocab_size=20, num_train=5000, num_test=500)
  c.model = dict(
    name="decoder_lm",
    attention=arg.attn,
    attention_options=transformer.default_options(arg.attn),
    d_model=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    head_dim=32,
    positions="rope",
    mlp="gelu",
    mlp_dim=256,
    norm="rmsnorm",
    qk_norm=False,
    tie_embeddings=False,
    max_len=arg.seq_len,
    vocab_size=20,
    dtype="float32",
    implementation="auto",
    remat=False,
  )
  c.model.update(decoder_lm.VARIANTS[arg.variant])
  c.model.head_dim = c.model.d_model // c.model.num_heads
  c.model.num_kv_heads = c.model.get("num_kv_heads", c.model.num_heads)
  c.batch_size = 64
  c.total_steps = 2000
  c.optim = dict(lr=1e-3, weight_decay=0.01, warmup_steps=100, b1=0.9, b2=0.98, clip=1.0)
  # Weight of the auxiliary losses attention modules sow (MoH / MoA load balancing); no effect
  # for mechanisms that sow none.
  c.aux_loss_weight = 0.01
  c.eval_every = 250
  c.eval_examples = 500
  c.early_stop_accuracy = 1.0
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.log_every = 50
  c.seed = 0
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  if arg.runlocal:
    c.data.num_train, c.data.num_test = 512, 64
    c.batch_size, c.total_steps = 16, 20
    c.optim.warmup_steps = 2
    c.eval_every = c.checkpoint_every = 10
    c.eval_examples, c.log_every = 64, 5
  return c

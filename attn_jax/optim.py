"""Optimizer: AdamW with linear warmup and cosine decay, global-norm clipping."""

import jax
import optax


def learning_rate_schedule(optim, total_steps: int):
  warmup = int(min(optim.warmup_steps, max(total_steps - 1, 0)))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=optim.lr * optim.get("final_lr_fraction", 0.0),
  )


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  """AdamW; weight decay applies to matrices only (not to norm scales, biases or sinks)."""
  if optim.lr <= 0:
    raise ValueError(f"optim.lr must be positive; got {optim.lr}")
  schedule = learning_rate_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
    optax.clip_by_global_norm(optim.clip) if optim.clip else optax.identity(),
    optax.adamw(
      schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask
    ),
  )

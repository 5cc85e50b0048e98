"""Attention-pooling heads (registry interface ``"pool"``): learned queries read a sequence.

``EfficientProbe`` holds the parameters of ``attn_jax.attention.probe.efficient_probe`` (M
learned queries, one channel-split value projection) and pools ``[B, S, D]`` to ``[B, Dv]``.
``attn_jax.models.encoder.Encoder(pooling="efficient_probe")`` puts it before its classifier.
"""

import jax
from flax import nnx

from attn_jax.attention import probe as probe_lib
from attn_jax.nn import layers


class EfficientProbe(nnx.Module):
  """Multi-query attention pooling.

  Args:
    d_model: D, the token width (the keys are the tokens as they are).
    num_queries: M learned queries (the paper's default 32).
    v_dim: Dv, the pooled width (a multiple of M; default D rounded down to one).
    implementation: ``dot_product_attention``'s names.
  """

  def __init__(
    self,
    *,
    d_model: int,
    num_queries: int = 32,
    v_dim: int | None = None,
    implementation: str | None = None,
    rngs: nnx.Rngs,
  ):
    init = probe_lib.init_efficient_probe(
      jax.random.key(0), d_model=d_model, num_queries=num_queries, v_dim=v_dim
    )  # validates the sizes; the draws below are the module's own
    M, D, Dv = probe_lib.probe_dims(init)
    self.out_dim, self.implementation = Dv, implementation
    self.queries = layers.param(rngs, jax.nn.initializers.normal(1.0), (M, D), (None, "embed"))
    self.w_v = layers.param(rngs, layers.fan_in_init(D), (D, Dv), ("embed", None))

  def __call__(self, x_BSD, *, valid_BS=None):
    params = {"queries": self.queries[...], "w_v": self.w_v[...]}
    return probe_lib.efficient_probe(
      params, x_BSD, valid_BS=valid_BS, implementation=self.implementation
    )

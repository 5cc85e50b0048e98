"""Synthetic in-context learning data: MQAR, linear regression, induction; grain loading.

Sources are random-access (``len`` / ``[]``) and every example is a pure function of
``(seed, split, index)``, so sharding across hosts and resuming from a checkpoint are exact.
"""

from attn_jax.data.induction import InductionSource
from attn_jax.data.mqar import IGNORE, MQARSource, gap_probabilities
from attn_jax.data.pipeline import (
  get_iterator_state,
  make_iterator,
  set_iterator_state,
  to_global_arrays,
)
from attn_jax.data.regression import (
  LinearRegressionSource,
  least_squares_predict,
  one_step_gd_predict,
  ridge_predict,
)

__all__ = [
  "IGNORE",
  "InductionSource",
  "LinearRegressionSource",
  "MQARSource",
  "gap_probabilities",
  "get_iterator_state",
  "least_squares_predict",
  "make_iterator",
  "one_step_gd_predict",
  "ridge_predict",
  "set_iterator_state",
  "to_global_arrays",
]

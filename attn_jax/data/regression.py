"""In-context linear regression (Garg et al. 2022; von Oswald et al. 2023) and its baselines.

Each example is a fresh regression problem: ``num_pairs`` labelled points ``(x_i, y_i)`` and a
query ``x_q`` whose label the model must predict from the context alone. The closed-form
baselines (least squares, ridge, one step of gradient descent) are what a trained model is
compared with: a transformer that matches one-step GD or ridge tells us which algorithm it
implements in context.

Examples are seeded like every source of this package: ``default_rng([seed, split_id, index])``.
"""

from typing import Any

import numpy as np

from attn_jax.data.mqar import _check_int, _example_rng, _normalize_index, _split_id


class LinearRegressionSource:
  """Random-access in-context regression problems, ready for ``grain``.

  Per example: ``beta ~ N(0, I_d / d)`` (so ``Var(x . beta) = 1``), ``x_i ~ N(0, I_d)`` and
  ``y_i = x_i . beta + eps_i`` with ``eps_i ~ N(0, noise_var)``, for the ``num_pairs`` context
  points and the query alike. Rows of ``inputs`` are ``[x_i; y_i]``, the last one is
  ``[x_q; 0]``; the target is the (noisy) ``y_q``.
  """

  def __init__(
    self,
    num_examples: int,
    *,
    dim: int = 5,
    num_pairs: int = 40,
    noise_var: float = 0.1,
    seed: int,
    split: str = "train",
  ):
    """Validates the configuration; examples are generated lazily in ``__getitem__``.

    Args:
      num_examples: number of examples in the source (>= 1).
      dim: ``d``, the dimension of ``x`` (>= 1).
      num_pairs: labelled context points per example (>= 1).
      noise_var: variance of the label noise (>= 0; 0 gives noise-free labels).
      seed: non-negative int; with ``split`` and the index it fixes each example.
      split: ``"train"`` or ``"test"``.
    """
    self.num_examples = _check_int("num_examples", num_examples, minimum=1)
    self.dim = _check_int("dim", dim, minimum=1)
    self.num_pairs = _check_int("num_pairs", num_pairs, minimum=1)
    if isinstance(noise_var, (bool, np.bool_)) or not isinstance(
      noise_var, (int, float, np.integer, np.floating)
    ):
      raise ValueError(f"noise_var must be a float >= 0; got {noise_var!r}")
    if not (np.isfinite(noise_var) and noise_var >= 0):
      raise ValueError(f"noise_var must be a finite float >= 0; got {noise_var!r}")
    self.noise_var = float(noise_var)
    self.seed = _check_int("seed", seed, minimum=0)
    self.split = split
    self._split_id = _split_id(split)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    # Grain checks checkpointed iterator state against repr(source): keep every field here.
    return (
      f"LinearRegressionSource(num_examples={self.num_examples}, dim={self.dim}, "
      f"num_pairs={self.num_pairs}, noise_var={self.noise_var!r}, seed={self.seed}, "
      f"split={self.split!r})"
    )

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Generates example ``index``.

    Args:
      index: in ``[-len, len)``; negative indices count from the end.

    Returns:
      ``dict(inputs=float32[num_pairs + 1, dim + 1], targets=float32[], beta=float32[dim])``.
    """
    index = _normalize_index(index, self.num_examples)
    rng = _example_rng(self.seed, self._split_id, index)
    n, d = self.num_pairs, self.dim
    beta = rng.standard_normal(d) / np.sqrt(d)
    x = rng.standard_normal((n + 1, d))
    y = x @ beta + np.sqrt(self.noise_var) * rng.standard_normal(n + 1)
    inputs = np.concatenate([x, y[:, None]], axis=1)
    inputs[n, d] = 0.0  # the query's label is what is asked for
    return {
      "inputs": inputs.astype(np.float32),
      "targets": np.asarray(y[n], np.float32),
      "beta": beta.astype(np.float32),
    }


def _split_batch(inputs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``[B, n + 1, d + 1]`` -> context ``X [B, n, d]``, labels ``y [B, n]``, query ``[B, d]``."""
  z = np.asarray(inputs)
  if z.ndim != 3 or z.shape[1] < 2 or z.shape[2] < 2:
    raise ValueError(
      f"inputs must have shape [batch, num_pairs + 1, dim + 1] with num_pairs, dim >= 1; "
      f"got {z.shape}"
    )
  z = z.astype(np.float64)
  return z[:, :-1, :-1], z[:, :-1, -1], z[:, -1, :-1]


def _out_dtype(inputs: Any) -> np.dtype:
  dtype = np.asarray(inputs).dtype
  return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def least_squares_predict(inputs: Any) -> np.ndarray:
  """Ordinary least squares fitted to each context, evaluated at its query.

  Uses the pseudo-inverse, so with fewer points than dimensions it is the minimum-norm
  interpolant (the ridge limit ``lam -> 0``). Computed in float64.

  Args:
    inputs: ``[B, num_pairs + 1, dim + 1]`` as produced by ``LinearRegressionSource``.

  Returns:
    ``[B]`` predictions of ``y_q`` (the floating dtype of ``inputs``).
  """
  x, y, x_q = _split_batch(inputs)
  beta = np.einsum("bdn,bn->bd", np.linalg.pinv(x), y)
  return np.einsum("bd,bd->b", x_q, beta).astype(_out_dtype(inputs))


def ridge_predict(inputs: Any, lam: float) -> np.ndarray:
  """Ridge regression ``argmin |X b - y|^2 + lam |b|^2`` per context, evaluated at its query.

  With the source's prior (``beta ~ N(0, I/d)``, noise variance ``s2``) the Bayes-optimal
  predictor is ridge with ``lam = s2 * d``. Computed in float64.

  Args:
    inputs: ``[B, num_pairs + 1, dim + 1]`` as produced by ``LinearRegressionSource``.
    lam: regularisation strength (> 0; the sum, not the mean, of squared errors is penalised
      against it).

  Returns:
    ``[B]`` predictions of ``y_q`` (the floating dtype of ``inputs``).
  """
  if not (np.isfinite(lam) and lam > 0):
    raise ValueError(f"lam must be a finite float > 0 (use least_squares_predict); got {lam!r}")
  x, y, x_q = _split_batch(inputs)
  d = x.shape[-1]
  gram = np.einsum("bnd,bne->bde", x, x) + lam * np.eye(d)
  xty = np.einsum("bnd,bn->bd", x, y)
  beta = np.linalg.solve(gram, xty[..., None])[..., 0]
  return np.einsum("bd,bd->b", x_q, beta).astype(_out_dtype(inputs))


def one_step_gd_predict(inputs: Any, lr: float) -> np.ndarray:
  """One gradient step from ``beta = 0`` on ``(1 / 2n) sum_i (x_i . b - y_i)^2``, at the query.

  The step gives ``beta_1 = (lr / n) X^T y``; a single linear-attention layer can implement
  exactly this predictor (von Oswald et al. 2023), so it is the baseline to compare with.

  Args:
    inputs: ``[B, num_pairs + 1, dim + 1]`` as produced by ``LinearRegressionSource``.
    lr: step size.

  Returns:
    ``[B]`` predictions of ``y_q`` (the floating dtype of ``inputs``).
  """
  if not np.isfinite(lr):
    raise ValueError(f"lr must be finite; got {lr!r}")
  x, y, x_q = _split_batch(inputs)
  n = x.shape[1]
  beta = (lr / n) * np.einsum("bnd,bn->bd", x, y)
  return np.einsum("bd,bd->b", x_q, beta).astype(_out_dtype(inputs))

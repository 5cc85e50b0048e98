"""Induction heads / single-query associative recall (Olsson et al. 2022).

A random sequence contains a trigger token ``A`` once, followed by ``B``; the sequence ends
with ``A`` again and the model must predict ``B``. Solving it needs the two-layer "induction"
circuit (find the previous ``A``, copy what followed it), the classic probe of whether a mixer
can do content-based lookup at all. ``A`` appears exactly twice, so the answer is unambiguous.

Examples are seeded like every source of this package: ``default_rng([seed, split_id, index])``.
"""

import numpy as np

from attn_jax.data.mqar import IGNORE, _check_int, _example_rng, _normalize_index, _split_id


class InductionSource:
  """Random-access induction examples, ready for ``grain``.

  Per example: distinct tokens ``A != B`` from ``[0, vocab_size)``; ``A`` at a uniform position
  ``p in [0, seq_len - 3]``, ``B`` at ``p + 1``, ``A`` at ``seq_len - 1``; every other position
  is a uniform token other than ``A`` (``B`` may recur there; only what follows ``A`` counts).
  ``targets[seq_len - 1] = B``, every other target is ``IGNORE`` (-1).
  """

  def __init__(
    self,
    num_examples: int,
    *,
    seq_len: int = 32,
    vocab_size: int = 20,
    seed: int,
    split: str = "train",
  ):
    """Validates the configuration; examples are generated lazily in ``__getitem__``.

    Args:
      num_examples: number of examples in the source (>= 1).
      seq_len: sequence length (>= 3: ``A B`` and the final ``A``).
      vocab_size: number of tokens (>= 3, so that fillers are not forced to be ``B``).
      seed: non-negative int; with ``split`` and the index it fixes each example.
      split: ``"train"`` or ``"test"``.
    """
    self.num_examples = _check_int("num_examples", num_examples, minimum=1)
    self.seq_len = _check_int("seq_len", seq_len, minimum=3)
    self.vocab_size = _check_int("vocab_size", vocab_size, minimum=3)
    self.seed = _check_int("seed", seed, minimum=0)
    self.split = split
    self._split_id = _split_id(split)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    # Grain checks checkpointed iterator state against repr(source): keep every field here.
    return (
      f"InductionSource(num_examples={self.num_examples}, seq_len={self.seq_len}, "
      f"vocab_size={self.vocab_size}, seed={self.seed}, split={self.split!r})"
    )

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Generates example ``index``.

    Args:
      index: in ``[-len, len)``; negative indices count from the end.

    Returns:
      ``dict(inputs=int32[seq_len], targets=int32[seq_len])``.
    """
    index = _normalize_index(index, self.num_examples)
    rng = _example_rng(self.seed, self._split_id, index)
    L, V = self.seq_len, self.vocab_size
    a, b = rng.choice(V, size=2, replace=False)
    # Uniform over the V - 1 tokens other than A: draw from [0, V - 1) and skip over A.
    inputs = rng.integers(0, V - 1, size=L)
    inputs = (inputs + (inputs >= a)).astype(np.int32)
    p = int(rng.integers(0, L - 2))
    inputs[p] = a
    inputs[p + 1] = b
    inputs[L - 1] = a
    targets = np.full(L, IGNORE, np.int32)
    targets[L - 1] = b
    return {"inputs": inputs, "targets": targets}

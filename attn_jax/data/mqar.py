"""MQAR: multi-query associative recall (Arora et al. 2023, "Zoology") as an indexable source.

An example is ``P`` key-value pairs ``k1 v1 k2 v2 ... kP vP`` followed by a query region in
which every key is asked for once. Each query key sits on an even slot of the query region and
the model must emit the value it was paired with in the context. Query slots are drawn with a
power law that favours short gaps, so most queries land soon after the context and a few land
far away: the task measures how much a mixer can recall, not only how far it can see.

Every example is an exact function of ``(seed, split, index)``: its random numbers come from
a counter-based hash (splitmix64) of ``(seed, split, index, stream, counter)``, so a whole
batch is generated with a few vectorised numpy operations (``generate``) and shards, resumes
and worker processes see bit-identical examples; train and test never share a stream.

The helpers ``_check_int``, ``_split_id``, ``_example_rng`` and ``_normalize_index`` are shared
by the other sources of this package (regression, induction), which seed the same way.
"""

from typing import Any

import numpy as np

_SPLIT_IDS = {"train": 0, "test": 1}

#: Target value of positions that are not scored (the trainer ignores them).
IGNORE = -1


def _check_int(name: str, value: Any, *, minimum: int) -> int:
  """Checks that ``value`` is an int (not a bool) >= ``minimum`` and returns it as an int."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}")
  return int(value)


def _split_id(split: Any) -> int:
  """Maps a split name to the integer folded into the seed (train 0, test 1)."""
  if split not in _SPLIT_IDS:
    raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}; got {split!r}")
  return _SPLIT_IDS[split]


def _normalize_index(index: Any, length: int) -> int:
  """Returns ``index`` as an int in [0, length); negative indices count from the end."""
  if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
    raise TypeError(f"index must be an int; got {type(index).__name__}")
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"index out of range for a source of {length} examples; got {index}")
  return index


def _example_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
  """The generator of one example: a pure function of (seed, split, index)."""
  return np.random.default_rng([seed, split_id, index])


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a bijection of uint64 that scatters nearby inputs."""
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def _example_hash(seed: int, split_id: int, indices: np.ndarray) -> np.ndarray:
  """One uint64 per example, a pure function of (seed, split, index)."""
  with np.errstate(over="ignore"):
    head = _mix(np.asarray([seed * 2 + split_id], np.uint64) * _GOLDEN + np.uint64(1))
    return _mix(head ^ (indices.astype(np.uint64) * _GOLDEN + np.uint64(7)))


def _uniforms(base: np.ndarray, stream: int, count: int, offset: int = 0) -> np.ndarray:
  """``[n, count]`` uniforms in (0, 1) from per-example hashes, stream and counter."""
  counters = np.arange(offset, offset + count, dtype=np.uint64) + np.uint64(stream << 40)
  with np.errstate(over="ignore"):
    z = _mix(base[:, None] ^ _mix(counters * _GOLDEN)[None, :])
  return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _distinct_ints(base: np.ndarray, stream: int, n: int, size: int) -> np.ndarray:
  """``[rows, size]`` distinct ints uniform in ``[0, n)`` per row, in random order.

  Rejection: a row with a repeat is redrawn whole from the next counters, which keeps it
  exactly uniform over ordered distinct tuples. When repeats would be common (size² > n) the
  row takes the ``size`` smallest of ``n`` uniform scores instead (a random permutation).
  """
  if size * size > n:
    return np.argsort(_uniforms(base, stream, n), axis=1)[:, :size]
  out = np.floor(_uniforms(base, stream, size) * n).astype(np.int64)
  todo = np.arange(len(base))
  for attempt in range(1, 1000):
    srt = np.sort(out[todo], axis=1)
    todo = todo[(srt[:, 1:] == srt[:, :-1]).any(axis=1)]
    if not len(todo):
      return out
    draw = _uniforms(base[todo], stream, size, offset=attempt * size)
    out[todo] = np.floor(draw * n).astype(np.int64)
  raise RuntimeError("could not draw distinct tokens")  # probability ~0 when size² <= n


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
  """Probability of each query slot ``0..space-1``: proportional to ``i**(a-1)``, i = 1..space.

  With ``a < 1`` this decreases in ``i``, so short gaps between the context and the query are
  the most likely; ``a = 1`` would be uniform.

  Args:
    space: number of query slots, ``(seq_len - 2 * num_pairs) // 2``.
    power_a: the exponent ``a`` (> 0).

  Returns:
    float64 ``[space]`` probabilities summing to 1.
  """
  weights = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
  return weights / weights.sum()


class MQARSource:
  """Random-access MQAR examples, ready for ``grain`` (``__len__`` / ``__getitem__``).

  Layout of an example of length ``L`` with ``P`` pairs (``space = (L - 2P) / 2`` slots):

  * positions ``0 .. 2P-1``: ``k1 v1 ... kP vP``; keys are distinct tokens of
    ``[1, V // 2)``, values distinct tokens of ``[V // 2, V)``, paired at random;
  * positions ``2P .. L-1``: the query region. Key ``j`` sits at ``2P + 2 * gap_j`` and its
    value right after it; the gaps are distinct slots drawn with ``gap_probabilities``;
    every other position is 0 (or a uniform token of ``[1, V)`` with ``random_non_queries``).

  ``targets[t] = inputs[t + 1]`` at the ``P`` query-key positions and ``IGNORE`` (-1) elsewhere.
  """

  def __init__(
    self,
    *,
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    seed: int,
    split: str = "train",
    random_non_queries: bool = False,
    power_a: float = 0.01,
  ):
    """Validates the configuration; examples are generated lazily in ``__getitem__``.

    Args:
      num_examples: number of examples in the source (>= 1).
      seq_len: ``L``, even, with ``4 * num_pairs <= seq_len`` (the query region must have a
        slot for every key) and ``seq_len < vocab_size``.
      num_pairs: ``P`` key-value pairs per example, ``1 <= P <= vocab_size // 2 - 1``.
      vocab_size: ``V``; keys come from ``[1, V // 2)``, values from ``[V // 2, V)``.
      seed: non-negative int; with ``split`` and the index it fixes each example.
      split: ``"train"`` or ``"test"``.
      random_non_queries: fill non-query positions of the query region with random tokens
        instead of 0, so position alone does not reveal where the queries are.
      power_a: exponent ``a`` of the gap distribution (> 0; small values favour short gaps).
    """
    self.num_examples = _check_int("num_examples", num_examples, minimum=1)
    self.seq_len = _check_int("seq_len", seq_len, minimum=2)
    self.num_pairs = _check_int("num_pairs", num_pairs, minimum=1)
    self.vocab_size = _check_int("vocab_size", vocab_size, minimum=2)
    self.seed = _check_int("seed", seed, minimum=0)
    self.split = split
    self._split_id = _split_id(split)
    if not isinstance(random_non_queries, (bool, np.bool_)):
      raise ValueError(f"random_non_queries must be a bool; got {random_non_queries!r}")
    self.random_non_queries = bool(random_non_queries)
    if isinstance(power_a, (bool, np.bool_)) or not isinstance(
      power_a, (int, float, np.integer, np.floating)
    ):
      raise ValueError(f"power_a must be a float > 0; got {power_a!r}")
    if not (np.isfinite(power_a) and power_a > 0):
      raise ValueError(f"power_a must be a finite float > 0; got {power_a!r}")
    self.power_a = float(power_a)

    if self.seq_len % 2:
      raise ValueError(
        f"seq_len must be even (queries and their values fill pairs of slots); got {seq_len}"
      )
    if self.vocab_size <= self.seq_len:
      raise ValueError(f"vocab_size must be > seq_len ({seq_len}); got {vocab_size}")
    if 4 * self.num_pairs > self.seq_len:
      raise ValueError(
        f"num_pairs must satisfy 4 * num_pairs <= seq_len ({seq_len}) so every key has a "
        f"query slot; got num_pairs={num_pairs}"
      )
    max_pairs = self.vocab_size // 2 - 1
    if self.num_pairs > max_pairs:
      raise ValueError(
        f"num_pairs must be <= vocab_size // 2 - 1 = {max_pairs} (distinct keys in "
        f"[1, {self.vocab_size // 2})); got num_pairs={num_pairs}"
      )
    self._space = (self.seq_len - 2 * self.num_pairs) // 2
    self._gap_p = gap_probabilities(self._space, self.power_a)
    self._gap_logp = np.log(self._gap_p)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    # Grain checks checkpointed iterator state against repr(source): keep every field here.
    return (
      f"MQARSource(num_examples={self.num_examples}, seq_len={self.seq_len}, "
      f"num_pairs={self.num_pairs}, vocab_size={self.vocab_size}, seed={self.seed}, "
      f"split={self.split!r}, random_non_queries={self.random_non_queries}, "
      f"power_a={self.power_a!r})"
    )

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Generates example ``index``.

    Args:
      index: in ``[-len, len)``; negative indices count from the end.

    Returns:
      ``dict(inputs=int32[seq_len], targets=int32[seq_len])``.
    """
    index = _normalize_index(index, self.num_examples)
    return {k: v[0] for k, v in self.generate(np.asarray([index])).items()}

  def generate(self, indices) -> dict[str, np.ndarray]:
    """Examples ``indices`` (``[n]`` ints in range) as ``inputs``/``targets`` ``int32[n, L]``."""
    idx = np.asarray(indices, np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.num_examples)):
      raise IndexError(f"indices must be a 1-D array in [0, {self.num_examples})")
    n, P, L, V = len(idx), self.num_pairs, self.seq_len, self.vocab_size
    half = V // 2
    base = _example_hash(self.seed, self._split_id, idx)
    keys = 1 + _distinct_ints(base, 0, half - 1, P)
    values = half + _distinct_ints(base, 1, V - half, P)
    # Gumbel top-k: the P largest of log p_i + Gumbel_i are a draw without replacement with
    # probabilities proportional to p (the law of sequential weighted draws).
    gumbel = -np.log(-np.log(_uniforms(base, 2, self._space)))
    scores = self._gap_logp[None, :] + gumbel
    gaps = np.argsort(-scores, axis=1, kind="stable")[:, :P]

    rows = np.arange(n)[:, None]
    inputs = np.zeros((n, L), np.int32)
    inputs[:, 0 : 2 * P : 2] = keys
    inputs[:, 1 : 2 * P : 2] = values
    if self.random_non_queries:
      filler = 1 + np.floor(_uniforms(base, 3, L - 2 * P) * (V - 1)).astype(np.int64)
      inputs[:, 2 * P :] = np.minimum(filler, V - 1)
    query_pos = 2 * P + 2 * gaps
    inputs[rows, query_pos] = keys
    inputs[rows, query_pos + 1] = values
    targets = np.full((n, L), IGNORE, np.int32)
    targets[rows, query_pos] = values
    return {"inputs": inputs, "targets": targets}

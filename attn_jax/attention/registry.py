"""The mechanism registry: every attention mechanism of attn_jax, listed once.

Ids are the catalog ids. Configs select mechanisms by id; tests and docs enumerate this
registry. A mechanism not in the registry does not exist.

Each entry declares which of the four self/cross x causal/non-causal patterns it supports
(``PATTERNS``). ``run`` calls an entry on given q/k/v in a pattern; an undeclared pattern
raises instead of silently computing something else. ``build`` makes the entry's options
(masks, biases, sinks, ...) for a call of given sizes, deterministically from a PRNG key.

Four interfaces:
  * ``"qkv"`` (family (a) and every score-level mechanism): ``entry(q, k, v, *,
    implementation, **build(key, Dims, causal))``, run with ``run``.
  * ``"layer"`` (mechanisms that own their projections: head structure, head mixing,
    routing over heads, ...): ``entry(params, x_BTD, *, context_BSD=None, causal,
    implementation=None, **build(key, LayerDims, causal)) -> y_BTD`` with parameters from
    ``init(key, *, d_model, num_heads, **options)``; run with ``init_layer`` / ``run_layer``.
    Cross-attention passes ``context_BSD`` (keys and values from another sequence).
  * ``"pool"`` (attention pooling heads, not token mixers: learned queries read a sequence):
    ``entry(params, x_BSD, *, valid_BS=None, implementation=None) -> [B, F]`` with parameters
    from ``init(key, *, d_model, **options)``; run with ``init_pool`` / ``run_pool``. The
    stacks do not take them as attention kinds; models take them as a pooling choice.
  * ``"schedule"`` (per-layer mixer schedules, e.g. ``hybrid_schedule``): ``entry(num_layers,
    **options) -> [registry id per layer]``; the stacks expand it (``layer_kinds``).

Entries outside this file register themselves when their module is imported; the modules
listed in ``FAMILY_MODULES`` are imported on first use of the registry.
"""

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attn_jax.attention import _checks
from attn_jax.attention import biases as biases_lib
from attn_jax.attention import masks as masks_lib

SELF, SELF_CAUSAL, CROSS, CROSS_CAUSAL = "self", "self_causal", "cross", "cross_causal"
PATTERNS = (SELF, SELF_CAUSAL, CROSS, CROSS_CAUSAL)
ALL_PATTERNS = frozenset(PATTERNS)
CAUSAL_PATTERNS = frozenset((SELF_CAUSAL, CROSS_CAUSAL))

SOFTMAX_IMPLEMENTATIONS = ("reference", "xla")
# The flash kernels take every mask and option of family (a) except score-bias functions.
KERNEL_IMPLEMENTATIONS = SOFTMAX_IMPLEMENTATIONS + ("pallas_tpu", "pallas_gpu", "pallas_interpret")
_DOT_PRODUCT = "attn_jax.attention.api:dot_product_attention"
# The NNX module of the mask/bias/sink entries (a string: this layer never imports Flax).
NN_ATTENTION = "attn_jax.nn.attention:Attention"


# Modules that register entries of the layer interface (imported lazily: they import this one).
FAMILY_MODULES: tuple[str, ...] = (
  "attn_jax.attention.mla",
  "attn_jax.attention.heads",
  "attn_jax.attention.cross_head",
  "attn_jax.attention.moh",
  "attn_jax.attention.head_routing",
  "attn_jax.attention.longheads",
  "attn_jax.attention.qada",
  "attn_jax.attention.differential",
  "attn_jax.attention.positional",
  "attn_jax.attention.entmax",
  "attn_jax.attention.mgk",
  "attn_jax.attention.tab",
  "attn_jax.attention.relational",
  "attn_jax.attention.coca",
  "attn_jax.attention.temperature",
  "attn_jax.attention.rel_skew",
  "attn_jax.attention.probe",
  "attn_jax.attention.bottleneck",
  "attn_jax.attention.minimal",
  "attn_jax.attention.rel_xl",
  "attn_jax.attention.moba",
  "attn_jax.attention.biformer",
  "attn_jax.attention.nsa",
  "attn_jax.attention.flexprefill",
  "attn_jax.attention.vmoba",
  "attn_jax.attention.landmark",
  "attn_jax.attention.window_2d",
  "attn_jax.attention.dma",
  "attn_jax.attention.routing",
  "attn_jax.attention.neighborhood",
  "attn_jax.attention.multi_window",
  "attn_jax.attention.linear",
  "attn_jax.attention.delta",
  "attn_jax.attention.hybrid",
  "attn_jax.attention.flowformer",
  "attn_jax.attention.agent",
  "attn_jax.attention.aaren",
  "attn_jax.attention.titans",
  "attn_jax.attention.persistent",
)
INTERFACES = ("qkv", "layer", "pool", "schedule")


class LayerDims(NamedTuple):
  """Sizes of a layer-interface call: x ``[B, T, D]``, context ``[B, S, D]`` (S = T for self)."""

  B: int
  T: int
  S: int
  D: int


def pattern_name(*, causal: bool, cross: bool) -> str:
  return (CROSS if cross else SELF) + ("_causal" if causal else "")


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """One registry entry.

  Attributes:
    id: the catalog id.
    family: catalog family letter ("a" .. "k").
    paper: exact paper title (or the baseline's title).
    entry_point: "module:function" of the functional API.
    implementations: implementation names the entry point serves.
    patterns: subset of PATTERNS the entry supports.
    decode: incremental decoding (T=1 against a cache, bottom-right aligned) equals the
      full computation, for steps after any bidirectional prefix.
    tier: catalog tier.
    check: the catalog property the tests assert for this entry.
    build: ``build(key, dims, causal) -> kwargs`` for the entry point.
    module: dotted path of the Flax NNX module, or None until one exists.
    interface: ``"qkv"``, ``"layer"``, ``"pool"`` or ``"schedule"`` (module docstring).
    init: ``"module:function"`` making the parameters of a layer- or pool-interface entry.
  """

  id: str
  family: str
  paper: str
  entry_point: str
  implementations: tuple[str, ...]
  patterns: frozenset
  decode: bool
  tier: int
  check: str
  build: Callable[..., dict] = dataclasses.field(repr=False, compare=False)
  module: str | None = None
  interface: str = "qkv"
  init: str | None = None

  @property
  def causal(self) -> bool:
    return bool(self.patterns & CAUSAL_PATTERNS)

  def function(self) -> Callable:
    return _resolve(self.entry_point)

  def init_function(self) -> Callable:
    if self.init is None:
      raise ValueError(f"mechanism {self.id!r} has the {self.interface!r} interface: no init")
    return _resolve(self.init)

  def as_json(self) -> dict[str, Any]:
    return {
      "id": self.id,
      "family": self.family,
      "paper": self.paper,
      "entry_point": self.entry_point,
      "implementations": list(self.implementations),
      "patterns": [p for p in PATTERNS if p in self.patterns],
      "causal": self.causal,
      "decode": self.decode,
      "tier": self.tier,
      "check": self.check,
      "module": self.module,
      "interface": self.interface,
    }


def _resolve(path: str) -> Callable:
  mod, name = path.split(":")
  return getattr(importlib.import_module(mod), name)


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
  if mechanism.interface not in INTERFACES:
    raise ValueError(f"{mechanism.id}: interface must be one of {INTERFACES}")
  if mechanism.interface in ("layer", "pool") and mechanism.init is None:
    raise ValueError(
      f"{mechanism.id}: a {mechanism.interface}-interface entry needs init='module:function'"
    )
  if mechanism.id in _REGISTRY:
    raise ValueError(f"mechanism id {mechanism.id!r} is already registered")
  bad = set(mechanism.patterns) - ALL_PATTERNS
  if bad or not mechanism.patterns:
    raise ValueError(
      f"{mechanism.id}: patterns must be a non-empty subset of {PATTERNS}; "
      f"got {sorted(mechanism.patterns)}"
    )
  _REGISTRY[mechanism.id] = mechanism
  return mechanism


# Short names people use in configs; each resolves to one registry id.
ALIASES = {"swa": "sliding_window", "local": "sliding_window"}


def canonical_id(mechanism_id: str) -> str:
  return ALIASES.get(mechanism_id, mechanism_id)


_LOADED = False


def _load_families() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    for module in FAMILY_MODULES:
      importlib.import_module(module)


def get(mechanism_id: str) -> Mechanism:
  _load_families()
  try:
    return _REGISTRY[canonical_id(mechanism_id)]
  except KeyError:
    raise ValueError(
      f"unknown attention mechanism {mechanism_id!r}; registered ids: {sorted(_REGISTRY)} "
      f"(aliases: {ALIASES})"
    ) from None


def _listing_key(item: tuple[int, Mechanism]) -> tuple:
  """Family, then the defining module (built-ins first, then ``FAMILY_MODULES`` order), then
  registration order: the same listing whichever family module was imported first."""
  seq, m = item
  module = m.entry_point.partition(":")[0]
  rank = FAMILY_MODULES.index(module) + 1 if module in FAMILY_MODULES else 0
  return m.family, rank, seq


def all_mechanisms() -> list[Mechanism]:
  _load_families()
  return [m for _, m in sorted(enumerate(_REGISTRY.values()), key=_listing_key)]


def run(
  mechanism_id: str,
  q,
  k,
  v,
  *,
  causal: bool,
  cross: bool = False,
  key=None,
  implementation: str | None = None,
  **overrides,
):
  """Runs a registered mechanism on q/k/v in one of the four patterns.

  Args:
    mechanism_id: a registry id.
    q, k, v: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``.
    causal: causal (bottom-right aligned) or not.
    cross: cross-attention (keys from another sequence). Self-attention needs S == T.
    key: PRNG key for options the entry draws (segment ids, bias, sinks); default key 0.
    implementation: passed to the entry point.
    overrides: replace options that ``build`` makes.

  Raises:
    ValueError: the pattern is not declared by the entry, or S != T for self-attention.
  """
  mech = get(mechanism_id)
  _check_interface(mech, "qkv")
  dims = _checks.check_qkv(q, k, v)
  if not cross and dims.S != dims.T:
    raise ValueError(
      f"self-attention needs S == T; got T={dims.T}, S={dims.S} (pass "
      "cross=True for cross-attention)"
    )
  _check_pattern(mech, causal=causal, cross=cross)
  key = jax.random.key(0) if key is None else key
  kwargs = mech.build(key, dims, causal)
  kwargs.update(overrides)
  return mech.function()(q, k, v, implementation=implementation, **kwargs)


def _check_pattern(mech: Mechanism, *, causal: bool, cross: bool) -> None:
  pattern = pattern_name(causal=causal, cross=cross)
  if pattern not in mech.patterns:
    raise ValueError(
      f"mechanism {mech.id!r} does not support the {pattern!r} pattern; it "
      f"supports {[p for p in PATTERNS if p in mech.patterns]}"
    )


def init_layer(mechanism_id: str, key, *, d_model: int, num_heads: int, **options):
  """Parameters of a layer-interface entry (a pytree of arrays)."""
  mech = get(mechanism_id)
  _check_interface(mech, "layer")
  return mech.init_function()(key, d_model=d_model, num_heads=num_heads, **options)


def run_layer(
  mechanism_id: str,
  params,
  x_BTD,
  *,
  causal: bool,
  context_BSD=None,
  key=None,
  implementation: str | None = None,
  **overrides,
):
  """Runs a layer-interface entry on ``x [B, T, D]`` (cross-attention when ``context_BSD``)."""
  mech = get(mechanism_id)
  _check_interface(mech, "layer")
  if getattr(x_BTD, "ndim", None) != 3:
    raise ValueError(f"x must have shape [B, T, D]; got {getattr(x_BTD, 'shape', x_BTD)}")
  cross = context_BSD is not None
  _check_pattern(mech, causal=causal, cross=cross)
  B, T, D = x_BTD.shape
  S = context_BSD.shape[1] if cross else T
  key = jax.random.key(0) if key is None else key
  kwargs = mech.build(key, LayerDims(B, T, S, D), causal)
  kwargs.update(overrides)
  if cross:
    kwargs["context_BSD"] = context_BSD
  return mech.function()(params, x_BTD, causal=causal, implementation=implementation, **kwargs)


def init_pool(mechanism_id: str, key, *, d_model: int, **options):
  """Parameters of a pool-interface entry (a pytree of arrays)."""
  mech = get(mechanism_id)
  _check_interface(mech, "pool")
  return mech.init_function()(key, d_model=d_model, **options)


def run_pool(mechanism_id: str, params, x_BSD, *, valid_BS=None, implementation=None):
  """Runs a pool-interface entry: ``x [B, S, D]`` (``valid_BS``: which tokens exist) to
  ``[B, F]``."""
  mech = get(mechanism_id)
  _check_interface(mech, "pool")
  return mech.function()(params, x_BSD, valid_BS=valid_BS, implementation=implementation)


_USE = {
  "qkv": "run",
  "layer": "init_layer / run_layer",
  "pool": "init_pool / run_pool",
  "schedule": "its function (layer ids) and the stack",
}


def _check_interface(mech: Mechanism, wanted: str) -> None:
  if mech.interface != wanted:
    raise ValueError(
      f"mechanism {mech.id!r} has the {mech.interface!r} interface: use {_USE[mech.interface]}"
    )


# ---------------------------------------------------------------------------------------
# Builders: options for a call of given dims (deterministic in the key; parameters that do
# not depend on T/S, like sinks or slopes, are the same for every length so decoding and
# full runs agree).
# ---------------------------------------------------------------------------------------

WINDOW = 8
CHUNK = 8
PREFIX = 5


def _causal_or_none(causal):
  return masks_lib.CausalMask() if causal else None


def _and(a, b):
  return b if a is None else (a if b is None else a & b)


def build_nothing(key, dims, causal):
  """The ``build`` of entries whose calls need no arguments beyond the pattern's."""
  del key, dims, causal
  return {}


def _build_plain(key, dims, causal):
  return {"mask": _causal_or_none(causal)}


def _build_window(key, dims, causal):
  if causal:
    return {"mask": masks_lib.sliding_window(WINDOW)}
  return {"mask": masks_lib.LocalMask(WINDOW - 1, WINDOW - 1)}


SINKS = 2


def _build_sink_window(key, dims, causal):
  return {"mask": masks_lib.sink_window(WINDOW, SINKS)}


def _build_chunked(key, dims, causal):
  return {"mask": masks_lib.ChunkedCausalMask(CHUNK)}


def _build_prefix(key, dims, causal):
  return {"mask": masks_lib.PrefixLMMask(PREFIX)}


def random_segment_ids(key, batch: int, length: int, num_segments: int = 3):
  """Sorted ids in [1, num_segments] ([B, length]): packed documents, no padding."""
  ids = jax.random.randint(key, (batch, length), 1, num_segments + 1)
  return jnp.sort(ids, axis=-1).astype(jnp.int32)


def _build_segment(key, dims, causal):
  kq, kk = jax.random.split(key)
  q_ids = random_segment_ids(kq, dims.B, dims.T)
  kv_ids = q_ids if dims.S == dims.T else random_segment_ids(kk, dims.B, dims.S)
  return {"mask": _and(masks_lib.SegmentMask(q_ids, kv_ids), _causal_or_none(causal))}


def _build_bias(key, dims, causal):
  bias = jax.random.normal(key, (dims.B, dims.N, dims.T, dims.S), jnp.float32)
  return {"mask": _causal_or_none(causal), "bias": bias}


def _build_alibi(key, dims, causal):
  return {"mask": masks_lib.CausalMask(), "bias": biases_lib.AlibiBias.default(dims.N)}


PERIOD = 4


def _build_periodic(key, dims, causal):
  if causal:
    return {"mask": masks_lib.CausalMask(), "bias": biases_lib.PeriodicBias(PERIOD, dims.N)}
  return {"mask": masks_lib.AlignmentMask(max(1, dims.S // dims.T))}


EXISTENCE_MAX_LEN = 1024


def _build_existence(key, dims, causal):
  # Drawn at a fixed length and sliced, so a decode step sees the same p_j as the full run.
  if dims.S > EXISTENCE_MAX_LEN:
    raise ValueError(f"the existence_bias builder covers S <= {EXISTENCE_MAX_LEN}; got {dims.S}")
  logits = 3.0 + jax.random.normal(key, (dims.B, EXISTENCE_MAX_LEN), jnp.float32)[:, : dims.S]
  return {"mask": _causal_or_none(causal), "bias": biases_lib.existence_bias(logits)}


def _build_softcap(key, dims, causal):
  return {"mask": _causal_or_none(causal), "softcap": 2.0}


def _build_sinks(key, dims, causal):
  return {"mask": _causal_or_none(causal), "sinks": jax.random.normal(key, (dims.N,), jnp.float32)}


def _softmax_entry(
  id, paper, build, patterns, decode, check, tier=1, module=NN_ATTENTION, kernels=True
):
  return register(
    Mechanism(
      id=id,
      family="a",
      paper=paper,
      entry_point=_DOT_PRODUCT,
      implementations=KERNEL_IMPLEMENTATIONS if kernels else SOFTMAX_IMPLEMENTATIONS,
      patterns=patterns,
      decode=decode,
      tier=tier,
      check=check,
      build=build,
      module=module,
    )
  )


_softmax_entry(
  "mha",
  "Attention Is All You Need (baseline: scaled dot-product multi-head attention)",
  _build_plain,
  ALL_PATTERNS,
  True,
  "blocked equals the oracle at awkward sizes (fp32, bf16); non-causal output invariant to "
  "permuting (k, v) pairs jointly",
)
_softmax_entry(
  "causal",
  "Causal mask (baseline; causality test of CAB: Comprehensive Attention "
  "Benchmarking on Long Sequence Modeling)",
  _build_plain,
  CAUSAL_PATTERNS,
  True,
  "output at i equal from the full sequence, from the prefix [0, i], and by decoding",
)
_softmax_entry(
  "cross_patterns",
  "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling",
  _build_plain,
  ALL_PATTERNS,
  True,
  "every entry runs its declared patterns against the oracle and raises on the others; "
  "S = 1 and S >> T work",
  module=None,
)
_softmax_entry(
  "sliding_window",
  "Local / sliding-window mask (baseline)",
  _build_window,
  ALL_PATTERNS,
  True,
  "w >= T equals causal; w = 1 returns v_i; work grows linearly in T for fixed w",
)
_softmax_entry(
  "sink_window",
  "Efficient Streaming Language Models with Attention Sinks (baseline; the streaming heads of "
  "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads)",
  _build_sink_window,
  CAUSAL_PATTERNS,
  True,
  "n_sink = 0 equals sliding_window and w >= T equals causal; the tile map is the first "
  "kv-block column plus the diagonal band; decoding from a cache of n_sink + w − 1 entries "
  "(constant in T) equals the full row",
)
_softmax_entry(
  "chunked_causal",
  "Chunked (block-diagonal) causal attention (baseline)",
  _build_chunked,
  CAUSAL_PATTERNS,
  True,
  "c >= T equals causal; c = 1 returns v_i",
)
_softmax_entry(
  "segment",
  "Segment / document masking for packed sequences (baseline)",
  _build_segment,
  ALL_PATTERNS,
  False,
  "a packed batch equals each document run alone; padding-id rows return zeros",
)


_softmax_entry(
  "existence_bias",
  "Zonkey: A Hierarchical Diffusion Language Model with Differentiable Tokenization and "
  "Probabilistic Attention",
  _build_existence,
  ALL_PATTERNS,
  True,
  "log p_j (a cumulative product of continue probabilities) added to key j's logits as a "
  "[B, 1, 1, S] bias: p ≡ 1 equals plain attention, p_j = 0 equals masking key j",
  tier=3,
)
_softmax_entry(
  "periodic_bias",
  "FaceFormer: Speech-Driven 3D Facial Animation with Transformers",
  _build_periodic,
  frozenset((SELF_CAUSAL, CROSS_CAUSAL, CROSS)),
  True,
  "causal self-attention with the stepped bias −⌊(i − j)/p⌋ computed in-tile (p >= T equals "
  "causal); cross-attention with the alignment mask: frame i sees exactly keys "
  "[k·i, k·(i + 1))",
  tier=3,
  kernels=False,
)


def _build_signed(key, dims, causal):
  return {"mask": _causal_or_none(causal), "signed": True}


register(
  Mechanism(
    id="cog_attn",
    family="e",
    paper="More Expressive Attention with Negative Weights",
    entry_point=_DOT_PRODUCT,
    implementations=SOFTMAX_IMPLEMENTATIONS,
    patterns=ALL_PATTERNS,
    decode=True,
    tier=2,
    check="If all logits are >= 0, it equals softmax. In every row, Σ_j |p_ij| = 1. (The "
    "blocked xla path takes the running max and sum over |s|; not built in the Pallas "
    "kernels.)",
    build=_build_signed,
    module=NN_ATTENTION,
  )
)


def _build_group(key, dims, causal):
  kq, kk, kt = jax.random.split(key, 3)
  q_groups = jax.random.randint(kq, (dims.B, dims.T), 0, 3)
  kv_groups = q_groups if dims.S == dims.T else jax.random.randint(kk, (dims.B, dims.S), 0, 3)
  table = jax.random.bernoulli(kt, 0.5, (3, 3)) | jnp.eye(3, dtype=bool)
  group = masks_lib.GroupMask(q_groups, kv_groups, table=table)
  return {"mask": _and(group, _causal_or_none(causal))}


_softmax_entry(
  "group_mask",
  "Seeing is Understanding: Unlocking Causal Attention into Modality-Mutual Attention for "
  "Multimodal LLMs; Uni-Encoder: A Fast and Accurate Response Selection Paradigm for "
  "Generation-Based Dialogue Systems; UniCombine: Unified Multi-Conditional Combination with "
  "Diffusion Transformer; Improving Multi-Subject Consistency in Open-Domain Image Generation "
  "with Isolation and Reposition Attention; Lightning Fast Caching-based Parallel Denoising "
  "Prediction for Accelerating Talking Head Generation",
  _build_group,
  ALL_PATTERNS,
  False,
  "An all-true table plus causal equals `causal`. Under the modality-mutual rule, text-token "
  "rows are unchanged and no token sees an answer token placed after it. (GroupMask is not "
  "lowered for the Pallas kernels; the stack layer takes groups from the options "
  "group_starts/group_table/group_rule or per-token group_ids_BT.)",
  tier=2,
  kernels=False,
)
_softmax_entry(
  "prefix_lm",
  "Prefix-LM mask (baseline)",
  _build_prefix,
  CAUSAL_PATTERNS,
  True,
  "P = 0 equals causal; P = T equals non-causal attention",
)
_softmax_entry(
  "bias",
  "Additive attention bias (baseline); Cones 2: Customizable Image Synthesis with "
  "Multiple Subjects",
  _build_bias,
  ALL_PATTERNS,
  False,
  "bias gradient equals the oracle; a -inf bias equals masking; a per-row constant bias "
  "changes nothing",
  module=None,
)
_softmax_entry(
  "alibi",
  "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
  _build_alibi,
  CAUSAL_PATTERNS,
  True,
  "slope 0 equals causal; the in-tile bias equals the dense bias tensor; shifting all "
  "positions changes nothing",
  kernels=False,  # an in-tile score-bias function: the flash kernels take dense biases only
)
_softmax_entry(
  "softcap",
  "Gemma 2: Improving Open Language Models at a Practical Size (logit soft-capping)",
  _build_softcap,
  ALL_PATTERNS,
  True,
  "c -> inf equals plain attention; capped logits lie in (-c, c); gradient equals the oracle",
)
_softmax_entry(
  "sinks",
  "Efficient Streaming Language Models with Attention Sinks (sink logit, off-by-one softmax)",
  _build_sinks,
  ALL_PATTERNS,
  True,
  "sigma -> -inf equals softmax; equals the oracle with one extra zero-value key of logit "
  "sigma; row sums in (0, 1)",
)


def _build_rope(key, dims, causal):
  # Positions default (kv j at j, query i at S - T + i: bottom-right aligned, like the masks).
  return {"mask": _causal_or_none(causal)}


register(
  Mechanism(
    id="rope",
    family="a",
    paper="Rotary position embedding (baseline: RoFormer: Enhanced Transformer with Rotary "
    "Position Embedding)",
    entry_point="attn_jax.attention.rope:rope_attention",
    implementations=KERNEL_IMPLEMENTATIONS,
    patterns=ALL_PATTERNS,
    decode=True,
    tier=1,
    check="logits depend only on i − j: shifting all positions changes nothing; r = 0 equals "
    "no positional encoding; decode with a cache equals full prefill",
    build=_build_rope,
    module=NN_ATTENTION,
  )
)

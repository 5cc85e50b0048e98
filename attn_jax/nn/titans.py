"""Test-time memory layers of the stacks (catalog family (h)): ``persistent_mem`` (GQA
attention with learned persistent key/value tokens), ``titans_lmm`` (the neural long-term
memory alone as a token mixer), ``titans_mac`` (memory as context), ``titans_mag`` (memory
as gate) and ``titans_mal`` (memory as layer); they call ``attn_jax.attention.persistent``
and ``attn_jax.attention.titans``.

Options: ``persistent_tokens`` (P of ``persistent_mem``); ``titans_persistent`` (P of MAC /
MAG), ``titans_memory_layers`` (depth of the memory MLP), ``titans_memory_hidden`` (its width,
-1: 2·H), ``titans_chunk`` (the memory's mini-batch C), ``titans_segment`` (MAC's L),
``titans_window`` (MAG's attention window). The generic keys are declared and ignored. The
Titans layers are causal, with positions "none" or "learned"; packed documents restart the
memory.
"""

from attn_jax.attention import persistent as persistent_lib
from attn_jax.attention import titans as titans_lib
from attn_jax.nn import functional

_MEMORY = {"titans_memory_layers": 2, "titans_memory_hidden": -1}
_POSITIONS = ("none", "learned")

PersistentMemoryAttention = functional.functional_layer(
  "PersistentMemoryAttention",
  "persistent_mem",
  persistent_lib.param_specs,
  persistent_lib.persistent_mem_layer,
  options={"persistent_tokens": 4},
  doc="GQA attention with persistent memory tokens; constructor arguments as "
  "``attn_jax.nn.attention.Attention``.",
  module=__name__,
)

TitansMemoryAttention = functional.functional_layer(
  "TitansMemoryAttention",
  "titans_lmm",
  titans_lib.lmm_param_specs,
  titans_lib.titans_memory_layer,
  options={**_MEMORY, "titans_chunk": 64},
  positions=_POSITIONS,
  causal_only=True,
  call_options=("titans_chunk",),
  doc="The Titans neural long-term memory as a token mixer; constructor arguments as "
  "``attn_jax.nn.attention.Attention``.",
  module=__name__,
)

TitansMAC = functional.functional_layer(
  "TitansMAC",
  "titans_mac",
  titans_lib.mac_param_specs,
  titans_lib.titans_mac,
  options={"titans_persistent": 4, **_MEMORY, "titans_segment": 64},
  positions=_POSITIONS,
  causal_only=True,
  call_options=("titans_segment",),
  doc="Titans memory as context; constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)

TitansMAG = functional.functional_layer(
  "TitansMAG",
  "titans_mag",
  titans_lib.mag_param_specs,
  titans_lib.titans_mag,
  options={"titans_persistent": 4, **_MEMORY, "titans_window": 64, "titans_chunk": 64},
  positions=_POSITIONS,
  causal_only=True,
  call_options=("titans_window", "titans_chunk"),
  doc="Titans memory as gate; constructor arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)

TitansMAL = functional.functional_layer(
  "TitansMAL",
  "titans_mal",
  titans_lib.mal_param_specs,
  titans_lib.titans_mal,
  options={"titans_persistent": 4, **_MEMORY, "titans_window": 64, "titans_chunk": 64},
  positions=_POSITIONS,
  causal_only=True,
  call_options=("titans_window", "titans_chunk"),
  doc="Titans memory as a layer (memory, then sliding-window attention); constructor "
  "arguments as ``attn_jax.nn.attention.Attention``.",
  module=__name__,
)

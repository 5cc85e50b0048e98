"""Model families built from ``attn_jax.nn``: a causal decoder LM and a bidirectional encoder."""

from attn_jax.models import decoder_lm, encoder

MODELS = {"decoder_lm": decoder_lm.DecoderLM, "encoder": encoder.Encoder}
VARIANTS = {"decoder_lm": decoder_lm.VARIANTS, "encoder": encoder.VARIANTS}


def build(name: str, *, rngs, **kwargs):
  """Builds model family ``name`` with keyword arguments (ValueError if unknown)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
  return MODELS[name](rngs=rngs, **kwargs)

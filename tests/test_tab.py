"""Attention bottleneck (tab): row sums of the map lie in [0, 1]; a zeroed map makes the
output independent of the keys' tokens (the image); the flash path with the null-slot logit
equals the float64 reference (values and gradients); the edit path equals the layer; bad
input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal

from attn_jax.attention import registry
from attn_jax.attention import tab as tab_lib

D = 16


def close(a, b, tol):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol
  )


def test_row_sums_in_unit_interval_and_zero_map_blocks_the_image(rng):
  kp, kx, kc, kn = jax.random.split(rng, 4)
  params = registry.init_layer("tab", kp, d_model=D, num_heads=1, dtype=jnp.float64)
  params["null_logit"] = jnp.array([1.5])
  text = normal(kx, (2, 6, D), jnp.float64)
  image = normal(kc, (2, 12, D), jnp.float64)
  amap = tab_lib.tab_map(params, text, context_BSD=image, causal=False)
  sums = np.asarray(amap.sum(-1))
  assert sums.shape == (2, 1, 6) and np.all(sums > 0) and np.all(sums < 1)
  # The map reproduces the layer, and an all-zero map passes no image information.
  close(
    tab_lib.tab_from_map(params, amap, text, context_BSD=image),
    tab_lib.tab(params, text, context_BSD=image, causal=False, implementation="reference"),
    1e-12,
  )
  zero = jnp.zeros_like(amap)
  g = jax.grad(lambda img: jnp.sum(tab_lib.tab_from_map(params, zero, text, context_BSD=img) ** 2))(
    image
  )
  assert float(jnp.abs(g).max()) == 0.0
  other = normal(kn, image.shape, jnp.float64)
  close(
    tab_lib.tab_from_map(params, zero, text, context_BSD=other),
    tab_lib.tab_from_map(params, zero, text, context_BSD=image),
    0.0,
  )
  # A very negative null logit recovers plain softmax rows (sums 1); a very positive one
  # sends the mass to the null slot (sums 0).
  for logit, want in ((-60.0, 1.0), (60.0, 0.0)):
    p = dict(params, null_logit=jnp.array([logit]))
    close(tab_lib.tab_map(p, text, context_BSD=image, causal=False).sum(-1), want, 1e-12)


def test_flash_path_equals_float64_reference_with_gradients(rng):
  kp, kx, kw = jax.random.split(rng, 3)
  params = registry.init_layer("tab", kp, d_model=D, num_heads=2, dtype=jnp.float64)
  params["null_logit"] = jnp.array([0.7, -0.4])
  x = normal(kx, (2, 11, D), jnp.float64)
  w_out = normal(kw, (2, 11, D), jnp.float64)

  def loss(p, x, impl):
    return jnp.sum(tab_lib.tab(p, x, causal=True, implementation=impl) * w_out.astype(x.dtype))

  grad = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)
  want, want_g = grad(params, x, "reference")
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  got, got_g = grad(f32, x.astype(jnp.float32), "xla")
  close(got, want, 1e-4)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    close(g, w, 2e-4)
  assert float(jnp.abs(want_g[0]["null_logit"]).min()) > 0  # the null slot is trained


def test_bad_input_messages(rng):
  params = registry.init_layer("tab", rng, d_model=D, num_heads=1)
  x = normal(rng, (2, 5, D), jnp.float32)
  with pytest.raises(ValueError, match="tab params must hold"):
    tab_lib.tab({k: params[k] for k in ("w_q", "w_k")}, x, causal=True)
  with pytest.raises(ValueError, match=r"params\['null_logit'\] must have shape \(1,\)"):
    tab_lib.tab(dict(params, null_logit=jnp.zeros(2)), x, causal=True)
  with pytest.raises(ValueError, match="map_BNTS must have shape"):
    tab_lib.tab_from_map(params, jnp.zeros((2, 1, 5, 4)), x)

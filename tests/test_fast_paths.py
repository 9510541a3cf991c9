"""The train step's fast paths stay taken: the GPU speed in BENCHMARKS.md depends on them, and a change that
falls off one keeps every output equal, so only these checks would notice."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixrec_jax.models import layers, siglip
from pixrec_jax.models.config import Runtime, VisionConfig


def test_full_size_tiles_reach_attention_with_no_mask(monkeypatch):
  """cuDNN runs its unmasked kernel only when no mask is passed; an all-True mask took the masked one."""
  cfg = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                     patch_size=4)
  graphdef, state = nnx.split(siglip.VisionTransformer(cfg, Runtime(), nnx.Rngs(0)))
  tower = jax.jit(lambda state, pixels, patch_mask: nnx.merge(graphdef, state)(pixels, patch_mask))
  masks = []  # what each traced call hands to attention
  real = layers.attention
  monkeypatch.setattr(layers, "attention", lambda q, k, v, mask, *a, **kw: masks.append(mask) or real(q, k, v, mask,
                                                                                                          *a, **kw))
  pixels = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  full = tower(state, pixels, None)
  assert masks == [None]
  # The same features as the masked path with every patch real (raster positions, nothing masked).
  masked = tower(state, pixels, jnp.ones((3, 4, 4), bool))
  assert masks[-1] is not None
  np.testing.assert_allclose(np.asarray(full), np.asarray(masked), rtol=1e-6, atol=1e-6)
  # A smaller image (NaViT positions) still takes the masked path.
  tower(state, pixels[:, :, :8, :8], None)
  assert len(masks) == 3 and masks[-1] is not None


def test_xla_attention_never_transposes_its_logits():
  """The (B, K, G, T, S) logits leave the matmul in the order the softmax reads them, forward and backward."""
  b, t, s, n, kv, h = 2, 24, 40, 4, 2, 8
  q = jax.random.normal(jax.random.key(0), (b, t, n, h))
  k = jax.random.normal(jax.random.key(1), (b, s, kv, h))
  v = jax.random.normal(jax.random.key(2), (b, s, kv, h))
  mask = jax.random.bernoulli(jax.random.key(3), 0.8, (b, 1, t, s))

  def loss(q, k, v):
    return jnp.sum(layers.attention(q, k, v, mask, 0.3, softcap=5.0) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  big = [e for e in jaxpr.eqns if e.primitive.name == "transpose" and t * s in
         [int(np.prod(x.aval.shape[-2:])) for x in e.invars]]
  assert not big, [str(e) for e in big]

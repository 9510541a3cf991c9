"""The SigLIP vision transformer, in two variants.

SmolVLM's (HF `Idefics3VisionTransformer`, `variable_size=True`): images of
variable size arrive padded to one shape with a patch mask; padded patches are
excluded as attention keys, and position ids of real patches are rescaled onto
the full position grid (NaViT-style), as Hugging Face does.

PaliGemma's (HF `SiglipVisionModel` without its pooling head, `variable_size=False`):
every image has the configured size and patch i takes position embedding i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixrec_jax import sharding
from pixrec_jax.models import layers, scan
from pixrec_jax.models.config import Runtime, VisionConfig


class PatchEmbedding(nnx.Module):
  """A stride-p, kernel-p convolution written as one matmul over flattened patches."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs):
    p, c = cfg.patch_size, cfg.num_channels
    self.patch_size = p
    self.dtype = rt.compute_dtype
    # HWIO layout, like a Flax conv kernel.
    self.kernel = layers.param(rngs, nnx.initializers.normal(0.02), (p, p, c, cfg.hidden_size), rt.params_dtype,
                               ("patch", "patch", None, "embed"))
    self.bias = layers.param(rngs, nnx.initializers.zeros, (cfg.hidden_size,), rt.params_dtype, ("embed",))

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """(N, C, H, W) -> (N, H/p * W/p, D), patches in row-major order."""
    n, c, h, w = pixel_values.shape
    p = self.patch_size
    x = pixel_values.astype(self.dtype).reshape(n, c, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)
    kernel = self.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
    return x @ kernel + self.bias[...].astype(self.dtype)


class VisionEmbeddings(nnx.Module):

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs):
    self.patches_per_side = cfg.patches_per_side
    self.patch_embedding = PatchEmbedding(cfg, rt, rngs)
    self.position_embedding = layers.Embed(cfg.patches_per_side**2, cfg.hidden_size, axes=("position", "embed"),
                                           dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)

  def position_ids(self, patch_mask: jax.Array) -> jax.Array:
    """Bucketised fractional coordinates of the real patches; padded patches get 0.

    The bucket boundaries are k/n computed exactly. Hugging Face builds them with a
    float `torch.arange`, which can be one ulp off for grids that are not a power of
    two and then shifts a few ids; for power-of-two grids (SmolVLM: 32) both agree.
    """
    n = self.patches_per_side
    boundaries = jnp.asarray((np.arange(1, n) / n).astype(np.float32))
    rows = jnp.sum(patch_mask[:, :, 0], axis=1)
    cols = jnp.sum(patch_mask[:, 0, :], axis=1)
    max_h, max_w = patch_mask.shape[1:]
    limit = jnp.float32(1.0 - 1e-6)
    step_h = jnp.float32(1.0) / rows.astype(jnp.float32)
    step_w = jnp.float32(1.0) / cols.astype(jnp.float32)
    frac_h = jnp.minimum(jnp.arange(max_h, dtype=jnp.float32)[None, :] * step_h[:, None], limit)
    frac_w = jnp.minimum(jnp.arange(max_w, dtype=jnp.float32)[None, :] * step_w[:, None], limit)
    bucket_h = jnp.searchsorted(boundaries, frac_h, side="right")
    bucket_w = jnp.searchsorted(boundaries, frac_w, side="right")
    ids = (bucket_h[:, :, None] * n + bucket_w[:, None, :]).reshape(patch_mask.shape[0], -1)
    return jnp.where(patch_mask.reshape(patch_mask.shape[0], -1), ids, 0)

  def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array | None) -> jax.Array:
    """patch_mask None: a full-size image, positions in raster order."""
    if patch_mask is None:
      positions = jnp.arange(self.patches_per_side**2, dtype=jnp.int32)[None]
    else:
      positions = self.position_ids(patch_mask)
    return self.patch_embedding(pixel_values) + self.position_embedding(positions)


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.head_dim = d // cfg.num_attention_heads
    self.implementation = rt.attention
    kw = dict(use_bias=True, dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)
    self.q_proj = layers.Linear(d, d, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, d, axes=("embed", "heads"), **kw)
    self.v_proj = layers.Linear(d, d, axes=("embed", "heads"), **kw)
    self.out_proj = layers.Linear(d, d, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    q, k, v = layers.side_by_side(x, (self.q_proj, self.k_proj, self.v_proj))
    out = layers.attention(split(q), split(k), split(v), mask, self.head_dim**-0.5, self.implementation)
    return self.out_proj(out.reshape(b, t, -1))


class VisionMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)
    self.act = layers.activation(cfg.hidden_act)
    self.fc1 = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nnx.Module):

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs):
    self.layer_norm1 = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=rt.params_dtype, rngs=rngs)
    self.self_attn = VisionAttention(cfg, rt, rngs)
    self.layer_norm2 = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=rt.params_dtype, rngs=rngs)
    self.mlp = VisionMLP(cfg, rt, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = layers.residual_barrier(x)
    x = x + self.self_attn(self.layer_norm1(x), mask)
    x = x + self.mlp(self.layer_norm2(x))
    return sharding.constrain(x, ("batch", "length", None))


class VisionEncoder(nnx.Module):
  """The encoder layers, looped or scanned (see `Runtime`)."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs):
    self.scan_layers = rt.scan_layers
    self.remat = rt.remat
    self.layers = scan.layer_stack(lambda: VisionEncoderLayer(cfg, rt, rngs), cfg.num_hidden_layers, rt.scan_layers)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    call = lambda layer, x, _: layer(x, mask)
    if self.scan_layers:
      return scan.scan(self.layers, x, call, remat_name=self.remat)
    call = scan.remat(call, self.remat)
    for layer in self.layers:
      x = call(layer, x, None)
    return x


class VisionTransformer(nnx.Module):
  """Pixels (N, C, H, W) -> patch features (N, H/p * W/p, D)."""

  def __init__(self, cfg: VisionConfig, rt: Runtime, rngs: nnx.Rngs, *, variable_size: bool = True):
    self.cfg = cfg
    self.variable_size = variable_size
    self.embeddings = VisionEmbeddings(cfg, rt, rngs)
    self.encoder = VisionEncoder(cfg, rt, rngs)
    self.post_layernorm = layers.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=rt.params_dtype,
                                           rngs=rngs)

  def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
    n, _, h, w = pixel_values.shape
    p = self.cfg.patch_size
    full_size = (h, w) == (self.cfg.image_size,) * 2
    if not self.variable_size:
      if patch_mask is not None:
        raise ValueError("this vision tower (PaliGemma's SigLIP) reads full-size images only: it takes no patch mask")
      if not full_size:
        raise ValueError(f"images must be {self.cfg.image_size}x{self.cfg.image_size}, got {h}x{w}")
    if patch_mask is None and full_size:
      # Every patch real: raster positions (what position_ids gives for a full grid) and no key mask, so a
      # fused attention kernel takes its unmasked path instead of reading an all-True mask.
      return self.post_layernorm(self.encoder(self.embeddings(pixel_values, None), None))
    if patch_mask is None:
      patch_mask = jnp.ones((n, h // p, w // p), dtype=bool)
    x = self.embeddings(pixel_values, patch_mask)
    key_mask = patch_mask.reshape(n, 1, 1, -1)  # padded patches are never attended to
    return self.post_layernorm(self.encoder(x, key_mask))

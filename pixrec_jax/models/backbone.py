"""The backbone: a vision-language model (SmolVLM, PaliGemma 2), or a text-only Llama.

The four top-level slots are named by role, the same for every family, so that
PixRec, the training filters and the sharding rules address them alike:
`vision_model`, `connector` (vision features -> text width), `text_model` and
`lm_head` (absent when tied). Inside each slot, names follow the Hugging Face
modules (`connector.modality_projection.proj` for SmolVLM, `connector.linear` for
PaliGemma's `multi_modal_projector.linear`), so the conversion table in
`pixrec_jax.convert.hf` stays short.

Called with Hugging Face's argument names and shapes, `Backbone` returns logits
and last hidden states; PixRec uses its pieces (`image_features`, `embed`,
`hidden_states`, `logits`) so that an image's features are computed once and
reused by several passes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixrec_jax import sharding
from pixrec_jax.models import layers
from pixrec_jax.models.config import BackboneConfig, Runtime
from pixrec_jax.models.gemma2 import Gemma2Model
from pixrec_jax.models.llama import LlamaModel
from pixrec_jax.models.siglip import VisionTransformer


class BackboneOutput(NamedTuple):
  logits: jax.Array  # (B, T, V) float32
  last_hidden_state: jax.Array  # (B, T, D)


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """(N, S, D) -> (N, S / scale^2, D * scale^2), in Hugging Face's Idefics3 order."""
  n, seq, d = x.shape
  side = int(round(seq**0.5))
  x = x.reshape(n, side, side // scale, d * scale)
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(n, side // scale, side // scale, d * scale * scale)
  x = x.transpose(0, 2, 1, 3)
  return x.reshape(n, seq // (scale * scale), d * scale * scale)


class ModalityProjection(nnx.Module):

  def __init__(self, cfg: BackboneConfig, rt: Runtime, rngs: nnx.Rngs):
    self.proj = layers.Linear(cfg.vision.hidden_size * cfg.scale_factor**2, cfg.text.hidden_size, axes=("proj", "embed"),
                              dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class Connector(nnx.Module):
  """Pixel shuffle (fewer, wider tokens) then a linear map into the text width."""

  def __init__(self, cfg: BackboneConfig, rt: Runtime, rngs: nnx.Rngs):
    self.scale_factor = cfg.scale_factor
    self.modality_projection = ModalityProjection(cfg, rt, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.modality_projection(pixel_shuffle(x, self.scale_factor))


class MultiModalProjector(nnx.Module):
  """PaliGemma's connector: one linear map (with bias) from SigLIP's width to the text width.

  In transformers 5.24 the image features are not rescaled: the sqrt(hidden) scale
  of Gemma's embeddings applies to looked-up tokens only, never to image rows.
  """

  def __init__(self, cfg: BackboneConfig, rt: Runtime, rngs: nnx.Rngs):
    self.linear = layers.Linear(cfg.vision.hidden_size, cfg.text.hidden_size, axes=("proj", "embed"), use_bias=True,
                                dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x)


def merge_image_features(input_ids: jax.Array, text_embeds: jax.Array, image_features: jax.Array,
                         image_valid: jax.Array, image_token_id: int) -> jax.Array:
  """Writes image features at the image-token positions, in order.

  The k-th image token of the batch (row-major over batch and position) receives
  the k-th feature row of the valid images, exactly as Hugging Face's
  `masked_scatter`. image_features: (N, T, D); image_valid: (N,).
  Static shapes: invalid (padding) images are computed but never read.
  """
  b, s, d = text_embeds.shape
  n, t, _ = image_features.shape
  # Any token may take any image's row, so every device holds the (small) feature table whole: the lookup
  # is then local to each device's tokens and its gradient a sum over devices. Left to itself, GSPMD shards
  # the table's features and reshards the (much larger) token activations around the lookup by
  # replicating them ("involuntary full rematerialization" on a data x fsdp mesh).
  flat = sharding.constrain(image_features.reshape(n * t, d).astype(text_embeds.dtype), (None, None))
  row_valid = jnp.repeat(image_valid.astype(bool), t)
  (valid_rows,) = jnp.nonzero(row_valid, size=n * t, fill_value=0)
  is_image = (input_ids == image_token_id).reshape(-1)
  rank = jnp.clip(jnp.cumsum(is_image) - 1, 0, n * t - 1)
  gathered = flat[valid_rows[rank]].reshape(b, s, d)
  return jnp.where(is_image.reshape(b, s, 1), gathered, text_embeds)


def patch_mask_from_pixels(pixel_attention_mask: jax.Array, patch_size: int) -> jax.Array:
  """(N, H, W) pixel mask -> (N, H/p, W/p): a patch is real if any of its pixels is."""
  n, h, w = pixel_attention_mask.shape
  m = pixel_attention_mask.astype(bool).reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
  return jnp.any(m, axis=(2, 4))


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


class Backbone(nnx.Module):

  def __init__(self, cfg: BackboneConfig, rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.runtime = rt
    paligemma = cfg.model_type == "paligemma"
    if cfg.is_vlm:
      self.vision_model = VisionTransformer(cfg.vision, rt, rngs, variable_size=not paligemma)
      self.connector = MultiModalProjector(cfg, rt, rngs) if paligemma else Connector(cfg, rt, rngs)
    decoder = Gemma2Model if cfg.text.model_type == "gemma2" else LlamaModel
    self.text_model = decoder(cfg.text, rt, rngs)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = layers.Linear(cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"),
                                   dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)

  # -- pieces ----------------------------------------------------------------

  def image_features(self, pixel_values: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
    """(N, C, H, W) images -> (N, image_seq_len, D_text) language-model tokens."""
    if not self.cfg.is_vlm:
      raise ValueError(f"model_type {self.cfg.model_type!r} is text-only and takes no images")
    return self.connector(self.vision_model(pixel_values, patch_mask))

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
            image_valid: jax.Array | None = None) -> jax.Array:
    token = self.cfg.image_token_id
    if token is not None and token >= self.cfg.text.vocab_size:
      # An image token outside the table (as Hugging Face allows) looks up row 0; its row is replaced anyway.
      x = self.text_model.embed_tokens(jnp.where(input_ids == token, 0, input_ids))
    else:
      x = self.text_model.embed_tokens(input_ids)
    if image_features is None:
      return x
    if image_valid is None:
      image_valid = jnp.ones(image_features.shape[:1], dtype=bool)
    return merge_image_features(input_ids, x, image_features, image_valid, self.cfg.image_token_id)

  @property
  def first_position(self) -> int:
    """The position id of a prompt's first token: PaliGemma counts from 1, the others from 0."""
    return 1 if self.cfg.model_type == "paligemma" else 0

  def hidden_states(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
                    position_ids: jax.Array | None = None, token_type_ids: jax.Array | None = None) -> jax.Array:
    """token_type_ids (PaliGemma only): 0 marks the prefix (image and prompt), which attends
    bidirectionally within itself; None keeps every token causal."""
    if self.cfg.model_type != "paligemma":
      if token_type_ids is not None:
        raise ValueError(f"token_type_ids (a bidirectional prefix) is PaliGemma's; {self.cfg.model_type!r} is causal")
      return self.text_model(inputs_embeds, attention_mask, position_ids)
    if position_ids is None:
      # PaliGemma counts positions from 1, whatever the padding.
      b, t, _ = inputs_embeds.shape
      position_ids = jnp.broadcast_to(jnp.arange(self.first_position, t + self.first_position, dtype=jnp.int32)[None],
                                      (b, t))
    return self.text_model(inputs_embeds, attention_mask, position_ids, token_type_ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits, soft-capped where the config says so (Gemma2)."""
    if self.cfg.text.tie_word_embeddings:
      out = self.text_model.embed_tokens.attend(hidden)
    else:
      kernel = self.lm_head.kernel[...]
      dtype = self.runtime.compute_dtype
      out = layers.einsum_f32("...d,dv->...v", hidden.astype(dtype), kernel.astype(dtype))
    cap = self.cfg.text.final_logit_softcapping
    return out if cap is None else layers.softcapped(out, cap)

  # -- Hugging Face-style call -------------------------------------------------

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, pixel_attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, token_type_ids: jax.Array | None = None) -> BackboneOutput:
    """input_ids (B, T); attention_mask (B, T); pixel_values (B, N, C, H, W) with all-zero
    padding images (SmolVLM), or (N, C, H, W), every image real (PaliGemma);
    pixel_attention_mask (B, N, H, W); token_type_ids (B, T), PaliGemma only."""
    image_features = image_valid = None
    if pixel_values is not None:
      if pixel_values.ndim == 4:
        images = pixel_values
        image_valid = jnp.ones(images.shape[:1], dtype=bool)
      else:
        b, n, c, h, w = pixel_values.shape
        images = pixel_values.reshape(b * n, c, h, w)
        image_valid = jnp.any(images != 0, axis=(1, 2, 3))
      patch_mask = None
      if pixel_attention_mask is not None:
        n, _, h, w = images.shape
        patch_mask = patch_mask_from_pixels(pixel_attention_mask.reshape(n, h, w), self.cfg.vision.patch_size)
      if _is_concrete(input_ids, image_valid):
        tokens = int(np.sum(np.asarray(input_ids) == self.cfg.image_token_id))
        expected = int(np.sum(np.asarray(image_valid))) * self.cfg.image_seq_len
        if tokens != expected:
          raise ValueError(f"image features and image tokens do not match: {tokens} image tokens in input_ids, "
                           f"{expected} feature rows from the valid images")
      image_features = self.image_features(images, patch_mask)
    hidden = self.hidden_states(self.embed(input_ids, image_features, image_valid), attention_mask, position_ids,
                                token_type_ids)
    return BackboneOutput(logits=self.logits(hidden), last_hidden_state=hidden)


def create(cfg: BackboneConfig, rt: Runtime = Runtime(), seed: int = 0) -> Backbone:
  return Backbone(cfg, rt, rngs=nnx.Rngs(seed))

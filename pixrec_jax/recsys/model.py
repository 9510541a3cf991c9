"""PixRec: two towers on one shared backbone.

Full pass: the backbone reads user segment + target segment; pooling over the
user segment gives v_U, over the target segment v_T|U. Item pass: the backbone
reads the target item alone; pooling gives v_T. Two linear heads map into the
shared retrieval space: user_proj(v_U), item_proj(v_T|U), item_proj(v_T).

Batch layout (numpy/jax arrays, static shapes; B examples, M image slots):
  full_ids, full_mask      (B, S)  user + target segment tokens, right padded
  user_mask, target_mask   (B, S)  which real tokens belong to each segment
  nig_positions            (B, K)  positions whose next token is a target text token
  nig_labels, nig_weights  (B, K)  those next tokens; 0 weight for padding slots
  item_ids, item_mask      (B, S_item) the target item alone
  images                   (B, M, C, H, W) image tiles in token order: the history's, then the target's
                           or, packed (data.image_budget), (U, C, H, W): each distinct tile of the batch once
                           or, from a frozen tower's feature table (train.cache_image_features, data.features),
  image_features           (U, T, D) each distinct tile's language-model tokens (the connector's output), or
  vision_features          (U, P, D_vision) the vision tower's output, which the connector then maps
  image_index              (B, M)  packed only: the row of `images` (or of the features) each slot shows
  pixel_lut                (3, 256) with uint8 `images` (the pipeline's packed batches): each channel's
                           float value of every 8-bit value (data.images.pixel_lut), looked up on the device
  image_valid              (B, M)  which slots hold a tile
  target_slot              (B,)    the target image's first slot; its tiles are the valid slots from there on
  target_item              (B,)    the target's item id (for false negatives)
Text-only batches have no images, image_valid or target_slot.
Packed batches (data.pack_rows; data.packing) hold the B full prompts in R rows: full_ids, full_mask (segment
ids) and full_positions are (R, S), example_row (B,) names each example's row, and user_mask, target_mask and
nig_positions are in that row's coordinates. With the items packed too (data.pack_items) the rows also hold
each item read alone: item_row (B,) names its row, item_mask (B, S) marks it there, feature_order (B, 2M)
says which slot's features each image token group takes (data.packing); there is no item_ids and no
second decoder pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pixrec_jax.data import features
from pixrec_jax.models import layers
from pixrec_jax.models.backbone import Backbone

POOLINGS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  proj_dim: int = 128
  pooling: str = "mean"
  text_only: bool = False

  def validate(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    if self.proj_dim <= 0:
      raise ValueError(f"proj_dim must be positive, got {self.proj_dim}")


def pool(hidden: jax.Array, mask: jax.Array, how: str, rows: jax.Array | None = None) -> jax.Array:
  """Mean over the real tokens of `mask`, or the hidden state of its last real token (float32).
  rows (B,): packed rows (data.pack_rows): example i's tokens are in row rows[i] of hidden (R, S, D),
  where mask[i] (B, S) marks them."""
  mask = mask.astype(bool)
  if how == "mean":
    if rows is not None:
      hidden = hidden[rows]
    w = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
  last = hidden.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  return rows_at(hidden, last[:, None], rows)[:, 0].astype(jnp.float32)


def rows_at(hidden: jax.Array, positions: jax.Array, rows: jax.Array | None = None) -> jax.Array:
  """hidden (R, S, D) at positions (B, K): (B, K, D); row i of hidden for example i, or rows[i] when given."""
  if rows is None:
    return jnp.take_along_axis(hidden, positions[..., None], axis=1)
  r, s, d = hidden.shape
  return hidden.reshape(r * s, d)[rows[:, None] * s + positions]


def decode_pixels(raw: jax.Array, lut: jax.Array) -> jax.Array:
  """(..., 3, H, W) uint8 -> float32 lut[channel, value]: bit for bit the processor's pixels."""
  channel = jnp.arange(lut.shape[0]).reshape((-1, 1, 1))
  return lut[channel, raw.astype(jnp.int32)]


class PixRec(nnx.Module):

  def __init__(self, backbone: Backbone, heads: HeadsConfig, *, rngs: nnx.Rngs):
    heads.validate()
    if not heads.text_only and not backbone.cfg.is_vlm:
      raise ValueError(f"backbone {backbone.cfg.model_type!r} is text-only: set text_only=True to use it")
    self.heads = heads
    self.backbone = backbone
    d = backbone.cfg.text.hidden_size
    rt = backbone.runtime
    kw = dict(use_bias=True, dtype=jnp.float32, param_dtype=rt.params_dtype, rngs=rngs)
    self.user_proj = layers.Linear(d, heads.proj_dim, axes=("embed", None), **kw)
    self.item_proj = layers.Linear(d, heads.proj_dim, axes=("embed", None), **kw)

  # -- pieces ----------------------------------------------------------------

  def encode_images(self, images: jax.Array) -> jax.Array:
    """(B, M, C, H, W) -> (B, M, T, D): every image slot's language-model tokens, computed once (packed
    rows: packed_rows)."""
    b, m = images.shape[:2]
    feats = self.image_rows(images.reshape((b * m,) + images.shape[2:]))
    return feats.reshape((b, m) + feats.shape[1:])

  def image_rows(self, images: jax.Array, lut: jax.Array | None = None) -> jax.Array:
    """Rows (U, C, H, W) -> (U, T, D): each image row's language-model tokens (uint8 rows with `lut`)."""
    if lut is not None:
      images = decode_pixels(images, lut)
    elif images.dtype == jnp.uint8:
      raise ValueError("uint8 images need their pixel_lut (data.images.pixel_lut) to become the tower's floats")
    return self.backbone.image_features(images)

  def table_tokens(self, x: jax.Array, key: str) -> jax.Array:
    """(..., T, D) language-model tokens of a frozen tower's table rows x (data.features) of kind `key`:
    "image_features" as they are, "vision_features" through the connector (over any leading axes)."""
    if key == features.IMAGE_FEATURES:
      return x
    out = self.backbone.connector(x.reshape((-1,) + x.shape[-2:]))
    return out.reshape(x.shape[:-2] + out.shape[1:])

  def packed_rows(self, batch: dict) -> jax.Array:
    """(U, T, D): the language-model tokens of a packed batch's image rows: its pixels ("images") encoded,
    or a frozen tower's cached features (table_tokens)."""
    for key in features.TABLE_KEYS:
      if key in batch:
        return self.table_tokens(batch[key], key)
    return self.image_rows(batch["images"], batch.get("pixel_lut"))

  def _hidden(self, ids, mask, feats, valid, positions=None, flat=False):
    """flat: feats (N, T, D) and valid (N,) are already one feature row per image slot, in token order."""
    if feats is None:
      embeds = self.backbone.embed(ids)
    elif flat:
      embeds = self.backbone.embed(ids, feats, valid)
    else:
      n = feats.shape[0] * feats.shape[1]
      embeds = self.backbone.embed(ids, feats.reshape((n,) + feats.shape[2:]), valid.reshape(n))
    if positions is not None:
      positions = positions + self.backbone.first_position
    return self.backbone.hidden_states(embeds, mask, positions)

  def cached_slot_features(self, batch: dict, prefix: str) -> jax.Array | None:
    """(B, P, T, D) language-model tokens of an evaluation batch's `prefix` ("item", "user") image slots read
    from a frozen tower's feature table (data.features), in `prefix`_image_features or
    `prefix`_vision_features (table_tokens); None where the batch carries pixels."""
    for key in features.TABLE_KEYS:
      if f"{prefix}_{key}" in batch:
        return self.table_tokens(batch[f"{prefix}_{key}"], key)
    return None

  def user_embedding(self, ids, mask, user_mask, images=None, image_valid=None, feats=None) -> jax.Array:
    """user_proj(v_U) for a history-only prompt (the user segment alone). images (B, M, C, H, W) or
    precomputed feats (B, M, T, D)."""
    if not self.heads.text_only and feats is None:
      feats = self.encode_images(images)
    hidden = self._hidden(ids, mask, feats, image_valid)
    return self.user_proj(pool(hidden, user_mask, self.heads.pooling))

  def item_embedding(self, ids, mask, images=None, image_valid=None, feats=None) -> jax.Array:
    """item_proj(v_T) for items read alone. images (B, P, C, H, W) or precomputed feats (B, P, T, D);
    the valid slots' features fill the image tokens in order."""
    if not self.heads.text_only and feats is None:
      feats = self.encode_images(images)
    hidden = self._hidden(ids, mask, None if self.heads.text_only else feats, image_valid)
    return self.item_proj(pool(hidden, mask, self.heads.pooling))

  # -- training ----------------------------------------------------------------

  def train_outputs(self, batch: dict, row_feats: jax.Array | None = None) -> dict:
    """The mixed loss's inputs for a batch. row_feats: its packed rows' image_rows, computed by the caller
    (gradient accumulation encodes a packed batch's rows once for all its microbatches); then the batch
    needs no "images"."""
    if self.heads.text_only:
      feats = None
    elif row_feats is not None:
      feats = row_feats[batch["image_index"]]
    elif "image_index" in batch:  # packed rows: each distinct tile once, then given to its slots
      feats = self.packed_rows(batch)[batch["image_index"]]
    else:
      feats = self.encode_images(batch["images"])
    target_valid = None
    if feats is not None:
      # The target's tiles come last among the valid slots; masking the history's out lets the
      # item pass reuse every feature row in place, whatever its tile count.
      slots = jnp.arange(feats.shape[1])
      target_valid = batch["image_valid"] & (slots[None, :] >= batch["target_slot"][:, None])
    # Packed (data.pack_rows): the full prompts are segments of fewer rows; example_row says whose is where.
    rows = batch.get("example_row")
    items_packed = "item_row" in batch  # data.pack_items: the items read alone are segments of the rows too
    if items_packed and feats is not None:
      # Slot m of example e as its prompt's is entry 2 (M e + m) of feature_order, as its item's 2 (M e + m) + 1.
      n = feats.shape[0] * feats.shape[1]
      order = batch["feature_order"].reshape(-1)
      slot, as_item = order // 2, order % 2 == 1
      valid = jnp.where(as_item, target_valid.reshape(n)[slot], batch["image_valid"].reshape(n)[slot])
      hidden = self._hidden(batch["full_ids"], batch["full_mask"], feats.reshape((n,) + feats.shape[2:])[slot],
                            valid, batch.get("full_positions"), flat=True)
    else:
      hidden = self._hidden(batch["full_ids"], batch["full_mask"], feats, batch.get("image_valid"),
                            batch.get("full_positions"))
    nig_logits = self.backbone.logits(rows_at(hidden, batch["nig_positions"], rows))
    v_u = pool(hidden, batch["user_mask"], self.heads.pooling, rows)
    v_tu = pool(hidden, batch["target_mask"], self.heads.pooling, rows)
    if items_packed:
      item = self.item_proj(pool(hidden, batch["item_mask"], self.heads.pooling, batch["item_row"]))
    else:
      item = self.item_embedding(batch["item_ids"], batch["item_mask"], image_valid=target_valid, feats=feats)
    return {
        "nig_logits": nig_logits,
        "user": self.user_proj(v_u),
        "target_given_user": self.item_proj(v_tu),
        "item": item,
    }

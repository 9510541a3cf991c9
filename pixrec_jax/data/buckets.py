"""Training batches cut to the lengths they use (data.length_buckets): a few shapes, little padding.

Every training batch has its layout's static shapes: full prompts of seq_len tokens (or packed rows of
that length), items read alone of item_len, and with an image budget that many rows of image tiles.
Large batches fill them (packing: data.pack_rows, data.image_budget); small ones cannot. At batch 1,
the paper's, a window of 1..5 history items fills 40-100% of the prompt and 2 to 6 of 6 image rows,
and the step computes all of it. With data.length_buckets=K each batch is cut, axis by axis, to the
smallest of K evenly spaced sizes that holds what it uses (`sizes`: tokens in multiples of 8, packed
image rows in multiples of the data-parallel devices, image slots an example), so the train step compiles a few shapes, each once
(jax.jit retraces on a new shape), and computes a bucket's padding only.

What is cut is padding: positions past the last one any row's mask holds, image rows past the last
one any slot reads. Masks, pooling, the causal attention and the loss never read them, so a cut
batch gives the uncut batch's loss and gradients (tests/test_buckets.py checks the train step).
Unpacked image slots (data.image_budget=0) are cut the same way: every example keeps the first slots,
as many as the fullest example fills.

Each host cuts its own block of the global batch, so the hosts of a multi-process run would disagree
on the shapes; `pixrec_jax.train.run.setup` turns the setting off there, and says so.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from pixrec_jax.data import features

TOKEN_MULTIPLE = 8  # token axes are cut to multiples of this
# The full pass's fields with a token axis (axis 1), packed or not; item_mask joins them when the items
# are packed into the rows (item_row present), else it is the item pass's, with item_ids.
FULL_KEYS = ("full_ids", "full_mask", "full_positions", "user_mask", "target_mask")
ITEM_KEYS = ("item_ids", "item_mask")


def sizes(limit: int, buckets: int, multiple: int = 1) -> list[int]:
  """`buckets` evenly spaced sizes up to `limit`, each rounded up to `multiple` (never past `limit`, the
  last): ascending, without repeats."""
  if buckets < 1 or limit < 1:
    raise ValueError(f"sizes: buckets={buckets} and limit={limit} must be >= 1")
  return sorted({min(limit, math.ceil(math.ceil(limit * (i + 1) / buckets) / multiple) * multiple)
                 for i in range(buckets)})


def bucket(needed: int, limit: int, buckets: int, multiple: int = 1) -> int:
  """The smallest of `sizes(limit, buckets, multiple)` that holds `needed`."""
  if needed > limit:
    raise ValueError(f"a batch uses {needed} positions of an axis of {limit}")
  return next(s for s in sizes(limit, buckets, multiple) if s >= needed)


def _used(mask: np.ndarray) -> int:
  """Positions up to and including the last that any row of a (rows, length) mask holds; at least 1."""
  columns = np.flatnonzero(np.asarray(mask).any(axis=0))
  return int(columns[-1]) + 1 if columns.size else 1


def trim(batch: Mapping[str, np.ndarray], buckets: int, image_multiple: int = 1) -> dict[str, np.ndarray]:
  """`batch` (one process's training batch, as pipeline.train_dataset builds it) with its token axes, and its
  packed image rows or its unpacked image slots, cut to their buckets (`bucket`). image_multiple: the image
  rows' multiple (the data-parallel devices that split them). Packed rows are counted from row 0: one
  process (no host's row offset)."""
  out = dict(batch)
  items_in_rows = "item_row" in batch
  full = FULL_KEYS + (("item_mask",) if items_in_rows else ())
  limit = batch["full_ids"].shape[1]
  n = bucket(max(_used(batch["full_mask"]), _used(batch["item_mask"]) if items_in_rows else 1), limit, buckets,
             TOKEN_MULTIPLE)
  for key in full:
    if key in out:
      out[key] = out[key][:, :n]
  positions, weights = batch["nig_positions"], batch["nig_weights"]
  if np.any((positions >= n) & (weights > 0)):
    raise ValueError(f"a next-item token's position is past the {n} tokens the batch uses")
  out["nig_positions"] = np.minimum(positions, n - 1).astype(positions.dtype)  # unweighted slots stay inside
  if not items_in_rows and "item_ids" in batch:
    m = bucket(_used(batch["item_mask"]), batch["item_ids"].shape[1], buckets, TOKEN_MULTIPLE)
    for key in ITEM_KEYS:
      out[key] = out[key][:, :m]
  if "image_index" in batch:  # packed image rows, filled from row 0 (pipeline.pack_images)
    valid = batch["image_valid"].astype(bool)
    rows = int(batch["image_index"][valid].max()) + 1 if valid.any() else 1
    key = features.rows_key(batch)  # pixels, or a frozen tower's features
    limit = batch[key].shape[0]
    if limit % image_multiple:
      raise ValueError(f"{limit} image rows do not split over {image_multiple} devices")
    out[key] = batch[key][:bucket(rows, limit, buckets, image_multiple)]
  elif "image_valid" in batch:  # a (B, M) slot per tile, filled from slot 0 (examples.PromptBuilder)
    out.update(_trim_slots(batch, buckets))
  return out


def _trim_slots(batch: Mapping[str, np.ndarray], buckets: int) -> dict[str, np.ndarray]:
  """Unpacked images: the slot axis M of images and image_valid cut to its bucket, and feature_order (packed
  items: 2 (M e + m) + item, data.packing) renumbered for the new M."""
  valid = batch["image_valid"].astype(bool)
  slots = valid.shape[1]
  m = bucket(_used(valid), slots, buckets)
  out = {"image_valid": batch["image_valid"][:, :m]}
  if "images" in batch:  # absent where the pipeline left the pixels out (sampling)
    out["images"] = batch["images"][:, :m]
  if "feature_order" in batch:
    order = batch["feature_order"]
    example, slot, item = order // 2 // slots, order // 2 % slots, order % 2
    keep = slot < m  # each example's entries in slot order; those of cut slots are dropped
    renumbered = 2 * (m * example + slot) + item
    out["feature_order"] = np.stack([row[k] for row, k in zip(renumbered, keep)]).astype(order.dtype)
  return out


def shape_key(batch: Mapping[str, np.ndarray]) -> tuple:
  """The batch's array shapes, as a hashable key: one compiled step each."""
  return tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))


def describe(shapes: Mapping[str, Sequence[int]]) -> str:
  """A batch's cut lengths in words, e.g. "prompts of 320 tokens, items of 88, 4 image rows"."""
  words = [f"{'rows' if 'full_positions' in shapes else 'prompts'} of {shapes['full_ids'][1]} tokens"]
  if "item_ids" in shapes:
    words.append(f"items of {shapes['item_ids'][1]}")
  if "image_index" in shapes:
    words.append(f"{shapes[features.rows_key(shapes)][0]} image rows")
  elif "image_valid" in shapes:
    words.append(f"{shapes['image_valid'][1]} image slots an example")
  return ", ".join(words)

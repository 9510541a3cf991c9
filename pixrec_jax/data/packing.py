"""Sequence packing: several training prompts in one row of the full pass (data.pack_rows).

A batch's full prompts are right padded to the layout's seq_len, the longest a prompt can be; with
histories of 1..max_history items most rows are part padding (about a third on the demo), and the
decoder computes every padded position. Packing lays the B prompts end to end into R < B rows of the
same length, each prompt a segment that attends only to itself (`full_mask` holds segment ids
1, 2, .. instead of 1s; models.llama.causal_mask) with its positions counted from its own start
(`full_positions`), so the decoder reads R rows instead of B and every prompt's hidden states are
those it has alone.

A packed batch has these full-pass fields (the item pass and the images keep their per-example shapes):
  full_ids, full_mask, full_positions   (R, S)  tokens, segment ids (0: padding), positions in the segment
  example_row                           (B,)    the row holding each example (+ this host's first row)
  user_mask, target_mask, nig_positions         as unpacked, in the coordinates of the example's row
The examples are reordered row by row (row 0's prompts first, in order): image features are merged
into the image tokens in row-major token order, which then is the examples' order. The mixed loss
does not depend on the examples' order. With gradient accumulation over k microbatches (examples
j, j + k, .. and rows j, j + k, .. form microbatch j: train.trainer) the batch packs in k groups:
examples i = j (mod k) go to rows r = j (mod k) only, in that order, and the trainer reads row
example_row // k of its microbatch. Positions restart in each segment as in the prompt alone
(rotary embeddings depend on relative positions only, so this matters to rounding, not to the values).

With items (data.pack_items) each example's item read alone (the item pass: `item_ids`) is one more
segment of the rows, so one decoder pass reads both instead of a second pass over (B, item_len). The
plan then places 2B segments: i < B is example i's full prompt, B + i its item (segment_lengths); a row
holds its prompts first, then its items. The batch has no item_ids; instead
  item_row                              (B,)    the row holding each example's item (as example_row)
  item_mask                             (B, S)  the item's tokens, in that row's coordinates
  feature_order                         (B, 2M) with images: which image slot's features each image
                                                token group of the rows takes, in row-major token order
Image tokens are filled with features in row-major order (backbone.merge_image_features); an item's
image tokens take its target's tiles again. feature_order lists, for the rows in order, each segment's
slots: 2 (M e + m) for slot m of example e's prompt, 2 (M e + m) + 1 for slot m as its item's (the
target's tiles: the model masks the history's slots out), e global (+ example_offset); with k microbatch
groups, group j's list fills the entries of its examples j, j + k, .. (the trainer makes them local).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pixrec_jax.data import features

# Per-example fields whose positions index the full prompt: packing moves them by the segment's offset.
_ROW_COORDINATES = ("user_mask", "target_mask")


def plan_rows(lengths: Sequence[int], rows: int, seq_len: int) -> list[list[int]] | None:
  """First-fit decreasing: the examples each of `rows` rows of `seq_len` tokens holds, or None when
  the prompts do not fit. Longest first, ties by index; each row's examples in index order."""
  fill, members = [], []
  for i in sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j)):
    n = int(lengths[i])
    if n > seq_len:
      raise ValueError(f"example {i}: a prompt of {n} tokens is longer than the row ({seq_len})")
    for r, used in enumerate(fill):
      if used + n <= seq_len:
        fill[r] += n
        members[r].append(i)
        break
    else:
      if len(fill) == rows:
        return None
      fill.append(n)
      members.append([i])
  members += [[] for _ in range(rows - len(members))]
  return [sorted(m) for m in members]


def segment_lengths(full_masks: Sequence[np.ndarray], item_masks: Sequence[np.ndarray] | None = None) -> list[int]:
  """What plan_rows packs: each full prompt's length (real tokens of its full_mask), then, given the items'
  masks (data.pack_items), each item's, in example order. Masks: a (B, S) array or B rows."""
  masks = list(full_masks) + (list(item_masks) if item_masks is not None else [])
  return [int(np.count_nonzero(m)) for m in masks]


def shared_keys(batch: dict) -> set[str]:
  """The fields of a batch that are not per example: packed image rows (data.image_budget; pixels or a frozen
  tower's features, data.features) and the pixels' table."""
  return {"pixel_lut"} | (set(features.ROW_KEYS) if "image_index" in batch else set())


def plan_groups(lengths: Sequence[int], rows: int, seq_len: int, groups: int = 1) -> list[list[int]] | None:
  """plan_rows for `groups` microbatches: examples i = j (mod groups) packed into rows r = j (mod groups)
  (rows / groups of them); the rows in global order, or None when a group's prompts do not fit."""
  if rows % groups or len(lengths) % groups:
    raise ValueError(f"{rows} rows and {len(lengths)} examples do not split into {groups} microbatches")
  plan = [[] for _ in range(rows)]
  for j in range(groups):
    members = list(range(j, len(lengths), groups))
    sub = plan_rows([lengths[i] for i in members], rows // groups, seq_len)
    if sub is None:
      return None
    for q, row in enumerate(sub):
      plan[q * groups + j] = [members[i] for i in row]
  return plan


def pack_rows(batch: dict[str, np.ndarray], plan: list[list[int]], row_offset: int = 0,
              groups: int = 1, items: bool = False, example_offset: int = 0) -> dict[str, np.ndarray]:
  """The packed batch of `plan` (plan_rows, or plan_groups with the same `groups`, on this batch's
  segment_lengths): the examples reordered row by row (within each group), their full prompts (and with
  `items` their items read alone) laid end to end. row_offset: this host's first row of the global batch
  (example_row indexes the global rows); example_offset: its first example (feature_order's e)."""
  ids, mask = batch["full_ids"], batch["full_mask"]
  b, s = ids.shape
  if b % groups:
    raise ValueError(f"{b} examples do not split into {groups} microbatches")
  placed = sorted(i for row in plan for i in row)
  if placed != list(range(2 * b if items else b)):
    what = f"{b} prompts and {b} items" if items else f"{b} prompts"
    raise ValueError(f"the plan places segments {placed}, the batch has {what}")
  prompt_plan = [[i for i in row if i < b] for row in plan]
  order = [0] * b  # new index -> old index
  for j in range(groups):
    members = [i for r in range(j, len(plan), groups) for i in prompt_plan[r]]
    if len(members) != b // groups or any(i % groups != j for i in members):
      raise ValueError(f"the plan puts examples {sorted(members)} in microbatch {j} of {groups}")
    if any((i - b) % groups != j for r in range(j, len(plan), groups) for i in plan[r] if i >= b):
      raise ValueError(f"the plan puts an item outside its example's microbatch ({groups} microbatches)")
    for n, i in enumerate(members):
      order[n * groups + j] = i
  new_index = {old: new for new, old in enumerate(order)}
  shared = shared_keys(batch)
  batch = {k: v if k in shared else v[order] for k, v in batch.items()}
  ids, mask = batch["full_ids"], batch["full_mask"]
  lengths = mask.astype(bool).sum(axis=1)
  rows = len(plan)
  drop = ("full_ids", "full_mask") + _ROW_COORDINATES + (("item_ids", "item_mask") if items else ())
  out = {k: v for k, v in batch.items() if k not in drop}
  packed_ids = np.zeros((rows, s), ids.dtype)
  segments = np.zeros((rows, s), np.int32)
  positions = np.zeros((rows, s), np.int32)
  example_row = np.zeros((b,), np.int32)
  offsets = np.zeros((b,), np.int32)
  if items:
    item_ids, item_mask = batch["item_ids"], batch["item_mask"].astype(bool)
    item_lengths = item_mask.sum(axis=1)
    item_row = np.zeros((b,), np.int32)
    item_rows_mask = np.zeros((b, s), batch["item_mask"].dtype)
  for r, members in enumerate(plan):
    offset = 0
    for segment, old in enumerate(members, start=1):  # sorted: the row's prompts, then its items
      item = old >= b
      i = new_index[old - b if item else old]
      row_ids, row_mask = (item_ids[i], item_mask[i]) if item else (ids[i], mask[i])
      n = int(item_lengths[i] if item else lengths[i])
      if row_mask[n:].any() or not row_mask[:n].all():
        raise ValueError(f"example {old % b}: {'item_mask' if item else 'full_mask'} is not right padded, "
                         "cannot pack it")
      if offset + n > s:
        raise ValueError(f"the plan overfills row {r}: {offset + n} tokens in a row of {s}")
      packed_ids[r, offset:offset + n] = row_ids[:n]
      segments[r, offset:offset + n] = segment
      positions[r, offset:offset + n] = np.arange(n)
      if item:
        item_row[i] = row_offset + r
        item_rows_mask[i, offset:offset + n] = 1
      else:
        example_row[i], offsets[i] = row_offset + r, offset
      offset += n
  if items:
    out.update(item_row=item_row, item_mask=item_rows_mask)
    if "image_valid" in batch:
      out["feature_order"] = _feature_order(plan, new_index, b, batch["image_valid"].shape[1], groups,
                                            example_offset)
  for key in _ROW_COORDINATES:
    shifted = np.zeros_like(batch[key])
    for j in range(b):
      shifted[j, offsets[j]:offsets[j] + lengths[j]] = batch[key][j, :lengths[j]]
    out[key] = shifted
  # Padding slots (weight 0) may land past the row's end: kept inside it.
  out["nig_positions"] = np.minimum(batch["nig_positions"] + offsets[:, None], s - 1).astype(
      batch["nig_positions"].dtype)
  out.update(full_ids=packed_ids, full_mask=segments, full_positions=positions, example_row=example_row)
  return out


def _feature_order(plan: list[list[int]], new_index: dict[int, int], b: int, slots: int, groups: int,
                   example_offset: int) -> np.ndarray:
  """(B, 2 x slots) feature_order (module docstring) of a plan with items, examples in their new order."""
  order = np.zeros((b, 2 * slots), np.int32)
  for j in range(groups):
    entries = []
    for r in range(j, len(plan), groups):
      for old in plan[r]:
        e = example_offset + new_index[old % b]
        entries += [2 * (slots * e + m) + int(old >= b) for m in range(slots)]
    order[j::groups] = np.asarray(entries, np.int32).reshape(-1, 2 * slots)
  return order


def fewest_rows(lengths: Sequence[int], seq_len: int) -> int:
  """The fewest rows plan_rows packs these prompts into."""
  rows = max(1, -(-int(np.sum(lengths)) // seq_len))
  while plan_rows(lengths, rows, seq_len) is None:
    rows += 1
  return rows


def items_pay(rows_with_items: int, rows_alone: int, *, batch: int, seq_len: int, item_len: int) -> bool:
  """Whether the items read alone, packed into the rows (data.pack_items), cost the decoder no more tokens
  than the rows without them plus the separate item pass of (batch, item_len). A batch of 1, say, needs
  a second row of seq_len for its item: they do not pay there."""
  return rows_with_items * seq_len <= rows_alone * seq_len + batch * item_len


def choose_rows(lengths: np.ndarray, seq_len: int, *, groups: int = 1, multiple: int = 1,
                quantile: float = 0.95) -> int:
  """Rows for data.pack_rows=-1: the `quantile` of the fewest rows each sampled batch of prompt `lengths`
  (batches, B) packs into (in `groups` microbatch groups), rounded up to a multiple of groups x `multiple`
  (the data-parallel devices), at most a row per example. A batch that needs more drops history items."""
  step = groups * multiple
  need = []
  for batch in np.asarray(lengths):
    need.append(sum(fewest_rows(list(batch[j::groups]), seq_len) for j in range(groups)))
  rows = int(np.ceil(np.quantile(need, quantile)))
  rows = -(-max(rows, 1) // step) * step
  return min(rows, -(-lengths.shape[1] // step) * step)

"""A frozen vision tower's features of every catalogue image tile, computed once (train.cache_image_features).

In the paper's training mode (train.trainable=heads_lm_head) the vision tower and the connector never
change, so every image tile's language-model tokens are the same at every step; with
train.trainable=frozen_vision the tower's own output is. The train step still spends most of its time
recomputing them: at the paper's batch of 1, smolvlm_256m's vision forward is most of the step.

With train.cache_image_features the job encodes each distinct (item, tile) of the catalogue once before
training (`pixrec_jax.train.run.encode_features`, a progress bar) into a table in WORKDIR/features, one
row per tile, and the input pipeline sends a batch's rows of that table in place of its pixels, packed
as data.image_budget packs pixels: `image_features` (rows, T, D_text), the connector's output, where the
connector is frozen too, or `vision_features` (rows, P, D_vision), the tower's, which the step passes
through the (training) connector. The table is a .npy file each data worker maps read-only, so the page
cache holds one copy per host however many workers read it. The evaluation of that run (the catalogue's and
the users' dense embeddings, pixrec_jax.eval.ranking, and the generative protocol's prompts) reads the table
too, in `item_image_features` / `user_image_features` slots (or `..._vision_features`) in place of
`item_images` / `user_images`; so does a model reopened from the run's checkpoint
(`pixrec_jax.train.run.saved_feature_table`: recommend's catalogue index and users).
Beside the table lie its fingerprint and tile counts (pixrec_jax.train.run.saved_feature_table): a resumed
run reads the table it finds rather than encoding it again.

Only the frozen part is skipped: every trained parameter sees the same inputs as without the cache, so
the loss and gradients are the uncached step's up to rounding (tests/test_features.py).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

import ml_dtypes
import numpy as np

# Batch fields of packed image rows, by what they hold: pixels (pipeline.pack_images), or a frozen
# tower's cached features: the connector's output, or the vision tower's.
IMAGE_FEATURES = "image_features"
VISION_FEATURES = "vision_features"
TABLE_KEYS = (IMAGE_FEATURES, VISION_FEATURES)
ROW_KEYS = ("images",) + TABLE_KEYS


def rows_key(batch) -> str:
  """Which ROW_KEYS field holds a packed batch's image rows (a batch or a {name: shape} mapping)."""
  keys = [k for k in ROW_KEYS if k in batch]
  if len(keys) != 1:
    raise ValueError(f"a packed batch holds its image rows in one of {ROW_KEYS}; this one has {keys or 'none'}")
  return keys[0]


def catalog_tiles(store, num_items: int) -> tuple[np.ndarray, np.ndarray]:
  """(first, counts) int64 (num_items,): each item's first row in the table, -1 without an image, and its
  tile count (grid rows x cols + the global image; 0 without an image). Rows follow item order."""
  counts = np.array([store.tile_count(item) for item in range(num_items)], np.int64)
  return first_rows(counts), counts


def first_rows(counts: np.ndarray) -> np.ndarray:
  """Each item's first row in the table from the items' tile counts (rows in item order); -1 without tiles."""
  return np.where(counts > 0, np.cumsum(counts) - counts, -1)


def _storage(dtype: np.dtype) -> np.dtype:
  """What the .npy file stores: numpy has no bfloat16 of its own, so its bits as uint16."""
  return np.dtype(np.uint16) if dtype == ml_dtypes.bfloat16 else dtype


@dataclasses.dataclass
class FeatureTable:
  """Row `first[item] + tile` of the .npy file at `path`: item's tile's features, `dtype`, shape row_shape.
  Picklable into grain's workers: each maps the file itself, on first use."""

  path: str
  key: str  # IMAGE_FEATURES or VISION_FEATURES: the batch field its rows go to
  first: np.ndarray  # (num_items,) from catalog_tiles
  counts: np.ndarray
  row_shape: tuple[int, ...]
  dtype: np.dtype

  def __post_init__(self):
    if self.key not in TABLE_KEYS:
      raise ValueError(f"FeatureTable.key must be {IMAGE_FEATURES!r} or {VISION_FEATURES!r}, got {self.key!r}")
    self.dtype = np.dtype(self.dtype)
    self._rows = None

  @property
  def num_rows(self) -> int:
    return int(self.counts.sum())

  @property
  def row_nbytes(self) -> int:
    """The bytes of one row (one tile's features)."""
    return int(np.prod(self.row_shape)) * self.dtype.itemsize

  def create(self) -> np.ndarray:
    """The file, new, mapped for writing (the job's encoding pass fills it): (num_rows,) + row_shape.
    Refused up front where its folder's disk has no room for it: a mapped write to a full disk would kill the
    process with SIGBUS halfway through the encoding."""
    folder = pathlib.Path(self.path).parent
    folder.mkdir(parents=True, exist_ok=True)
    need = self.num_rows * self.row_nbytes
    old = os.path.getsize(self.path) if os.path.exists(self.path) else 0  # replaced by the new file
    free = shutil.disk_usage(folder).free + old
    if need > free:
      raise OSError(f"train.cache_image_features: the feature table of {self.num_rows} image tiles ({self.row_shape} "
                    f"{self.dtype} a tile) needs {need / 2**30:.2f} GiB in {folder}, which has {free / 2**30:.2f} GiB "
                    "free: free some space, point the workdir at a larger disk, cache the vision tower's smaller "
                    "output (train.trainable=frozen_vision), or set train.cache_image_features=False")
    self._rows = None
    out = np.lib.format.open_memmap(self.path, mode="w+", dtype=_storage(self.dtype),
                                    shape=(self.num_rows,) + tuple(self.row_shape))
    return out.view(self.dtype)

  def rows(self) -> np.ndarray:
    """The whole table, mapped read-only."""
    if self._rows is None:
      rows = np.load(self.path, mmap_mode="r")
      want = (self.num_rows,) + tuple(self.row_shape)
      if rows.shape != want or rows.dtype != _storage(self.dtype):
        raise ValueError(f"{self.path}: a feature table of {rows.shape} {rows.dtype}, not the catalogue's {want} "
                         f"{_storage(self.dtype)}: it was written for another model or dataset")
      self._rows = rows.view(self.dtype)
    return self._rows

  def row(self, item: int, tile: int) -> np.ndarray:
    """(row_shape) features of `item`'s tile `tile`."""
    if not 0 <= tile < self.counts[item]:
      raise ValueError(f"item {item} has {int(self.counts[item])} image tiles in the feature table, not tile {tile}")
    return self.rows()[self.first[item] + tile]

  def slot_rows(self, items, slots: int) -> np.ndarray:
    """(slots,) + row_shape: the items' tiles in token order from slot 0, as examples.PromptBuilder lays out
    image slots; the rest zero (not valid)."""
    out = np.zeros((slots,) + tuple(self.row_shape), self.dtype)
    used = 0
    for item in items:
      n = int(self.counts[item])
      out[used:used + n] = self.rows()[self.first[item]:self.first[item] + n]
      used += n
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_rows"] = None  # each process maps the file itself
    return state

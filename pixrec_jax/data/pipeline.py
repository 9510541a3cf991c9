"""grain input pipelines.

Training: users -> shuffle(seed) -> repeat -> a random window of each user's
training sequence (PixRec: history length L uniform in 1..max, bounded by what the
user has, start uniform, the next item is the target) -> this host's block of
each global batch -> tokenise and load images -> prefetch (worker processes when
asked).
Training sequences end before the validation target (see catalog.leave_one_out),
so no window can reach a validation or test target.

Evaluation: fixed lists (users' held-out cases, the whole catalogue) in order,
padded to full batches with a validity mask so that nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import warnings
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags

from pixrec_jax.data import buckets, images, packing
from pixrec_jax.data.examples import PromptBuilder
from pixrec_jax.data.features import FeatureTable


# Per-example fields for accounting and audits; they never reach the model.
BOOKKEEPING_KEYS = ("user_index", "history_items", "dropped_history")


@dataclasses.dataclass(frozen=True)
class Window:
  user_index: int
  history: np.ndarray
  target: int


def sample_window(user_index: int, sequence: np.ndarray, max_history: int, rng: np.random.Generator) -> Window:
  """PixRec's training window: L ~ U{1..min(max_history, n-1)}, start ~ U{0..n-1-L}."""
  n = len(sequence)
  if n < 2:
    raise ValueError(f"user {user_index}: a training sequence needs at least 2 items, got {n}")
  length = int(rng.integers(1, min(max_history, n - 1) + 1))
  start = int(rng.integers(0, n - length))
  return Window(user_index, history=np.asarray(sequence[start:start + length]), target=int(sequence[start + length]))


class _SampleWindow(grain.transforms.RandomMap):

  def __init__(self, max_history: int):
    self.max_history = max_history

  def random_map(self, element, rng: np.random.Generator) -> Window:
    user_index, sequence = element
    return sample_window(user_index, sequence, self.max_history, rng)


class _BuildTrainExample(grain.transforms.Map):

  def __init__(self, builder: PromptBuilder, pixels: bool = True):
    self.builder = builder
    self.pixels = pixels

  def map(self, window: Window) -> dict[str, np.ndarray]:
    out = self.builder.train_example(window.history, window.target, pixels=self.pixels)
    history = np.full((self.builder.layout.max_history,), -1, np.int32)
    history[:len(window.history)] = window.history[-self.builder.layout.max_history:]
    out["user_index"] = np.int32(window.user_index)
    out["history_items"] = history
    return out


def _slot_tiles(builder: PromptBuilder, history: Sequence[int], target: int, dropped: int) -> list[tuple[int, int]]:
  """(item, tile) of each image slot of builder.train_example(history, target), in slot order."""
  shown = list(history)[-builder.layout.max_history:][dropped:] + [target]
  tiles = []
  for item in shown:
    tiles += [(int(item), j) for j in range(builder.images.tile_count(item))]
  return tiles


def pack_images(batch: dict[str, np.ndarray], slot_tiles: list[list[tuple[int, int]]], budget: int, store,
                row_offset: int = 0, features: FeatureTable | None = None) -> dict[str, np.ndarray]:
  """Each distinct image tile of the batch once: `images` (B, M, C, H, W) slots become `budget` rows
  (budget, C, H, W), read from the ImageStore `store`, and `image_index` (B, M) gives every slot's
  row (+ row_offset: this host's first row of the global array; 0 for empty slots, which are never
  read). The vision tower then encodes `budget` rows instead of B * M slots, most of which are
  padding or repeats, and no (B, M) pixel array is ever made. The rows are uint8, before the
  processor's rescaling and normalisation, and `pixel_lut` (3, 256) is that step's table, applied on
  the device (images.pixel_lut): a quarter of the bytes to copy, pickle and send to the device.
  With `features` (a frozen tower's table: data.features) the rows are each tile's cached features, in
  the table's field, and there is no pixel_lut."""
  valid = batch["image_valid"]
  rows, index = {}, np.zeros(valid.shape, np.int32)
  if features is not None:
    packed = np.zeros((budget,) + tuple(features.row_shape), features.dtype)
    read = features.row
  else:
    size = store.spec.size
    packed = np.zeros((budget, 3, size, size), np.uint8)
    read = lambda item, tile: store.get_raw(item).pixels[tile]
  for b, tiles in enumerate(slot_tiles):
    if len(tiles) != int(valid[b].sum()):
      raise ValueError(f"example {b}: {int(valid[b].sum())} image slots but {len(tiles)} tiles from its items")
    for slot, key in enumerate(tiles):
      if key not in rows:
        if len(rows) == budget:
          raise ValueError(f"the batch has more than data.image_budget={budget} distinct image tiles")
        rows[key] = len(rows)
        packed[rows[key]] = read(*key)
      index[b, slot] = row_offset + rows[key]
  if features is not None:
    return {**batch, features.key: packed, "image_index": index}
  return {**batch, "images": packed, "image_index": index, "pixel_lut": images.pixel_lut(store.spec)}


class _BuildTrainBatch(grain.transforms.Map):
  """Stacks a batch's examples. With an image budget it packs their images (pack_images), with a row
  budget their full prompts (packing.pack_rows); first, while the distinct tiles or the prompts do not
  fit, it drops the oldest history item of the example showing most tiles (or with the longest prompt),
  counted in `dropped_history`."""

  def __init__(self, builder: PromptBuilder, image_budget: int = 0, row_offset: int = 0, pack_rows: int = 0,
               pack_row_offset: int = 0, pack_groups: int = 1, pack_items: bool = False, example_offset: int = 0,
               length_buckets: int = 0, image_multiple: int = 1, features: FeatureTable | None = None):
    if features is not None and not image_budget:
      raise ValueError("a feature table (train.cache_image_features) sends packed image rows: it needs an image budget")
    self.features = features
    self.build = _BuildTrainExample(builder, pixels=not image_budget)
    self.builder = builder
    self.image_budget = image_budget
    self.row_offset = row_offset
    self.pack_rows = pack_rows
    self.pack_row_offset = pack_row_offset
    self.pack_groups = pack_groups
    self.pack_items = pack_items
    self.example_offset = example_offset
    self.length_buckets = length_buckets
    self.image_multiple = image_multiple

  def map(self, windows: list[Window]) -> dict[str, np.ndarray]:
    windows = list(windows)
    examples = [self.build.map(w) for w in windows]
    extra = [0] * len(windows)  # history items dropped here, beyond the prompt's own drops
    seq_len = self.builder.layout.seq_len
    while True:
      tiles, plan = None, None
      if self.image_budget:
        tiles = [_slot_tiles(self.builder, w.history, w.target, int(e["dropped_history"]))
                 for w, e in zip(windows, examples)]
        size = [len(t) for t in tiles]
        fits = len({key for t in tiles for key in t}) <= self.image_budget
        what = f"data.image_budget={self.image_budget}"
      if self.pack_rows and (not self.image_budget or fits):
        segments = packing.segment_lengths([e["full_mask"] for e in examples],
                                           [e["item_mask"] for e in examples] if self.pack_items else None)
        plan = packing.plan_groups(segments, self.pack_rows, seq_len, self.pack_groups)
        fits, size, what = plan is not None, segments[:len(examples)], f"data.pack_rows={self.pack_rows}"
      if not (self.image_budget or self.pack_rows) or fits:
        break
      shorter = [j for j in range(len(windows)) if len(windows[j].history) > 1]
      if not shorter:
        raise ValueError(f"{what} is too small for a batch of {len(windows)} targets, each with one history item")
      b = max(shorter, key=lambda j: (size[j], -j))
      w = windows[b]
      windows[b] = Window(w.user_index, w.history[1:], w.target)
      extra[b] += 1
      examples[b] = self.build.map(windows[b])
    for e, n in zip(examples, extra):
      e["dropped_history"] = np.int32(e["dropped_history"] + n)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    if self.image_budget:
      batch = pack_images(batch, tiles, self.image_budget, self.builder.images, self.row_offset, self.features)
    if plan is not None:
      batch = packing.pack_rows(batch, plan, self.pack_row_offset, self.pack_groups, items=self.pack_items,
                                example_offset=self.example_offset)
    if self.length_buckets:
      batch = buckets.trim(batch, self.length_buckets, self.image_multiple)
    return batch


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Input workers never touch an accelerator: should anything in a worker start jax, it gets the CPU, not
  a share of the GPU or TPU the training process holds (each would try to take most of its memory)."""
  del worker_index, worker_count
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")


def _multiprocess(it: grain.IterDataset, options: grain.MultiprocessingOptions) -> grain.IterDataset:
  # grain's worker start-up reads absl flags; a library caller (a notebook, a test)
  # never parsed any, so take the defaults instead of failing.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it.mp_prefetch(options, worker_init_fn=_worker_init)


def split_bookkeeping(batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
  """(model inputs, bookkeeping fields) of a training batch."""
  inputs = {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
  return inputs, {k: batch[k] for k in BOOKKEEPING_KEYS if k in batch}


def _windows(train: Sequence[tuple[int, np.ndarray]], builder: PromptBuilder, seed: int) -> grain.MapDataset:
  """The stream of training windows: the users shuffled, epoch after epoch, one window drawn for each."""
  if not train:
    raise ValueError("no user has a training sequence of at least 2 items")
  # A finite but practically endless repeat (2**40 examples): grain's infinite
  # repeat reports sys.maxsize as its length, which a host slice cannot take at
  # batch size 1. Element i is the same either way.
  ds = grain.MapDataset.source(list(train)).seed(seed).shuffle().repeat(max(1, 2**40 // len(train)))
  # Windows are drawn by global position (from the seed itself, not from grain's
  # seed derivation, which shifts whenever an op is added upstream).
  return ds.random_map(_SampleWindow(builder.layout.max_history), seed=seed)


def train_dataset(train: Sequence[tuple[int, np.ndarray]], builder: PromptBuilder, *, batch_size: int, seed: int,
                  shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                  prefetch_buffer: int = 4, image_budget: int = 0, pack_rows: int = 0,
                  pack_groups: int = 1, pack_items: bool = False, length_buckets: int = 0,
                  image_multiple: int = 1, features: FeatureTable | None = None) -> grain.IterDataset:
  """An infinite iterator of training batches for host `shard_index` of `shard_count`
  (batch_size is per host). image_budget > 0 (per host): each batch carries its distinct
  image tiles once, in that many rows (pack_images). pack_rows > 0 (per host): the full
  prompts are packed into that many rows (packing.pack_rows), in pack_groups groups (the
  trainer's microbatches, train.grad_accum_steps); pack_items: the items read alone too (one
  decoder pass for both; data.packing). length_buckets > 0: each batch cut to the lengths it uses
  (buckets.trim; image rows in multiples of image_multiple). features: a frozen tower's table
  (data.features), whose rows the batches carry in place of pixels (with an image budget).

  `train` holds (user index, training sequence) pairs, as `catalog.leave_one_out` gives them.
  """
  if pack_rows < 0 or image_budget < 0:
    raise ValueError(f"pack_rows={pack_rows} and image_budget={image_budget} must be >= 0 here (data.pack_rows=-1 "
                     "is resolved by pixrec_jax.train.run.setup into a row count)")
  # Host h takes block h of every global batch (batch_size * shard_count examples), the rows its devices
  # hold: so the global batches, and the run, are the same on any number of hosts.
  ds = _windows(train, builder, seed).batch(batch_size, batch_fn=list)[shard_index::shard_count]
  if pack_items and not pack_rows:
    raise ValueError("data.pack_items packs the item pass into the full pass's packed rows: it needs data.pack_rows")
  if image_budget and builder.layout.text_only:
    raise ValueError("data.image_budget is set but the prompts have no images")
  ds = ds.map(_BuildTrainBatch(builder, image_budget, row_offset=shard_index * image_budget, pack_rows=pack_rows,
                               pack_row_offset=shard_index * pack_rows, pack_groups=pack_groups,
                               pack_items=pack_items, example_offset=shard_index * batch_size,
                               length_buckets=length_buckets, image_multiple=image_multiple,
                               features=features))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if num_workers else 1, prefetch_buffer_size=prefetch_buffer))
  if num_workers > 0:
    check_shared_memory(num_workers * prefetch_buffer * batch_nbytes(builder.layout, batch_size, image_budget,
                                                                     features),
                        f"data.num_workers={num_workers} x {prefetch_buffer} prefetched batches of {batch_size}")
    it = _multiprocess(it, grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch_buffer))
  return it


def sampled_examples(train: Sequence[tuple[int, np.ndarray]], builder: PromptBuilder, *, batch_size: int,
                     seed: int, batches: int) -> list[list[tuple[Window, dict[str, np.ndarray]]]]:
  """The first `batches` global training batches of `batch_size` as train_dataset draws them (same windows):
  each window with its example, no pixels read. The same on every host. data.pack_rows=-1 and
  data.image_budget=-1 read their counts from one such sample (sampled_prompt_lengths, sampled_image_tiles)."""
  ds = _windows(train, builder, seed).batch(batch_size, batch_fn=list)
  return [[(w, builder.train_example(w.history, w.target, pixels=False)) for w in ds[i]] for i in range(batches)]


def sampled_prompt_lengths(sample: list[list[tuple[Window, dict]]], items: bool = False) -> np.ndarray:
  """(batches, batch_size): the full prompts' lengths of sampled_examples' batches. items: (batches,
  2 x batch_size), each batch's packing.segment_lengths with its items (data.pack_items)."""
  return np.asarray([packing.segment_lengths([e["full_mask"] for _, e in batch],
                                             [e["item_mask"] for _, e in batch] if items else None)
                     for batch in sample])


def sampled_image_tiles(sample: list[list[tuple[Window, dict]]], builder: PromptBuilder,
                        shards: int = 1) -> np.ndarray:
  """(batches, shards): the distinct image tiles each host's block (of `shards` equal blocks, as
  train_dataset gives the hosts) of sampled_examples' batches shows."""
  out = np.zeros((len(sample), shards), np.int64)
  if builder.layout.text_only:
    return out
  for g, batch in enumerate(sample):
    n = len(batch) // shards
    for h in range(shards):
      keys = set()
      for w, e in batch[h * n:(h + 1) * n]:
        keys.update(_slot_tiles(builder, w.history, w.target, int(e["dropped_history"])))
      out[g, h] = len(keys)
  return out


def choose_image_budget(tiles: np.ndarray, *, slots: int, devices: int = 1, multiple: int = 8) -> int:
  """Rows for data.image_budget=-1 from sampled_image_tiles' (batches, shards) counts: the most any host's
  block of a sampled batch shows, rounded up to a multiple of `multiple` rows a host and so that the
  global rows split evenly over the data-parallel `devices`, but never more than a host's `slots` (its
  examples x image slots each: those always fit, and split as its examples do); the global budget (hosts x
  that). A later batch with more distinct tiles drops history items (counted)."""
  tiles = np.asarray(tiles)
  shards = tiles.shape[1]
  step = np.lcm(multiple, devices // np.gcd(devices, shards))
  per_host = -(-max(int(tiles.max()), 1) // step) * step
  return int(min(per_host, slots) * shards)


def batch_nbytes(layout, batch_size: int, image_budget: int = 0, features: FeatureTable | None = None) -> int:
  """About the bytes of one training batch of this layout: the pixels (uint8 packed rows, or float32
  slots) or a feature table's rows, and the int32 token arrays."""
  pixels = 3 * layout.image_size**2
  if layout.text_only:
    images = 0
  elif features is not None:
    images = image_budget * features.row_nbytes
  elif image_budget:
    images = image_budget * pixels
  else:
    images = batch_size * layout.example_image_slots * pixels * 4
  return images + batch_size * 4 * (4 * layout.seq_len + 2 * layout.item_len + 3 * layout.max_item_tokens)


def check_shared_memory(nbytes: int, what: str, path: str = "/dev/shm") -> None:
  """grain's worker processes hand batches over in POSIX shared memory; warn, naming the settings, when
  the batches they keep in flight would not fit in what `path` has free (a container's default is often
  64 MB), instead of letting the workers fail or stall later."""
  try:
    free = shutil.disk_usage(path).free
  except OSError:
    return
  if nbytes > free:
    warnings.warn(f"{what} keep about {nbytes / 2**20:,.0f} MiB in shared memory, but {path} has "
                  f"{free / 2**20:,.0f} MiB free: lower data.num_workers (or data.image_budget, the batch size), "
                  f"or give the machine or container more shared memory (docker run --shm-size)", stacklevel=2)


class _BuildEvalExample(grain.transforms.MapWithIndex):

  def __init__(self, make, num_real: int):
    self.make = make
    self.num_real = num_real

  def map_with_index(self, index: int, key) -> dict[str, np.ndarray]:
    return {**self.make(key), "valid": np.bool_(index < self.num_real)}


def _eval_dataset(keys: Sequence[Any], make, batch_size: int, num_workers: int) -> grain.IterDataset:
  """Batches of make(key) in order. The last batch is filled up by repeating the first
  key and marked with `valid`, so shapes stay static and nothing is dropped."""
  if not len(keys):
    raise ValueError("nothing to evaluate: the list of cases is empty")
  keys = list(keys)
  padded = keys + [keys[0]] * (-len(keys) % batch_size)
  ds = grain.MapDataset.source(padded).map_with_index(_BuildEvalExample(make, len(keys))).batch(batch_size)
  it = ds.to_iter_dataset()
  if num_workers > 0:
    it = _multiprocess(it, grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def catalog_dataset(builder: PromptBuilder, item_ids: Sequence[int], batch_size: int, num_workers: int = 0,
                    features: FeatureTable | None = None):
  """The given catalogue items, each read alone, in the given order (with `features`, a frozen tower's
  table, its rows in place of pixels)."""
  return _eval_dataset([int(i) for i in item_ids], functools.partial(builder.item_example, features=features),
                       batch_size, num_workers)


def user_dataset(builder: PromptBuilder, histories: Sequence[np.ndarray], batch_size: int, num_workers: int = 0,
                 features: FeatureTable | None = None):
  """History-only prompts, one per evaluation case, in order (`features` as catalog_dataset's)."""
  return _eval_dataset(histories, functools.partial(builder.user_example, features=features), batch_size,
                       num_workers)

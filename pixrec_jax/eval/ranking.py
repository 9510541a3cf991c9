"""Dense two-tower ranking of the whole catalogue, leak-free.

Every catalogue item is embedded by the item tower (the item read alone), every
held-out case's history by the user tower (the user segment alone: the target is
never in the prompt). Items are ranked by cosine similarity, by item id, so items
that share a text are still distinct candidates. Ties count against the target
(pessimistic): its rank is 1 + #items scoring higher + #other items scoring equal.

With several processes, each reads and embeds only its rows of every batch; the
embeddings are gathered onto every process, which then ranks every case: each case
counts once, and every process holds the same metrics (process 0 reports them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import uuid
from typing import Any, Callable, Hashable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pixrec_jax import sharding as shd
from pixrec_jax import xla_options
from pixrec_jax.data import pipeline
from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.data.examples import PromptBuilder
from pixrec_jax.eval.metrics import curve_from_ranks, metrics_from_ranks
from pixrec_jax.recsys.losses import l2_normalize


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  batch_size: int = 64
  mask_history: bool = True
  num_workers: int = 0
  progress: bool = True
  # A frozen tower's feature table (data.features.FeatureTable, train.cache_image_features): the dense towers
  # read its rows in place of encoding pixels.
  features: Any = dataclasses.field(default=None, compare=False)


@functools.lru_cache(maxsize=8)
def _jitted(fn, graphdef, mesh):
  """One compiled embedding function per tower, model structure and mesh, reused across splits.
  Its output is replicated so that every process can read all of it."""
  return jax.jit(lambda states, batch: fn(nnx.merge(graphdef, *states), batch), out_shardings=shd.replicated(mesh),
                 compiler_options=xla_options.for_mesh(mesh))


def _embed(fn, graphdef, states, keys: Sequence, make_batches, mesh, settings: EvalSettings,
           what: str) -> np.ndarray:
  """fn's embeddings of the examples of `keys`, in order, as one (len(keys), P) array on every process.

  Global batch k holds keys [k * B, (k + 1) * B) (the last one padded with keys[0]);
  each process reads only its block of rows of it, `make_batches(its keys, block size)`.
  """
  return np.concatenate(list(embedded_batches(fn, graphdef, states, keys, make_batches, mesh, settings, what)),
                        axis=0)[:len(keys)]


def embedded_batches(fn, graphdef, states, keys: Sequence, make_batches, mesh, settings: EvalSettings,
                     what: str) -> Iterator[np.ndarray]:
  """_embed's global batches one at a time (the last one's padding rows included), each on every process:
  for outputs too large to hold at once (pixrec_jax.train.run.encode_features writes them to a file)."""
  if not len(keys):
    raise ValueError(f"{what}: nothing to evaluate, the list is empty")
  size = settings.batch_size
  shard, shards = shd.process_batch_shard(mesh, size)
  block = size // shards
  padded = list(keys) + [keys[0]] * (-len(keys) % size)
  mine = [key for start in range(0, len(padded), size)
          for key in padded[start + shard * block:start + (shard + 1) * block]]
  jitted = _jitted(fn, graphdef, mesh)
  with jax.set_mesh(mesh):
    for batch in tqdm(make_batches(mine, block), total=len(padded) // size, desc=what, unit="batch",
                      disable=not settings.progress, leave=False):
      batch.pop("valid")  # padding is the tail of `padded`, cut below
      arrays = {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v)
                for k, v in batch.items()}
      yield np.asarray(jax.device_get(jitted(states, arrays)))


def _item_fn(model, batch):
  return l2_normalize(model.item_embedding(batch["item_ids"], batch["item_mask"], batch.get("item_images"),
                                           batch.get("item_image_valid"), model.cached_slot_features(batch, "item")))


def _user_fn(model, batch):
  mask = batch["user_mask"]
  return l2_normalize(model.user_embedding(batch["user_ids"], mask, mask, batch.get("user_images"),
                                           batch.get("user_image_valid"), model.cached_slot_features(batch, "user")))


def distinct_inputs(keys: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
  """(representative item of each distinct input, distinct index of every item).

  Items whose inputs are identical (same text and, with images, the same image
  file) must score exactly alike, so that ties among them are resolved by the
  pessimistic rule and not by floating-point noise of where each sat in a batch.
  """
  first: dict[Hashable, int] = {}
  inverse = np.empty(len(keys), np.int64)
  for item, key in enumerate(keys):
    inverse[item] = first.setdefault(key, len(first))
  representatives = np.empty(len(first), np.int64)
  representatives[inverse[::-1]] = np.arange(len(keys))[::-1]
  return representatives, inverse


def catalog_embeddings(graphdef, states, builder: PromptBuilder, item_keys: Sequence[Hashable], mesh,
                       settings: EvalSettings) -> np.ndarray:
  """(num_items, P) unit vectors, row i = item i. `item_keys[i]` identifies item i's input
  (e.g. its text and image hash): each distinct input is embedded once."""
  representatives, inverse = distinct_inputs(item_keys)
  make = lambda ids, size: pipeline.catalog_dataset(builder, ids, size, settings.num_workers, settings.features)
  distinct = _embed(_item_fn, graphdef, states, representatives.tolist(), make, mesh, settings, "embed catalogue")
  return distinct[inverse]


def user_embeddings(graphdef, states, builder: PromptBuilder, cases: Sequence[EvalCase], mesh,
                    settings: EvalSettings, what: str = "embed users") -> np.ndarray:
  make = lambda histories, size: pipeline.user_dataset(builder, histories, size, settings.num_workers,
                                                      settings.features)
  return _embed(_user_fn, graphdef, states, [c.history for c in cases], make, mesh, settings, what)


CACHE_DIR = "cache"
_NOT_MODEL_KEYS = ("eval", "checkpoint", "distributed")  # config groups that leave the weights alone


def fingerprint(config: dict, manifest: dict) -> str:
  """Hash of what a checkpoint's item embeddings depend on besides its step: the config (less the
  groups that cannot change the weights) and the dataset's manifest (its files' hashes)."""
  model_config = {k: v for k, v in config.items() if k not in _NOT_MODEL_KEYS}
  text = json.dumps([model_config, manifest], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class EmbeddingCache:
  """The catalogue's item embeddings of one checkpoint, WORKDIR/cache/item_embeddings_step{N}.npz.

  The file holds the embeddings and the fingerprint they were computed under; it is reused while
  step and fingerprint match and rewritten otherwise, so a re-evaluation of the same checkpoint
  skips the catalogue pass and a changed config or dataset never reads stale vectors. Written
  beside its name and renamed into place: never half written.
  """

  directory: pathlib.Path
  step: int
  fingerprint: str

  @property
  def path(self) -> pathlib.Path:
    return pathlib.Path(self.directory) / f"item_embeddings_step{self.step}.npz"

  def load(self) -> np.ndarray | None:
    try:
      with np.load(self.path, allow_pickle=False) as f:
        if str(f["fingerprint"]) != self.fingerprint or int(f["step"]) != self.step:
          return None
        return f["embeddings"]
    except (FileNotFoundError, KeyError, ValueError, OSError):
      return None

  def store(self, embeddings: np.ndarray) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.npz")
    try:
      np.savez(tmp, embeddings=np.asarray(embeddings, np.float32), fingerprint=np.asarray(self.fingerprint),
               step=np.asarray(self.step))
      tmp.replace(self.path)
    finally:
      tmp.unlink(missing_ok=True)

  def get(self, compute: Callable[[], np.ndarray], rows: int, write: bool = True) -> tuple[np.ndarray, bool]:
    """(the cached (rows, P) embeddings, True), or (compute(), False) after storing them when `write`."""
    cached = self.load()
    if cached is not None and cached.shape[0] == rows:
      return cached, True
    emb = compute()
    if write:
      self.store(emb)
    return emb, False


def cached_catalog_embeddings(graphdef, states, builder: PromptBuilder, item_keys: Sequence[Hashable], mesh,
                              settings: EvalSettings, cache: EmbeddingCache | None,
                              write: bool = True) -> tuple[np.ndarray, bool]:
  """(catalog_embeddings, whether they came from `cache`); computed and stored (when `write`: one
  process of a multi-process job) on a miss. Every process reads the same shared file, so all
  agree on whether to run the (collective) catalogue pass."""
  compute = lambda: catalog_embeddings(graphdef, states, builder, item_keys, mesh, settings)
  if cache is None:
    return compute(), False
  return cache.get(compute, len(item_keys), write)


@functools.partial(jax.jit, static_argnames="top_k")
def _ranks(users, items, targets, history, mask_history, top_k=0):
  """Ranks of the targets and (top_k > 0) the top_k (item ids, scores) of each row, on device: only
  these leave it, never the (c, N) score matrix."""
  scores = users @ items.T  # (c, N) float32
  rows = jnp.arange(users.shape[0])[:, None]
  # history is padded with N (out of range): dropped by the scatter.
  masked = scores.at[rows, history].set(-jnp.inf, mode="drop")
  scores = jnp.where(mask_history, masked, scores)
  target = jnp.take_along_axis(scores, targets[:, None], axis=1)
  higher = jnp.sum(scores > target, axis=1)
  ties = jnp.sum(scores == target, axis=1) - 1
  ranks = 1 + higher + ties
  if not top_k:
    return ranks, None, None
  # Exact; among equal scores the lower item id comes first, as recommend lists them.
  top_scores, top_ids = jax.lax.top_k(scores, top_k)
  return ranks, top_ids, top_scores


@dataclasses.dataclass(frozen=True)
class Ranked:
  """What ranking one list of cases gives: each target's rank (1 = first) and, when asked for, each
  case's top K items (ids best first, -inf scores for items that history masking removed)."""

  ranks: np.ndarray  # (c,) int
  top_ids: np.ndarray | None = None  # (c, K) int32
  top_scores: np.ndarray | None = None  # (c, K) float32


_MAX_CHUNK_SCORES = 1 << 26  # float32 scores on device at once (256 MiB), whatever the catalogue's size


def rank_cases(users: np.ndarray, items: np.ndarray, cases: Sequence[EvalCase], mask_history: bool,
               top_k: int = 0, chunk: int = 1024) -> Ranked:
  """Ranks every catalogue item for each case by users[c] . items[i] (any scorer that is an inner
  product: the towers, an item-item neighbour, popularity as a 1-d score), in chunks of cases
  small enough that a chunk's score matrix stays below _MAX_CHUNK_SCORES."""
  n = items.shape[0]
  if top_k > n:
    raise ValueError(f"top_k={top_k} is larger than the catalogue ({n} items)")
  chunk = max(1, min(chunk, _MAX_CHUNK_SCORES // max(n, 1)))
  items_dev = jnp.asarray(items, jnp.float32)
  ranks, ids, scores = [], [], []
  for start in range(0, len(cases), chunk):
    part = cases[start:start + chunk]
    width = max(1, max(len(c.history) for c in part))
    history = np.full((len(part), width), n, np.int32)
    for i, c in enumerate(part):
      history[i, :len(c.history)] = c.history
    targets = np.asarray([c.target for c in part], np.int32)
    r, i, s = jax.device_get(_ranks(jnp.asarray(users[start:start + len(part)], jnp.float32), items_dev,
                                    jnp.asarray(targets), jnp.asarray(history), jnp.asarray(mask_history),
                                    top_k=top_k))
    ranks.append(np.asarray(r))
    if top_k:
      ids.append(np.asarray(i))
      scores.append(np.asarray(s))
  if not top_k:
    return Ranked(np.concatenate(ranks))
  return Ranked(np.concatenate(ranks), np.concatenate(ids), np.concatenate(scores))


def rank_targets(users: np.ndarray, items: np.ndarray, cases: Sequence[EvalCase], mask_history: bool,
                 chunk: int = 1024) -> np.ndarray:
  """Rank of each case's target among all catalogue items (1 = first)."""
  return rank_cases(users, items, cases, mask_history, chunk=chunk).ranks


def slice_metrics(ranks: np.ndarray, selected: np.ndarray) -> dict:
  """{"users": n, "metrics": ...} of the cases `selected` (a boolean mask); metrics None when n is 0."""
  selected = np.asarray(selected, bool)
  n = int(selected.sum())
  return {"users": n, "metrics": metrics_from_ranks(ranks[selected]) if n else None}


def evaluate_split(graphdef, states, builder: PromptBuilder, cases: Sequence[EvalCase], item_emb: np.ndarray,
                   mesh, settings: EvalSettings, name: str,
                   seen_items: np.ndarray | None = None) -> tuple[dict[str, float], dict]:
  """Metrics for one split, plus a report of what was evaluated.

  The report holds Recall@K and NDCG@K for K in metrics.CURVE_KS ("curve", for plots) and, given
  `seen_items` (boolean, per item: in some training sequence), the cold-start slice: the cases
  whose target was never seen in training, with their count and metrics (None when there are none).
  """
  users = user_embeddings(graphdef, states, builder, cases, mesh, settings, f"embed {name} users")
  ranks = rank_targets(users, item_emb, cases, settings.mask_history)
  in_history = sum(int(c.target in set(c.history.tolist())) for c in cases)
  report = {"users": len(cases), "catalogue_items": int(item_emb.shape[0]), "mask_history": settings.mask_history,
            "targets_in_history": in_history, "ties": "pessimistic", "curve": curve_from_ranks(ranks)}
  if seen_items is not None:
    report["cold_start"] = slice_metrics(ranks, cold_start_cases(cases, seen_items))
  return metrics_from_ranks(ranks), report


def cold_start_cases(cases: Sequence[EvalCase], seen_items: np.ndarray) -> np.ndarray:
  """Boolean per case: its target is an item no training sequence holds."""
  return np.asarray([not seen_items[c.target] for c in cases], bool)

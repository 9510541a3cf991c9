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
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pixrec_jax import sharding as shd
from pixrec_jax.data import pipeline
from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.data.examples import PromptBuilder
from pixrec_jax.eval.metrics import metrics_from_ranks
from pixrec_jax.recsys.losses import l2_normalize


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  batch_size: int = 64
  mask_history: bool = True
  num_workers: int = 0
  progress: bool = True


@functools.lru_cache(maxsize=8)
def _jitted(fn, graphdef, mesh):
  """One compiled embedding function per tower, model structure and mesh, reused across splits.
  Its output is replicated so that every process can read all of it."""
  return jax.jit(lambda states, batch: fn(nnx.merge(graphdef, *states), batch), out_shardings=shd.replicated(mesh))


def _embed(fn, graphdef, states, keys: Sequence, make_batches, mesh, settings: EvalSettings,
           what: str) -> np.ndarray:
  """fn's embeddings of the examples of `keys`, in order, as one (len(keys), P) array on every process.

  Global batch k holds keys [k * B, (k + 1) * B) (the last one padded with keys[0]);
  each process reads only its block of rows of it, `make_batches(its keys, block size)`.
  """
  if not len(keys):
    raise ValueError(f"{what}: nothing to evaluate, the list is empty")
  size = settings.batch_size
  shard, shards = shd.process_batch_shard(mesh, size)
  block = size // shards
  padded = list(keys) + [keys[0]] * (-len(keys) % size)
  mine = [key for start in range(0, len(padded), size)
          for key in padded[start + shard * block:start + (shard + 1) * block]]
  out = []
  jitted = _jitted(fn, graphdef, mesh)
  with jax.set_mesh(mesh):
    for batch in tqdm(make_batches(mine, block), total=len(padded) // size, desc=what, unit="batch",
                      disable=not settings.progress, leave=False):
      batch.pop("valid")  # padding is the tail of `padded`, cut below
      arrays = {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v)
                for k, v in batch.items()}
      out.append(np.asarray(jax.device_get(jitted(states, arrays))))
  return np.concatenate(out, axis=0)[:len(keys)]


def _item_fn(model, batch):
  return l2_normalize(model.item_embedding(batch["item_ids"], batch["item_mask"], batch.get("item_images"),
                                           batch.get("item_image_valid")))


def _user_fn(model, batch):
  mask = batch["user_mask"]
  return l2_normalize(model.user_embedding(batch["user_ids"], mask, mask, batch.get("user_images"),
                                           batch.get("user_image_valid")))


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
  make = lambda ids, size: pipeline.catalog_dataset(builder, ids, size, settings.num_workers)
  distinct = _embed(_item_fn, graphdef, states, representatives.tolist(), make, mesh, settings, "embed catalogue")
  return distinct[inverse]


def user_embeddings(graphdef, states, builder: PromptBuilder, cases: Sequence[EvalCase], mesh,
                    settings: EvalSettings, what: str = "embed users") -> np.ndarray:
  make = lambda histories, size: pipeline.user_dataset(builder, histories, size, settings.num_workers)
  return _embed(_user_fn, graphdef, states, [c.history for c in cases], make, mesh, settings, what)


@jax.jit
def _ranks(users, items, targets, history, mask_history):
  scores = users @ items.T  # (c, N) float32
  rows = jnp.arange(users.shape[0])[:, None]
  # history is padded with N (out of range): dropped by the scatter.
  masked = scores.at[rows, history].set(-jnp.inf, mode="drop")
  scores = jnp.where(mask_history, masked, scores)
  target = jnp.take_along_axis(scores, targets[:, None], axis=1)
  higher = jnp.sum(scores > target, axis=1)
  ties = jnp.sum(scores == target, axis=1) - 1
  return 1 + higher + ties


def rank_targets(users: np.ndarray, items: np.ndarray, cases: Sequence[EvalCase], mask_history: bool,
                 chunk: int = 1024) -> np.ndarray:
  """Rank of each case's target among all catalogue items (1 = first)."""
  n = items.shape[0]
  items_dev = jnp.asarray(items, jnp.float32)
  ranks = []
  for start in range(0, len(cases), chunk):
    part = cases[start:start + chunk]
    width = max(1, max(len(c.history) for c in part))
    history = np.full((len(part), width), n, np.int32)
    for i, c in enumerate(part):
      history[i, :len(c.history)] = c.history
    targets = np.asarray([c.target for c in part], np.int32)
    ranks.append(np.asarray(_ranks(jnp.asarray(users[start:start + len(part)], jnp.float32), items_dev,
                                   jnp.asarray(targets), jnp.asarray(history), jnp.asarray(mask_history))))
  return np.concatenate(ranks)


def evaluate_split(graphdef, states, builder: PromptBuilder, cases: Sequence[EvalCase], item_emb: np.ndarray,
                   mesh, settings: EvalSettings, name: str) -> tuple[dict[str, float], dict]:
  """Metrics for one split, plus a report of what was evaluated."""
  users = user_embeddings(graphdef, states, builder, cases, mesh, settings, f"embed {name} users")
  ranks = rank_targets(users, item_emb, cases, settings.mask_history)
  in_history = sum(int(c.target in set(c.history.tolist())) for c in cases)
  report = {"users": len(cases), "catalogue_items": int(item_emb.shape[0]), "mask_history": settings.mask_history,
            "targets_in_history": in_history, "ties": "pessimistic"}
  return metrics_from_ranks(ranks), report

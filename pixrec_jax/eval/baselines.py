"""Baselines ranked on the model's own splits, with its history masking and its tie rule.

Each is an inner-product scorer, so ranking.rank_cases ranks them exactly as it ranks the
two towers:
- "popularity": an item's score is how often it occurs in the training sequences
  (the only interactions training sees), the same list for every user; items of equal
  count tie, and ties count against the target.
- "last_item_nn": cosine similarity, in the trained model's item-tower space, between
  each catalogue item and the last item of the user's history (the item the user just
  bought). With history masking on, that item itself is left out.

The text-only backbone, the third baseline, is a model trained on the same data without
images: `python -m pixrec_jax.compare` trains and reports both.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pixrec_jax.data.catalog import EvalCase, Splits
from pixrec_jax.eval import ranking
from pixrec_jax.eval.metrics import curve_from_ranks, metrics_from_ranks

BASELINES = ("popularity", "last_item_nn")


def train_counts(splits: Splits, num_items: int) -> np.ndarray:
  """(num_items,) how often each item occurs in the training sequences."""
  counts = np.zeros(num_items, np.int64)
  for _, items in splits.train:
    np.add.at(counts, np.asarray(items, np.int64), 1)
  return counts


def seen_items(splits: Splits, num_items: int) -> np.ndarray:
  """(num_items,) bool: the item occurs in some training sequence (as a history item or a target).

  A case whose target is not seen is cold start: training never showed that item in a
  purchase sequence (its text and image may still be known from the catalogue).
  """
  return train_counts(splits, num_items) > 0


def popularity(cases: Sequence[EvalCase], splits: Splits, num_items: int, mask_history: bool,
               top_k: int = 0) -> ranking.Ranked:
  counts = train_counts(splits, num_items).astype(np.float32)  # exact below 2**24 occurrences
  return ranking.rank_cases(np.ones((len(cases), 1), np.float32), counts[:, None], cases, mask_history, top_k)


def last_item_nn(cases: Sequence[EvalCase], item_emb: np.ndarray, mask_history: bool,
                 top_k: int = 0) -> ranking.Ranked:
  empty = [i for i, c in enumerate(cases) if not len(c.history)]
  if empty:
    raise ValueError(f"last_item_nn needs a history item; case {empty[0]} has an empty history")
  last = np.asarray([c.history[-1] for c in cases], np.int64)
  return ranking.rank_cases(item_emb[last], item_emb, cases, mask_history, top_k)


def evaluate(names: Sequence[str], cases: Sequence[EvalCase], splits: Splits, item_emb: np.ndarray,
             mask_history: bool) -> dict[str, dict]:
  """{name: {"metrics", "curve", "cold_start"}} for each baseline in `names`."""
  unknown = [n for n in names if n not in BASELINES]
  if unknown:
    raise ValueError(f"eval.baselines: unknown baseline(s) {unknown}; valid: {BASELINES} (the text-only model "
                     "is trained by python -m pixrec_jax.compare)")
  num_items = item_emb.shape[0]
  cold = ranking.cold_start_cases(cases, seen_items(splits, num_items))
  out = {}
  for name in names:
    if name == "popularity":
      ranks = popularity(cases, splits, num_items, mask_history).ranks
    else:
      ranks = last_item_nn(cases, item_emb, mask_history).ranks
    out[name] = {"metrics": metrics_from_ranks(ranks), "curve": curve_from_ranks(ranks),
                 "cold_start": ranking.slice_metrics(ranks, cold)}
  return out

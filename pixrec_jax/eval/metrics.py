"""Ranking metrics from the rank of each user's held-out target (1 = best)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

RECALL_KS = (1, 5, 10, 20)
NDCG_KS = (10, 20)


def metrics_from_ranks(ranks: np.ndarray, recall_ks: Sequence[int] = RECALL_KS,
                       ndcg_ks: Sequence[int] = NDCG_KS) -> dict[str, float]:
  """Recall@K, NDCG@K (one relevant item: 1/log2(rank+1) inside the top K) and MRR
  (over the full ranking), each computed per user in float32 and averaged."""
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"expected a non-empty vector of ranks, got shape {ranks.shape}")
  if ranks.min() < 1:
    raise ValueError(f"ranks start at 1, got a minimum of {ranks.min()}")
  r = ranks.astype(np.float32)
  out = {}
  for k in recall_ks:
    out[f"recall@{k}"] = float(np.mean((r <= k).astype(np.float32)))
  gain = (1.0 / np.log2(r + 1.0)).astype(np.float32)
  for k in ndcg_ks:
    out[f"ndcg@{k}"] = float(np.mean(np.where(r <= k, gain, np.float32(0.0))))
  out["mrr"] = float(np.mean((1.0 / r).astype(np.float32)))
  return out


CURVE_KS = (1, 2, 3, 5, 10, 20, 50)


def curve_from_ranks(ranks: np.ndarray, ks: Sequence[int] = CURVE_KS) -> dict[str, list]:
  """Recall@K and NDCG@K at each K of `ks`, for plotting them against K: {"k", "recall", "ndcg"}."""
  m = metrics_from_ranks(ranks, recall_ks=ks, ndcg_ks=ks)
  return {"k": list(ks), "recall": [m[f"recall@{k}"] for k in ks], "ndcg": [m[f"ndcg@{k}"] for k in ks]}

"""Ranking metrics and whole-catalogue ranking on hand-built cases."""

import math

import numpy as np
import pytest

from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.eval.metrics import metrics_from_ranks
from pixrec_jax.eval.ranking import rank_targets


def test_metrics_equal_hand_computed_values():
  ranks = np.array([1, 3, 12, 25])
  m = metrics_from_ranks(ranks)
  assert m["recall@1"] == pytest.approx(0.25)
  assert m["recall@5"] == pytest.approx(0.5)
  assert m["recall@10"] == pytest.approx(0.5)
  assert m["recall@20"] == pytest.approx(0.75)
  assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 4, abs=1e-6)
  assert m["ndcg@20"] == pytest.approx((1.0 + 1 / math.log2(4) + 1 / math.log2(13)) / 4, abs=1e-6)
  assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 25) / 4, abs=1e-6)


def test_metrics_reject_zero_based_ranks():
  with pytest.raises(ValueError, match="ranks start at 1"):
    metrics_from_ranks(np.array([0, 1]))


def _case(history, target):
  return EvalCase(user_index=0, history=np.asarray(history, np.int32), target=target)


def test_rank_is_pessimistic_on_ties_and_by_item_id():
  items = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)  # items 0 and 1 identical
  users = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  cases = [_case([], 0), _case([], 1), _case([], 3)]
  ranks = rank_targets(users, items, cases, mask_history=False)
  # Targets 0 and 1 tie with each other: both rank 2, never 1. Target 3 is second for user 2.
  assert ranks.tolist() == [2, 2, 2]


def test_history_masking_removes_history_items_from_the_ranking():
  items = np.eye(4, dtype=np.float32)
  users = np.array([[0.9, 0.1, 0.3, 0.0]], np.float32)
  users = users / np.linalg.norm(users)
  cases = [_case([0], 2)]
  assert rank_targets(users, items, cases, mask_history=False).tolist() == [2]
  assert rank_targets(users, items, cases, mask_history=True).tolist() == [1]


def test_distinct_inputs_maps_every_item_to_its_first_twin():
  from pixrec_jax.eval.ranking import distinct_inputs

  reps, inverse = distinct_inputs(["a", "b", "a", "c", "b", "a"])
  assert reps.tolist() == [0, 1, 3]
  assert inverse.tolist() == [0, 1, 0, 2, 1, 0]

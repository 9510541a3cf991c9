"""The mixed objective against plain numpy computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from pixrec_jax.recsys import losses
from pixrec_jax.recsys.model import pool


def _np_info_nce(q, k, ids, tau):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  total = 0.0
  for i in range(len(q)):
    logits = [q[i] @ k[j] / tau for j in range(len(k)) if j == i or ids[j] != ids[i]]
    pos = q[i] @ k[i] / tau
    total += -(pos - np.log(np.sum(np.exp(logits))))
  return total / len(q)


def test_info_nce_matches_numpy_and_masks_false_negatives():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  ids = np.array([3, 7, 3, 1, 9, 7])  # items 3 and 7 appear twice
  loss, _ = losses.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(ids), 0.3)
  assert np.isclose(float(loss), _np_info_nce(q, k, ids, 0.3), atol=1e-5)
  unmasked, _ = losses.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.arange(6), 0.3)
  assert not np.isclose(float(loss), float(unmasked), atol=1e-4), "false negatives must change the loss"


def test_info_nce_accuracy_counts_rows_whose_positive_wins():
  k = np.eye(4)
  q = np.eye(4)[[0, 1, 3, 3]]  # row 2 points at key 3
  _, acc = losses.info_nce(jnp.asarray(q), jnp.asarray(k), jnp.arange(4), 0.5)
  assert float(acc) == pytest.approx(0.75)


def test_next_item_generation_is_masked_token_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 7))
  labels = np.array([[1, 2, 3], [4, 5, 6]])
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  loss, _ = losses.next_item_generation(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 0, 4]) / 3
  assert float(loss) == pytest.approx(want, abs=1e-5)


def test_mixed_loss_weights_sum_to_one_with_nig_remainder():
  w = losses.LossWeights(alpha=0.125, beta=-0.025, temperature=0.5)
  assert w.nig == pytest.approx(0.9)
  rng = np.random.default_rng(2)
  outputs = {"nig_logits": jnp.asarray(rng.normal(size=(4, 3, 5))),
             "user": jnp.asarray(rng.normal(size=(4, 8))),
             "target_given_user": jnp.asarray(rng.normal(size=(4, 8))),
             "item": jnp.asarray(rng.normal(size=(4, 8)))}
  batch = {"nig_labels": jnp.zeros((4, 3), jnp.int32), "nig_weights": jnp.ones((4, 3)),
           "target_item": jnp.arange(4)}
  loss, m = losses.mixed_loss(outputs, batch, w)
  m = {k: float(v) for k, v in m.items()}
  assert float(loss) == pytest.approx(0.9 * m["nig"] + 0.125 * m["l_tt"] - 0.025 * m["l_ut"], abs=1e-5)


def test_mean_pooling_ignores_padding_and_last_pooling_takes_last_real_token():
  rng = np.random.default_rng(3)
  hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
  mean = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), "mean"))
  assert np.allclose(mean[0], hidden[0, :3].mean(0), atol=1e-6)
  assert np.allclose(mean[1], hidden[1, 1:].mean(0), atol=1e-6)
  poisoned = hidden.copy()
  poisoned[mask == 0] = 1e6
  assert np.allclose(np.asarray(pool(jnp.asarray(poisoned), jnp.asarray(mask), "mean")), mean, atol=1e-5)
  last = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), "last"))
  assert np.allclose(last[0], hidden[0, 2]) and np.allclose(last[1], hidden[1, 4])

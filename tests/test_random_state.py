"""Trainer.random_state: the benchmarks' cheap state has the real state's structure, shapes, dtypes and
shardings, and a train step runs on it."""

import jax
import numpy as np
from flax import nnx

from tests import tiny_backbones


def test_random_state_matches_init_state_and_trains():
  trainer = tiny_backbones.text_only_trainer()
  real, fast = trainer.init_state(), trainer.random_state(seed=3)
  assert jax.tree.structure(real) == jax.tree.structure(fast)
  for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(fast)):
    assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
  flat = dict(nnx.to_flat_state(fast.params))
  kernel = np.asarray(flat[("user_proj", "kernel")][...])
  assert 0.01 < kernel.std() < 0.03  # N(0, 0.02), not a constant
  assert np.all(np.asarray(flat[("backbone", "text_model", "norm", "weight")][...]) == 1.0)
  assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(fast.opt_state))
  rng = np.random.default_rng(0)
  b, s, k = 4, 12, 3
  batch = dict(full_ids=rng.integers(0, 60, (b, s)).astype(np.int32), full_mask=np.ones((b, s), np.int32),
               user_mask=np.r_[[1] * 8 + [0] * 4][None].repeat(b, 0).astype(np.int32),
               target_mask=np.r_[[0] * 8 + [1] * 4][None].repeat(b, 0).astype(np.int32),
               nig_positions=np.tile(np.arange(7, 10, dtype=np.int32), (b, 1)),
               nig_labels=rng.integers(0, 60, (b, k)).astype(np.int32), nig_weights=np.ones((b, k), np.float32),
               item_ids=rng.integers(0, 60, (b, 6)).astype(np.int32), item_mask=np.ones((b, 6), np.int32),
               target_item=np.arange(b, dtype=np.int32))
  state, metrics = trainer.step(fast, batch)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1

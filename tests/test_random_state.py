"""Trainer.random_state: the benchmarks' cheap state has the real state's structure, shapes, dtypes and
shardings, and a train step runs on it."""

import jax
import numpy as np
from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime, TextConfig, VisionConfig
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer


def test_random_state_matches_init_state_and_trains():
  text = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
  vision = VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        image_size=16, patch_size=8)
  bcfg = BackboneConfig("idefics3", text, vision, scale_factor=1, image_token_id=63)
  model_fn = lambda: PixRec(Backbone(bcfg, Runtime(), rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=8, text_only=True),
                            rngs=nnx.Rngs(1))
  tx, _ = optim.optimizer(lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
  trainer = Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), shd.make_mesh(1, 1, 1))
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

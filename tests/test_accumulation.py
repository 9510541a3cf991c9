"""Gradient accumulation gives the large batch's loss, gradient and update exactly (tiny SmolVLM PixRec)."""

import jax
import numpy as np
import pytest
from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.data import pipeline
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer
from tests.conftest import tiny_pixrec_fn


def _trainer(model_fn, k):
  tx, sched = optim.optimizer(lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.01, clip_norm=1.0)
  # Contrastive weights well away from zero, so that a wrong in-batch gradient would show.
  return Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), shd.make_mesh(devices=jax.devices()[:1]),
                 sched, grad_accum_steps=k)


@pytest.fixture(scope="module", params=["slots", "packed_images", "packed_prompts", "packed_items"])
def batches(request, image_builder, small_splits):
  """{k: the batch for k microbatches}: every image slot; its distinct tiles packed into 32 rows
  (data.image_budget), which the microbatches share; or its prompts packed into 8 rows (data.pack_rows) in
  k groups, one per microbatch (the same examples, in another order: the loss does not depend on it); or
  those prompts and their items read alone (data.pack_items) in 16 rows (so that nothing is dropped)."""
  out = {}
  for k in (1, 4):
    kw = {"packed_images": dict(image_budget=32), "packed_prompts": dict(pack_rows=8, pack_groups=k),
          "packed_items": dict(pack_rows=16, pack_groups=k, pack_items=True)}.get(request.param, {})
    it = iter(pipeline.train_dataset(small_splits.train, image_builder, batch_size=8, seed=0, **kw))
    out[k] = pipeline.split_bookkeeping(next(it))[0]
    assert ("image_index" in out[k]) == (request.param == "packed_images")
    assert ("example_row" in out[k]) == (request.param in ("packed_prompts", "packed_items"))
    assert ("feature_order" in out[k]) == (request.param == "packed_items")
  return out


def _flat(tree):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


def test_accumulated_step_equals_the_large_batch_step(word_tokenizer, batches):
  model_fn = tiny_pixrec_fn(word_tokenizer)
  assert len(set(batches[1]["target_item"].tolist())) > 2  # in-batch negatives exist
  state = _trainer(model_fn, 1).init_state()
  results = {}
  for k in (1, 4):  # 4 microbatches of 2: the hardest split of this batch; k=2 adds a compile, no case
    trainer = _trainer(model_fn, k)
    grad_fn = trainer._accumulated_loss_and_grads if k > 1 else trainer._loss_and_grads
    # One program per k (no donation, so every k starts from the same state): the gradient and the update
    # that _train_step makes from it.
    metrics, grads, (new_state, step_metrics) = jax.jit(
        lambda s, b: (lambda m, g: (m, g, trainer._update(s, dict(m), g)))(*grad_fn(s, b)))(state, batches[k])
    results[k] = (jax.device_get(metrics), _flat(grads), _flat(new_state.params), jax.device_get(step_metrics))
  metrics1, grads1, params1, step1 = results[1]
  assert np.mean([np.abs(g).max() for g in grads1.values()]) > 1e-4
  assert not np.allclose(params1[("user_proj", "kernel")], _flat(state.params)[("user_proj", "kernel")])
  for k in (4,):
    metrics, grads, params, step = results[k]
    for name in ("loss", "nig", "l_tt", "l_ut", "nig_token_acc", "tt_acc", "ut_acc"):
      np.testing.assert_allclose(metrics[name], metrics1[name], rtol=1e-5, atol=1e-6, err_msg=f"k={k} {name}")
      np.testing.assert_allclose(step[name], metrics1[name], rtol=1e-5, atol=1e-6, err_msg=f"k={k} step {name}")
    np.testing.assert_allclose(step["grad_norm"], step1["grad_norm"], rtol=1e-5)
    assert grads.keys() == grads1.keys()
    for path in grads1:
      np.testing.assert_allclose(grads[path], grads1[path], rtol=1e-4, atol=1e-6, err_msg=f"k={k} grad {path}")
      np.testing.assert_allclose(params[path], params1[path], rtol=1e-5, atol=1e-5, err_msg=f"k={k} param {path}")


def test_a_batch_size_not_divisible_by_the_microbatch_count_is_an_error(word_tokenizer, batches):
  trainer = _trainer(tiny_pixrec_fn(word_tokenizer), 3)
  with pytest.raises(ValueError, match="train.batch_size=8 is not divisible by train.grad_accum_steps=3"):
    trainer.step(None, batches[1])  # refused before the state is read or the step compiled
  with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
    _trainer(tiny_pixrec_fn(word_tokenizer), 0)

"""data.length_buckets: batches cut to the lengths they use give the uncut batches' loss, gradients and update."""

import itertools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from pixrec_jax import config_lib, flops
from pixrec_jax import sharding as shd
from pixrec_jax.data import buckets, pipeline
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.train import optim, run
from pixrec_jax.train.trainer import Trainer
from tests.conftest import tiny_pixrec_fn

KINDS = {"slots": {}, "packed_images": dict(image_budget=24), "packed_items": dict(pack_rows=4, pack_items=True)}


def _batches(builder, splits, n, batch_size=4, **kw):
  it = pipeline.train_dataset(splits.train, builder, batch_size=batch_size, seed=3, **kw)
  return [pipeline.split_bookkeeping(b)[0] for b in itertools.islice(it, n)]


def test_sizes_are_evenly_spaced_rounded_up_and_end_at_the_limit():
  assert buckets.sizes(544, 4, 8) == [136, 272, 408, 544]
  assert buckets.sizes(6, 4) == [2, 3, 5, 6]
  assert buckets.sizes(100, 3, 8) == [40, 72, 100]  # 34 -> 40, 67 -> 72, the limit itself
  assert buckets.sizes(3, 8) == [1, 2, 3]  # no repeats
  assert buckets.bucket(137, 544, 4, 8) == 272 and buckets.bucket(136, 544, 4, 8) == 136
  with pytest.raises(ValueError, match="uses 545 positions of an axis of 544"):
    buckets.bucket(545, 544, 4, 8)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_cut_batch_is_the_uncut_batch_less_its_padding(image_builder, small_splits, kind):
  layout = image_builder.layout
  uncut = _batches(image_builder, small_splits, 6, **KINDS[kind])
  cut = _batches(image_builder, small_splits, 6, length_buckets=4, **KINDS[kind])
  shorter = 0
  for a, b in zip(uncut, cut):
    assert set(a) == set(b)
    n = b["full_ids"].shape[1]
    assert n in buckets.sizes(layout.seq_len, 4, 8)
    shorter += any(a[k].shape != b[k].shape for k in a)
    for key in set(a) - {"nig_positions", "feature_order"}:
      cut_axes = tuple(slice(0, m) for m in b[key].shape)
      np.testing.assert_array_equal(b[key], a[key][cut_axes], err_msg=key)  # a prefix of the uncut array
      rest = a[key].copy()
      rest[cut_axes] = 0
      if key in ("full_mask", "user_mask", "target_mask", "item_mask", "image_valid", "full_ids", "item_ids"):
        assert not rest.any(), key  # and all it left out is padding
    real = a["nig_weights"] > 0
    np.testing.assert_array_equal(b["nig_positions"][real], a["nig_positions"][real])
    assert b["nig_positions"].max() < n
    if kind == "packed_images":
      used = int(a["image_index"][a["image_valid"].astype(bool)].max()) + 1
      assert b["images"].shape[0] == buckets.bucket(used, a["images"].shape[0], 4)
  assert shorter  # some batches were cut


def _trainer(model_fn):
  tx, sched = optim.optimizer(lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.01, clip_norm=1.0)
  return Trainer(model_fn, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2), shd.make_mesh(devices=jax.devices()[:1]),
                 sched)


def _flat(tree):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_cut_batch_gives_the_uncut_loss_gradients_and_update(image_builder, small_splits, word_tokenizer, kind):
  """Every kind of image batch: slots cut (and, with the items packed, feature_order renumbered for the fewer
  slots: a wrong one would hand the items other tiles), packed image rows cut, packed rows' tokens cut."""
  kw = KINDS[kind]
  uncut, cut = (_batches(image_builder, small_splits, 3, **kw, **extra) for extra in ({}, dict(length_buckets=4)))
  # The batch cut the most: its loss would move if the cut dropped anything read.
  j = min(range(3), key=lambda i: cut[i]["full_ids"].shape[1] * cut[i]["image_valid"].shape[1] * len(cut[i]["images"]))
  a, b = uncut[j], cut[j]
  if kind != "packed_items":  # (its 4 rows, each a prompt and an item, stay long)
    assert b["full_ids"].shape[1] < a["full_ids"].shape[1]
  if kind == "packed_images":
    assert b["images"].shape[0] < a["images"].shape[0]
  else:
    assert b["image_valid"].shape[1] < a["image_valid"].shape[1]
  trainer = _trainer(tiny_pixrec_fn(word_tokenizer))
  state = trainer.init_state()
  run_step = jax.jit(lambda s, batch: (lambda m, g: (m, g, trainer._update(s, dict(m), g)))(
      *trainer._loss_and_grads(s, batch)))
  results = []
  for batch in (a, b):
    metrics, grads, (new_state, _) = run_step(state, batch)
    results.append((jax.device_get(metrics), _flat(grads), _flat(new_state.params)))
  (m1, g1, p1), (m2, g2, p2) = results
  assert np.mean([np.abs(g).max() for g in g1.values()]) > 1e-4
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in g1:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=1e-6, err_msg=str(k))
    # Adam's first step is about lr * sign(g): where |g| is near its eps, rounding moves it; elsewhere it is exact.
    clear = np.abs(g1[k]) > 1e-5
    np.testing.assert_allclose(p2[k][clear], p1[k][clear], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_flops_of_a_cut_batch_count_its_own_shapes(image_builder, small_splits):
  layout = image_builder.layout
  b = _batches(image_builder, small_splits, 1, length_buckets=4, image_budget=24)[0]
  shapes = flops.batch_step_shapes(layout, {k: v.shape for k, v in b.items()})
  assert (shapes.batch, shapes.seq_len, shapes.item_len, shapes.images) == (
      4, b["full_ids"].shape[1], b["item_ids"].shape[1], b["images"].shape[0])
  assert shapes.full_rows == 0 and not shapes.items_packed
  full = flops.batch_step_shapes(layout, {k: v.shape for k, v in _batches(image_builder, small_splits, 1)[0].items()})
  assert full == flops.step_shapes(layout, 4)  # an uncut batch: the layout's shapes


def test_the_paper_option_trains_on_cut_batches_and_counts_their_flops(tmp_path, capsys):
  """The paper's batch of 1 with cut batches: the job compiles a few shapes, says so, and logs the TFLOP/s of
  the steps it ran. The full-size configs' paper option cuts (the tiny demo's does not); a negative setting is
  refused."""
  args = ["--config", "configs/demo.py:paper", "--config.data.synthetic.num_users=60", "--config.train.epochs=0",
          "--config.train.steps=12", "--config.train.log_every=6"]
  assert config_lib.parse_args(args)[0].data.length_buckets == 0
  for name in ("smolvlm_256m", "paligemma2_3b_224", "smollm2_360m"):
    assert [config_lib.load_config_file(f"configs/{name}.py{arg}").data.length_buckets for arg in ("", ":paper")] == [
        0, 4], name
  cfg, _ = config_lib.parse_args(args + ["--config.data.length_buckets=4"])
  job = run.setup(cfg, tmp_path)
  assert job.length_buckets == 4 and cfg.train.batch_size == 1
  _, summary = run.train(job, run.init_state(job))
  assert summary["length_buckets"] == 4 and 1 < summary["batch_shapes"] <= 4**3
  out = capsys.readouterr().out + capsys.readouterr().err
  assert "a batch of a new shape (rows of" in out  # pack_rows=-1 packs batch 1 into one row
  records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [6, 12] and all(r["tflops_per_device"] > 0 for r in records)
  with pytest.raises(ValueError, match="data.length_buckets=-1"):
    run.setup(config_lib.parse_args(args + ["--config.data.length_buckets=-1"])[0], tmp_path / "bad")


def test_several_processes_keep_static_shapes_and_say_so(capsys):
  """Each host cuts its own block: with several processes the setting is off, and process 0 says why."""
  assert run.resolve_length_buckets(4, 1, 0) == 4 and run.resolve_length_buckets(0, 2, 0) == 0
  assert run.resolve_length_buckets(4, 2, 0) == 0
  assert "data.length_buckets=4 is off in this run" in capsys.readouterr().out
  assert run.resolve_length_buckets(4, 2, 1) == 0 and not capsys.readouterr().out  # process 0 speaks alone
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="data.length_buckets="):
      run.resolve_length_buckets(bad, 1, 0)


def test_a_run_resumed_from_a_checkpoint_cuts_the_same_batches(tmp_path):
  """The data iterator's checkpointed state gives the resumed run the same windows, so the same cut shapes:
  its log and its final arrays are the uninterrupted run's."""
  import shutil  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train import checkpoint  # pylint: disable=import-outside-toplevel

  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py:paper", "--config.data.synthetic.num_users=60",
                                  "--config.train.epochs=0", "--config.train.steps=8", "--config.train.log_every=1",
                                  "--config.checkpoint.every_steps=4", "--config.data.length_buckets=4"])
  cfg.eval.splits = ()
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  run.train_and_evaluate(cfg, whole)
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")
  out = run.train_and_evaluate(cfg, resumed)
  assert out["report"]["batch_shapes"] > 1
  strip = lambda r: {k: v for k, v in r.items() if k not in ("examples_per_s", "tflops_per_device", "mfu")}
  logs = [[strip(json.loads(line)) for line in (w / "train_log.jsonl").read_text().splitlines()]
          for w in (whole, resumed)]
  assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == list(range(1, 9))
  arrays = [checkpoint.Checkpointer(w / "checkpoints", read_only=True).arrays(8) for w in (whole, resumed)]
  assert all(arrays[0][k].tobytes() == arrays[1][k].tobytes() for k in arrays[0])

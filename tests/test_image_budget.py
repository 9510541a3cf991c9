"""data.image_budget: a batch carries each distinct image tile once, and the model's outputs do not change."""

import itertools
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from pixrec_jax.data import pipeline
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime, TextConfig, VisionConfig
from pixrec_jax.recsys.model import HeadsConfig, PixRec, decode_pixels


def _batches(builder, splits, n, batch_size=8, **kw):
  return list(itertools.islice(pipeline.train_dataset(splits.train, builder, batch_size=batch_size, seed=5, **kw), n))


def test_packed_rows_give_every_slot_its_tile_and_nothing_else_changes(image_builder, small_splits):
  plain, packed = _batches(image_builder, small_splits, 3), _batches(image_builder, small_splits, 3, image_budget=48)
  for a, b in zip(plain, packed):
    assert b["images"].shape[0] == 48 and set(b) == set(a) | {"image_index", "pixel_lut"}
    valid = a["image_valid"]
    # uint8 rows and their table: the table's floats are the plain batch's pixels bit for bit.
    assert b["images"].dtype == np.uint8 and b["pixel_lut"].shape == (3, 256)
    floats = np.asarray(decode_pixels(b["images"], b["pixel_lut"]))
    np.testing.assert_array_equal(floats[b["image_index"]][valid], a["images"][valid])
    for k in a:
      if k != "images":
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # One row per distinct item shown (one tile per image here), in first-seen order.
    shown = {int(t) for t in b["target_item"]}
    for hist, dropped in zip(b["history_items"], b["dropped_history"]):
      shown |= {int(i) for i in hist[hist >= 0][dropped:]}
    used = np.unique(b["image_index"][valid])
    np.testing.assert_array_equal(used, np.arange(len(shown)))
    assert len(shown) < valid.sum()  # this batch repeats some images


def test_a_small_budget_drops_the_longest_histories_oldest_items(image_builder, small_splits):
  plain, packed = _batches(image_builder, small_splits, 4), _batches(image_builder, small_splits, 4, image_budget=16)
  dropped = sum(int(b["dropped_history"].sum()) for b in packed) - sum(int(a["dropped_history"].sum()) for a in plain)
  assert dropped > 0
  for a, b in zip(plain, packed):
    assert len(np.unique(b["image_index"][b["image_valid"]])) <= 16
    np.testing.assert_array_equal(a["target_item"], b["target_item"])  # the same windows, shortened
    for ha, hb in zip(a["history_items"], b["history_items"]):
      ha, hb = ha[ha >= 0], hb[hb >= 0]
      assert len(hb) >= 1 and list(hb) == list(ha[len(ha) - len(hb):])
  with pytest.raises(ValueError, match="image_budget=8 is too small"):
    _batches(image_builder, small_splits, 1, image_budget=8)


def test_train_outputs_equal_with_packed_images(image_builder, small_splits, word_tokenizer):
  text = TextConfig(vocab_size=len(word_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=32, patch_size=8)
  cfg = BackboneConfig("idefics3", text, vision, scale_factor=2,
                       image_token_id=word_tokenizer.convert_tokens_to_ids("<image>"))
  model = PixRec(Backbone(cfg, Runtime(), rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=16), rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  outputs = jax.jit(lambda batch: nnx.merge(graphdef, state).train_outputs(batch))
  a = outputs(pipeline.split_bookkeeping(_batches(image_builder, small_splits, 1, 4)[0])[0])
  b = outputs(pipeline.split_bookkeeping(_batches(image_builder, small_splits, 1, 4, image_budget=24)[0])[0])
  assert b["nig_logits"].shape == a["nig_logits"].shape
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_shared_memory_estimate_and_warning(image_builder, small_splits, monkeypatch):
  """The bytes a batch puts in shared memory are estimated within a quarter, and too little /dev/shm warns
  with the settings to change."""
  for budget in (0, 48):
    batch = _batches(image_builder, small_splits, 1, image_budget=budget)[0]
    actual = sum(v.nbytes for v in batch.values())
    estimate = pipeline.batch_nbytes(image_builder.layout, 8, budget)
    assert 0.75 * actual < estimate < 1.25 * actual, (budget, actual, estimate)
  monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: type("U", (), {"free": 64 << 20})())
  with pytest.warns(UserWarning, match=r"data.num_workers=12 .* 3,000 MiB in shared memory, but /dev/shm has 64 MiB"):
    pipeline.check_shared_memory(3000 << 20, "data.num_workers=12 x 4 prefetched batches of 16")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    pipeline.check_shared_memory(32 << 20, "fits")


def test_sampled_tiles_are_the_distinct_tiles_each_hosts_block_shows(image_builder, small_splits):
  """data.image_budget=-1 counts, without reading pixels, the distinct tiles train_dataset's batches hold: for
  each global batch and each host's block of it (here 2 hosts of 4 examples)."""
  sample = pipeline.sampled_examples(small_splits.train, image_builder, batch_size=8, seed=5, batches=3)
  counts = pipeline.sampled_image_tiles(sample, image_builder, shards=2)
  assert counts.shape == (3, 2)
  for host in range(2):
    it = pipeline.train_dataset(small_splits.train, image_builder, batch_size=4, seed=5, shard_index=host,
                                shard_count=2, image_budget=64)
    for g, b in enumerate(itertools.islice(it, 3)):
      assert int(b["dropped_history"].sum()) == 0
      assert len(np.unique(b["image_index"][b["image_valid"]])) == counts[g, host], (g, host)
  assert counts.max() < 4 * (image_builder.layout.max_history + 1)  # fewer than the slots


def test_chosen_budget_holds_the_most_tiles_in_rows_that_split_evenly():
  choose = pipeline.choose_image_budget
  # One host: the most tiles seen, up to a multiple of 8 rows.
  assert choose(np.array([[40], [71], [12]]), slots=192) == 72
  assert choose(np.array([[64]]), slots=192) == 64
  # 3 data-parallel devices: a multiple of 24.
  assert choose(np.array([[50]]), slots=192, devices=3) == 72
  # 2 hosts of 2 devices each: 16 rows a host (the busier host's 9 tiles), 32 in all.
  assert choose(np.array([[5, 9], [3, 4]]), slots=24, devices=4) == 32
  assert choose(np.zeros((2, 1), int), slots=192) == 8
  # Never more rows than the slots (the paper's batch of 1: 6 slots, not 8 rows).
  assert choose(np.array([[5]]), slots=6) == 6
  assert choose(np.array([[5, 6]]), slots=6, devices=2) == 12


def test_budget_chosen_from_the_data_at_setup(tmp_path):
  """data.image_budget=-1: setup resolves it from the data (and to 0 without images); other negatives and a
  budget without images are errors that name the setting."""
  from pixrec_jax import config_lib  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train import run  # pylint: disable=import-outside-toplevel
  small = ["--config.data.synthetic.num_users=60", "--config.train.batch_size=8", "--config.data.pack_rows=0",
           "--config.data.pack_items=False"]
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py", *small, "--config.data.image_budget=-1"])
  job = run.setup(cfg, tmp_path / "images")
  slots = 8 * (job.builder.layout.max_history + 1)
  assert 0 < job.image_budget < slots and job.image_budget % 8 == 0
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py:text_only", *small, "--config.data.image_budget=-1"])
  assert run.setup(cfg, tmp_path / "text").image_budget == 0
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py:text_only", *small, "--config.data.image_budget=16"])
  with pytest.raises(ValueError, match=r"data.image_budget=16 is set but the prompts have no images"):
    run.setup(cfg, tmp_path / "text2")
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py", *small, "--config.data.image_budget=-2"])
  with pytest.raises(ValueError, match=r"data.image_budget=-2: use a row count"):
    run.setup(cfg, tmp_path / "bad")

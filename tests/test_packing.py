"""data.pack_rows: the full prompts packed end to end into fewer rows, and nothing the model computes changes."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.data import examples, images, packing, pipeline, processors
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import Runtime
from pixrec_jax.recsys.losses import LossWeights
from pixrec_jax.recsys.model import HeadsConfig, PixRec
from pixrec_jax.train import optim
from pixrec_jax.train.trainer import Trainer
from tests.conftest import make_builder
from tests.tiny_backbones import IMAGE_SIZE, backbone_configs


def _builder(ds, tok, bcfg, max_history=5):
  texts = [ds.item_text(i) for i in range(ds.num_items)]
  layout = examples.PromptBuilder.plan(tok, texts, max_history=max_history, image_seq_len=bcfg.image_seq_len,
                                       image_size=IMAGE_SIZE, style=examples.prompt_style(bcfg.model_type))
  store = images.ImageStore([ds.image_path(i) for i in range(ds.num_items)],
                            processors.default_image_spec(bcfg.model_type, IMAGE_SIZE))
  return examples.PromptBuilder(tok, texts, store, layout)


def _batches(builder, splits, n, batch_size=8, **kw):
  return list(itertools.islice(pipeline.train_dataset(splits.train, builder, batch_size=batch_size, seed=5, **kw), n))


def _order(plain, packed):
  """i such that packed example j is plain example i[j] (same user, target and history)."""
  key = lambda b, j: (int(b["user_index"][j]), int(b["target_item"][j]), tuple(b["history_items"][j]))
  where = {key(plain, i): i for i in range(len(plain["target_item"]))}
  return np.asarray([where[key(packed, j)] for j in range(len(packed["target_item"]))])


def test_plan_rows_is_first_fit_decreasing():
  assert packing.plan_rows([30, 20, 10, 40], rows=2, seq_len=64) == [[1, 3], [0, 2]]
  assert packing.plan_rows([30, 20, 10, 40], rows=3, seq_len=64) == [[1, 3], [0, 2], []]
  assert packing.plan_rows([10, 60, 50, 40, 30], rows=3, seq_len=64) is None
  assert packing.plan_rows([10, 60, 50, 40, 30], rows=4, seq_len=64) == [[1], [0, 2], [3], [4]]
  with pytest.raises(ValueError, match="example 1: a prompt of 65 tokens is longer than the row"):
    packing.plan_rows([3, 65], rows=2, seq_len=64)


def test_each_prompt_is_one_segment_of_a_packed_row(image_builder, small_splits):
  plain_list, packed_list = _batches(image_builder, small_splits, 3), _batches(image_builder, small_splits, 3,
                                                                                 pack_rows=6)
  s = image_builder.layout.seq_len
  for plain, packed in zip(plain_list, packed_list):
    assert packed["full_ids"].shape == (6, s) and packed["target_item"].shape == (8,)
    order = _order(plain, packed)
    assert sorted(order) == list(range(8))
    for key in set(plain) - {"full_ids", "full_mask", "user_mask", "target_mask", "nig_positions"}:
      np.testing.assert_array_equal(packed[key], plain[key][order], err_msg=key)
    # Rows in order: example_row never decreases, segments count 1, 2, .. in each row.
    assert np.all(np.diff(packed["example_row"]) >= 0)
    for j, i in enumerate(order):
      row, mask = packed["example_row"][j], plain["full_mask"][i].astype(bool)
      segment = 1 + int(np.sum(packed["example_row"][:j] == row))
      mine = packed["full_mask"][row] == segment
      np.testing.assert_array_equal(packed["full_ids"][row][mine], plain["full_ids"][i][mask])
      np.testing.assert_array_equal(packed["full_positions"][row][mine], np.arange(mask.sum()))
      offset = int(np.argmax(mine))
      for key in ("user_mask", "target_mask"):
        np.testing.assert_array_equal(np.flatnonzero(packed[key][j]), offset + np.flatnonzero(plain[key][i]))
      real = plain["nig_weights"][i] > 0
      np.testing.assert_array_equal(packed["full_ids"][row][packed["nig_positions"][j][real]],
                                    plain["full_ids"][i][plain["nig_positions"][i][real]])
    # Every real token kept once, and the padding gone where prompts share rows.
    assert (packed["full_mask"] > 0).sum() == plain["full_mask"].sum()


def test_a_small_row_budget_drops_the_longest_prompts_oldest_items(image_builder, small_splits):
  plain_list, packed_list = _batches(image_builder, small_splits, 3), _batches(image_builder, small_splits, 3,
                                                                                 pack_rows=4)
  extra = sum(int(b["dropped_history"].sum()) for b in packed_list)
  assert extra > sum(int(a["dropped_history"].sum()) for a in plain_list)
  for plain, packed in zip(plain_list, packed_list):
    assert packed["full_ids"].shape[0] == 4
    # Histories were shortened: match the examples by user and target.
    pairs = {(int(u), int(t)): j for j, (u, t) in enumerate(zip(packed["user_index"], packed["target_item"]))}
    for i, (u, t) in enumerate(zip(plain["user_index"], plain["target_item"])):
      ha, hb = plain["history_items"][i], packed["history_items"][pairs[(int(u), int(t))]]
      ha, hb = ha[ha >= 0], hb[hb >= 0]
      assert len(hb) >= 1 and list(hb) == list(ha[len(ha) - len(hb):])  # the newest items kept
  with pytest.raises(ValueError, match="data.pack_rows=1 is too small"):
    _batches(image_builder, small_splits, 1, pack_rows=1)


def test_items_are_segments_of_the_rows_too(image_builder, small_splits):
  """data.pack_items: each example's item read alone is one more segment of the rows, after the row's prompts;
  feature_order hands out each image slot twice (as a prompt's and as an item's), and nothing else changes."""
  plain_list = _batches(image_builder, small_splits, 2)
  packed_list = _batches(image_builder, small_splits, 2, pack_rows=8, pack_items=True)
  for plain, packed in zip(plain_list, packed_list):
    order = _order(plain, packed)
    assert packed["item_mask"].shape == (8, image_builder.layout.seq_len) and "item_ids" not in packed
    for key in set(plain) - {"full_ids", "full_mask", "user_mask", "target_mask", "nig_positions", "item_ids",
                             "item_mask"}:
      np.testing.assert_array_equal(packed[key], plain[key][order], err_msg=key)
    for j, i in enumerate(order):
      row, mine = packed["item_row"][j], packed["item_mask"][j].astype(bool)
      item = plain["item_mask"][i].astype(bool)
      np.testing.assert_array_equal(packed["full_ids"][row][mine], plain["item_ids"][i][item])
      np.testing.assert_array_equal(packed["full_positions"][row][mine], np.arange(item.sum()))
      segment = packed["full_mask"][row][mine]
      assert len(set(segment)) == 1 and (packed["full_mask"][row] == segment[0]).sum() == item.sum()
      # After every prompt of its row.
      prompts_end = max((np.flatnonzero(packed["target_mask"][e]).max()
                         for e in np.flatnonzero(packed["example_row"] == row)), default=-1)
      assert np.flatnonzero(mine).min() > prompts_end
    assert (packed["full_mask"] > 0).sum() == plain["full_mask"].sum() + plain["item_mask"].sum()
    slots = plain["image_valid"].shape[1]
    assert packed["feature_order"].shape == (8, 2 * slots)
    np.testing.assert_array_equal(np.sort(packed["feature_order"].ravel()), np.arange(16 * slots))


def test_pack_items_needs_pack_rows(image_builder, small_splits):
  with pytest.raises(ValueError, match="data.pack_items .* needs data.pack_rows"):
    _batches(image_builder, small_splits, 1, pack_items=True)


@pytest.mark.parametrize("family,image_budget,items", [("smolvlm", 0, False), ("smolvlm", 40, False),
                                                       ("paligemma", 0, False), ("smolvlm", 0, True),
                                                       ("smolvlm", 40, True), ("paligemma", 0, True),
                                                       ("text", 0, True)])
def test_train_outputs_are_those_of_the_unpacked_batch(small_dataset, word_tokenizer, small_splits, family,
                                                       image_budget, items):
  """Packed prompts (and with data.pack_items their items read alone, with their target's tiles: a wrong
  feature_order would give the items other images) give the unpacked batch's outputs."""
  text_only = family == "text"
  bcfg = backbone_configs(word_tokenizer)["smolvlm" if text_only else family]
  builder = make_builder(small_dataset, word_tokenizer, text_only=True) if text_only else _builder(
      small_dataset, word_tokenizer, bcfg)
  model = PixRec(Backbone(bcfg, Runtime(), rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=16, text_only=text_only),
                 rngs=nnx.Rngs(1))
  graphdef, state = nnx.split(model)
  outputs = jax.jit(lambda batch: nnx.merge(graphdef, state).train_outputs(batch))
  rows = 8 if items else 5
  plain = _batches(builder, small_splits, 1, image_budget=image_budget)[0]
  packed = _batches(builder, small_splits, 1, image_budget=image_budget, pack_rows=rows, pack_items=items)[0]
  assert packed["full_ids"].shape[0] == rows and ("item_row" in packed) == items
  assert ("feature_order" in packed) == (items and not text_only)
  order = _order(plain, packed)
  a = outputs(pipeline.split_bookkeeping(plain)[0])
  b = outputs(pipeline.split_bookkeeping(packed)[0])
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k])[order], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_a_batch_packed_for_other_microbatches_is_refused(image_builder, small_splits, word_tokenizer):
  """Microbatch j of k reads rows j, j + k, ..: a batch packed for another k would mix examples' rows.
  (tests/test_sharding.py trains on packed prompts on a mesh; tests/test_accumulation.py with microbatches.)"""
  packed = {k: pipeline.split_bookkeeping(_batches(image_builder, small_splits, 1, pack_rows=8, pack_groups=k)[0])[0]
            for k in (1, 2)}
  tx, sched = optim.optimizer(lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.01, clip_norm=1.0)
  trainer = lambda k: Trainer(lambda: None, tx, nnx.Param, LossWeights(0.3, 0.4, 0.2),
                              shd.make_mesh(devices=jax.devices()[:1]), sched, grad_accum_steps=k)
  for k, other in ((2, 1), (1, 2)):
    trainer(k).check_batch_size(packed[k])
    with pytest.raises(ValueError, match=f"packed for another train.grad_accum_steps than {k}"):
      trainer(k).check_batch_size(packed[other])


def test_rows_chosen_from_the_data_are_those_the_training_batches_need(image_builder, small_splits):
  """data.pack_rows=-1: the sampled lengths are the training batches' own, and the rows are a quantile of
  the fewest each batch fits, per microbatch group, rounded to the devices."""
  sample = pipeline.sampled_examples(small_splits.train, image_builder, batch_size=8, seed=5, batches=4)
  lengths = pipeline.sampled_prompt_lengths(sample)
  plain = _batches(image_builder, small_splits, 4)
  np.testing.assert_array_equal(lengths, [b["full_mask"].sum(axis=1) for b in plain])
  s = image_builder.layout.seq_len
  need = [packing.fewest_rows(list(b), s) for b in lengths]
  assert packing.choose_rows(lengths, s, quantile=1.0) == max(need) < 8
  assert packing.choose_rows(lengths, s, quantile=0.0) == min(need)
  grouped = packing.choose_rows(lengths, s, groups=2, multiple=2, quantile=1.0)
  assert grouped % 4 == 0 and grouped >= max(sum(packing.fewest_rows(list(b[j::2]), s) for j in (0, 1))
                                             for b in lengths)
  assert packing.choose_rows(np.full((2, 8), s), s) == 8  # never more rows than examples


@pytest.mark.parametrize("batch,items", [(1, False), (8, True)])
def test_rows_chosen_from_the_data_take_the_items_only_where_that_reads_fewer_tokens(tmp_path, batch, items):
  """data.pack_rows=-1 with data.pack_items: a batch of 1 (the paper's) would need a second row of seq_len for
  its item, more than the item pass's one of item_len, so its items stay apart; at 8 they share the rows."""
  from pixrec_jax import config_lib  # pylint: disable=import-outside-toplevel
  from pixrec_jax.train import run  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.parse_args(["--config", "configs/demo.py", "--config.data.synthetic.num_users=60",
                                  f"--config.train.batch_size={batch}", "--config.data.pack_rows=-1",
                                  "--config.data.pack_items=True", "--config.data.image_budget=0"])
  job = run.setup(cfg, tmp_path)
  layout = job.builder.layout
  assert job.pack_items == items
  if items:
    assert job.pack_rows * layout.seq_len < batch * (layout.seq_len + layout.item_len)
  else:
    assert job.pack_rows == 1

"""Prompts, examples and the grain training pipeline on the synthetic catalogue."""

import itertools

import numpy as np
import pytest

from pixrec_jax.data import pipeline, prompts
from tests.conftest import make_builder


def _decode(tokenizer, ids):
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def test_user_prompt_follows_the_paper_template(small_dataset, word_tokenizer, text_builder):
  history = [3, 10, 42]
  ids, shown = text_builder.user_segment(history)
  assert shown == []
  texts = [small_dataset.item_text(i) for i in history]
  want = prompts.HISTORY_INTRO + texts[0] + prompts.HISTORY_NEXT + texts[1] + prompts.HISTORY_NEXT + texts[2] \
      + prompts.TARGET_SEPARATOR
  # The word tokenizer splits on whitespace, so compare word sequences.
  assert _decode(word_tokenizer, ids).split() == want.split()


def test_image_prompt_places_one_image_block_after_each_item(image_builder, word_tokenizer):
  ids, shown = image_builder.user_segment([3, 10])
  assert shown == [3, 10]
  image_id = word_tokenizer.convert_tokens_to_ids("<image>")
  assert sum(1 for i in ids if i == image_id) == 2 * image_builder.layout.image_seq_len
  words = _decode(word_tokenizer, ids).split()
  block = ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * 4 + ["<fake_token_around_image>"]
  first = words.index("<fake_token_around_image>")
  assert words[first:first + len(block)] == block
  assert words[first - 1] == "Image:"


def test_train_example_segments_and_next_item_labels(image_builder, small_dataset, word_tokenizer):
  ex = image_builder.train_example([5, 17], 33)
  n_user = int(ex["user_mask"].sum())
  assert (ex["user_mask"] + ex["target_mask"] == ex["full_mask"]).all()
  assert ex["user_mask"][:n_user].all() and not ex["target_mask"][:n_user].any()
  target_words = small_dataset.item_text(33).split()
  labels = ex["nig_labels"][ex["nig_weights"] > 0]
  assert _decode(word_tokenizer, labels).split() == target_words
  # Each label is the token right after its position: a next-token target inside the target segment.
  pos = ex["nig_positions"][ex["nig_weights"] > 0]
  assert (ex["full_ids"][pos + 1] == labels).all()
  assert pos[0] == n_user - 1
  assert ex["image_valid"].tolist() == [True, True, True, False, False, False]
  assert int(ex["target_slot"]) == 2
  # The item pass reads the target alone: its tokens are the target segment.
  target_ids = ex["full_ids"][ex["target_mask"] == 1]
  assert (ex["item_ids"][:len(target_ids)] == target_ids).all() and ex["item_mask"].sum() == len(target_ids)


def test_text_only_examples_have_no_image_tokens(text_builder, word_tokenizer):
  ex = text_builder.train_example([5, 17], 33)
  assert "images" not in ex
  special = {word_tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>", "<global-img>")}
  assert not special & set(ex["full_ids"].tolist()) and not special & set(ex["item_ids"].tolist())


def test_item_text_truncation_keeps_the_budget(small_dataset, word_tokenizer):
  builder = make_builder(small_dataset, word_tokenizer, text_only=True, max_item_tokens=4)
  ex = builder.train_example([1, 2], 3)
  assert ex["nig_weights"].sum() == 4
  ids, _ = builder.target_segment(3)
  assert _decode(word_tokenizer, ids).split() == small_dataset.item_text(3).split()[:4]


def test_windows_never_reach_validation_or_test_targets(image_builder, small_splits):
  held_out = {c.user_index: c.target for c in small_splits.valid}
  tests = {c.user_index: c.target for c in small_splits.test}
  train_seqs = dict(small_splits.train)
  it = iter(pipeline.train_dataset(small_splits.train, image_builder, batch_size=16, seed=3))
  seen = 0
  for batch in itertools.islice(it, 40):  # 640 windows: every user several times
    for u, target, hist in zip(batch["user_index"], batch["target_item"], batch["history_items"]):
      u = int(u)
      items = [int(h) for h in hist if h >= 0] + [int(target)]
      assert held_out[u] not in items and tests[u] not in items, f"user {u}: a window reached a held-out target"
      seq = train_seqs[u].tolist()
      starts = [i for i in range(len(seq)) if seq[i:i + len(items)] == items]
      assert starts, f"user {u}: window {items} is not a contiguous part of the training sequence"
      seen += 1
  assert seen == 640


def test_window_lengths_are_uniform_and_bounded():
  rng = np.random.default_rng(0)
  seq = np.arange(4)
  lengths = [len(pipeline.sample_window(0, seq, 5, rng).history) for _ in range(3000)]
  assert set(lengths) == {1, 2, 3}  # bounded by what the user has: n - 1
  counts = np.bincount(lengths)[1:]
  assert np.all(np.abs(counts / 3000 - 1 / 3) < 0.04)
  with pytest.raises(ValueError, match="at least 2 items"):
    pipeline.sample_window(7, np.arange(1), 5, rng)


def _first_batches(builder, splits, seed, n=3, **kw):
  it = iter(pipeline.train_dataset(splits.train, builder, batch_size=8, seed=seed, **kw))
  return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_for_a_seed(text_builder, small_splits):
  a = _first_batches(text_builder, small_splits, seed=11)
  b = _first_batches(text_builder, small_splits, seed=11)
  c = _first_batches(text_builder, small_splits, seed=12)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not all(np.array_equal(x["full_ids"], z["full_ids"]) for x, z in zip(a, c))


def test_host_shards_partition_the_users(text_builder, small_splits):
  users = [set(), set()]
  for shard in range(2):
    for batch in _first_batches(text_builder, small_splits, seed=5, n=5, shard_index=shard, shard_count=2):
      users[shard] |= set(batch["user_index"].tolist())
  assert users[0] and users[1] and not users[0] & users[1]


def test_pipeline_state_can_be_saved_and_restored(text_builder, small_splits):
  it = iter(pipeline.train_dataset(small_splits.train, text_builder, batch_size=8, seed=2))
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it2 = iter(pipeline.train_dataset(small_splits.train, text_builder, batch_size=8, seed=2))
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_eval_batches_cover_every_item_once_in_order(image_builder, small_dataset):
  seen = []
  for batch in pipeline.catalog_dataset(image_builder, range(small_dataset.num_items), batch_size=64):
    assert batch["item_ids"].shape[0] == 64
    seen.append(batch["valid"])
  valid = np.concatenate(seen)
  assert valid.sum() == small_dataset.num_items and valid[:small_dataset.num_items].all()


def test_worker_processes_give_the_same_batches_and_resume(text_builder, small_splits):
  # Randomness is derived from the seed and each element's index, never from which
  # worker made it, so the worker count changes speed only.
  single = _first_batches(text_builder, small_splits, seed=4, n=4)
  it = iter(pipeline.train_dataset(small_splits.train, text_builder, batch_size=8, seed=4, num_workers=2))
  multi = [next(it) for _ in range(2)]
  state = it.get_state()
  multi += [next(it) for _ in range(2)]
  for x, y in zip(single, multi):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  resumed = iter(pipeline.train_dataset(small_splits.train, text_builder, batch_size=8, seed=4, num_workers=2))
  resumed.set_state(state)
  for want in single[2:]:
    got = next(resumed)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_batch_size_one_works_on_every_host_count(text_builder, small_splits):
  # The paper preset trains with batch 1; grain's endless repeat used to overflow the host slice.
  for shards in (1, 2):
    it = iter(pipeline.train_dataset(small_splits.train, text_builder, batch_size=1, seed=3,
                                     shard_index=shards - 1, shard_count=shards))
    batch = next(it)
    assert batch["full_ids"].shape[0] == 1

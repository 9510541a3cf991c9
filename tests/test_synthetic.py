"""Tests for the synthetic generator: format, determinism, idempotence and the design
properties that make images matter."""

import collections
import dataclasses
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import transformers
from PIL import Image

from pixrec_jax.data import catalog
from pixrec_jax.data import synthetic

_SMALL = synthetic.SyntheticOptions(num_groups=20, num_users=400)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic.generate(tmp_path_factory.mktemp("syn") / "data", _SMALL)


@pytest.fixture(scope="module")
def truth(dataset):
  return json.loads((dataset.path / synthetic.TRUTH_FILE).read_text())


def _files(root):
  return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def _image_colour(path) -> str:
  """The palette colour nearest to the most common non-background pixel."""
  pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
  values, counts = np.unique(pixels, axis=0, return_counts=True)
  counts[(values == synthetic._BACKGROUND).all(axis=1)] = 0
  dominant = values[np.argmax(counts)].astype(int)
  names, rgbs = zip(*synthetic.PALETTE)
  return names[int(np.argmin([np.sum((dominant - rgb) ** 2) for rgb in rgbs]))]


def test_counts_and_format(dataset):
  loaded = catalog.load_dataset(dataset.path, verify_hashes=True)
  counts = loaded.manifest["counts"]
  single = _SMALL.num_groups - counts["multi_variant_groups"]
  assert single == round(_SMALL.single_variant_fraction * _SMALL.num_groups)
  assert counts["items"] == len(synthetic.PALETTE) * counts["multi_variant_groups"] + single == loaded.num_items
  assert counts["users"] == len(loaded.users) == _SMALL.num_users
  assert counts["interactions"] == sum(len(u.items) for u in loaded.users)
  assert loaded.manifest["name"] == "synthetic"
  assert loaded.manifest["options"] == json.loads(json.dumps(dataclasses.asdict(_SMALL)))
  assert loaded.tokenizer_path is not None
  assert "tokenizer/tokenizer.json" in loaded.manifest["files"]
  for item in loaded.items:
    assert set(item.fields) == {"title", "main_category", "brand", "price"}
    with Image.open(loaded.image_path(item.item_id)) as image:
      assert image.format == "PNG" and image.mode == "RGB"
      assert image.size == (_SMALL.image_size, _SMALL.image_size)


def test_histories(dataset):
  lengths = [len(u.items) for u in dataset.users]
  assert min(lengths) >= _SMALL.min_history and max(lengths) <= _SMALL.max_history
  assert len(set(lengths)) == _SMALL.max_history - _SMALL.min_history + 1
  for user in dataset.users:
    assert len(set(user.items.tolist())) == len(user.items)  # Never bought twice.
    assert np.all(np.diff(user.timestamps) > 0)


def test_exact_lengths_without_repeats_when_successors_cycle(tmp_path):
  # Single-item groups with one successor each walk into a cycle; unless it spans all
  # six groups (not so for seed 0) only the fresh-start fallback can finish a history.
  options = synthetic.SyntheticOptions(
      num_groups=6, single_variant_fraction=1.0, num_users=40, min_history=6, max_history=6,
      successors_per_group=1, successor_probs=(1.0,))
  dataset = synthetic.generate(tmp_path / "data", options)
  truth = json.loads((dataset.path / synthetic.TRUTH_FILE).read_text())
  successors, groups = truth["group_successors"], truth["item_group"]
  for user in dataset.users:
    assert sorted(user.items.tolist()) == list(range(6))
  colours = [list(dict(synthetic.PALETTE)).index(c) for c in truth["item_colour"]]
  family = lambda item: synthetic.colour_family(colours[item], options.colour_families)
  jumps = sum(groups[b] != successors[groups[a]][family(a)][0]
              for u in dataset.users for a, b in zip(u.items[:-1], u.items[1:]))
  assert jumps > 0


def test_group_transitions_follow_the_successors_of_the_last_colour(dataset, truth):
  groups = np.asarray(truth["item_group"])
  names = list(dict(synthetic.PALETTE))
  family = [synthetic.colour_family(names.index(c), _SMALL.colour_families) for c in truth["item_colour"]]
  successors = truth["group_successors"]
  steps = [(groups[a], family[a], groups[b]) for u in dataset.users for a, b in zip(u.items[:-1], u.items[1:])]
  followed = sum(g2 in successors[g][f] for g, f, g2 in steps)
  assert followed / len(steps) > 0.98  # Only the rare fresh start after _MAX_DRAWS leaves the list.
  first_choice = sum(g2 == successors[g][f][0] for g, f, g2 in steps) / len(steps)
  assert abs(first_choice - _SMALL.successor_probs[0]) < 0.05
  # The other family's list explains the steps worse: the colour just bought matters.
  other = sum(g2 == successors[g][1 - f][0] for g, f, g2 in steps) / len(steps)
  assert other < first_choice - 0.2


def test_variants_share_text_but_not_pixels(dataset, truth):
  by_group = collections.defaultdict(list)
  for item_id, group in enumerate(truth["item_group"]):
    by_group[group].append(item_id)
  multi = [ids for ids in by_group.values() if len(ids) > 1]
  assert len(multi) == dataset.manifest["counts"]["multi_variant_groups"]
  for ids in multi:
    assert len(ids) == len(synthetic.PALETTE)
    assert len({dataset.item_text(i) for i in ids}) == 1
    pictures = {np.asarray(Image.open(dataset.image_path(i))).tobytes() for i in ids}
    assert len(pictures) == len(ids)
    assert sorted(_image_colour(dataset.image_path(i)) for i in ids) == sorted(
        name for name, _ in synthetic.PALETTE)
  # Different product lines never share a text, so text identifies the line.
  texts = {dataset.item_text(ids[0]) for ids in by_group.values()}
  assert len(texts) == len(by_group)


def test_pictures_show_the_recorded_colour(dataset, truth):
  for item in dataset.items:
    assert _image_colour(dataset.image_path(item.item_id)) == truth["item_colour"][item.item_id]


def test_colour_never_in_text(dataset):
  vocab = transformers.AutoTokenizer.from_pretrained(dataset.tokenizer_path).get_vocab()
  for name, _ in synthetic.PALETTE:
    for item in dataset.items:
      assert name not in dataset.item_text(item.item_id).lower()
    assert not [word for word in vocab if name in word.lower()]


def test_purchases_follow_colour_preference(dataset, truth):
  colours = np.asarray(truth["item_colour"])
  multi = np.bincount(truth["item_group"])[truth["item_group"]] > 1
  matches = total = 0
  for user in dataset.users:
    bought = user.items[multi[user.items]]
    if len(bought) == 0:
      continue
    favourite = collections.Counter(colours[bought].tolist()).most_common(1)[0][0]
    matches += np.sum(colours[bought] == favourite)
    total += len(bought)
  assert abs(matches / total - _SMALL.colour_loyalty) < 0.04
  preferred = np.asarray(truth["user_colour"])
  recorded = sum(np.sum(colours[u.items[multi[u.items]]] == c) for u, c in zip(dataset.users, preferred))
  assert abs(recorded / total - _SMALL.colour_loyalty) < 0.04


def test_tokenizer_covers_every_item_text(dataset):
  tokenizer = transformers.AutoTokenizer.from_pretrained(dataset.tokenizer_path)
  for item in dataset.items:
    text = dataset.item_text(item.item_id)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(text.split())


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
  again = synthetic.generate(tmp_path / "again", _SMALL)
  assert again.manifest == dataset.manifest
  other = synthetic.generate(tmp_path / "other", dataclasses.replace(_SMALL, seed=1))
  for name in ("items.jsonl", "users.jsonl"):
    assert other.manifest["files"][name] != dataset.manifest["files"][name]
  # The catalogue has its own random stream: fewer users, same items and pictures.
  fewer = synthetic.generate(tmp_path / "fewer", dataclasses.replace(_SMALL, num_users=30))
  catalogue_files = lambda d: {k: v for k, v in d.manifest["files"].items() if k not in ("users.jsonl", synthetic.TRUTH_FILE)}
  assert catalogue_files(fewer) == catalogue_files(dataset)


def test_second_call_rewrites_nothing(tmp_path):
  options = dataclasses.replace(_SMALL, num_users=30)
  first = synthetic.generate(tmp_path / "data", options)
  before = _files(tmp_path)
  second = synthetic.generate(tmp_path / "data", options)
  assert _files(tmp_path) == before
  assert second.manifest == first.manifest
  assert os.listdir(tmp_path) == ["data"]  # No leftover partial folder.


def test_other_options_raise(tmp_path):
  synthetic.generate(tmp_path / "data", dataclasses.replace(_SMALL, num_users=30))
  with pytest.raises(catalog.DatasetError, match="choose another folder or delete it"):
    synthetic.generate(tmp_path / "data", dataclasses.replace(_SMALL, num_users=31))


def test_foreign_folder_raises_and_empty_folder_is_used(tmp_path):
  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign/file.txt").write_text("not a dataset")
  with pytest.raises(catalog.DatasetError, match="choose another folder or delete it"):
    synthetic.generate(tmp_path / "foreign", _SMALL)
  (tmp_path / "empty").mkdir()
  assert synthetic.generate(tmp_path / "empty", dataclasses.replace(_SMALL, num_users=5)).num_items


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(catalog, "write_dataset", fail)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate(tmp_path / "data", _SMALL)
  assert os.listdir(tmp_path) == []


def test_invalid_options():
  with pytest.raises(ValueError, match="successor_probs"):
    synthetic.SyntheticOptions(successor_probs=(0.5, 0.5))
  with pytest.raises(ValueError, match="max_history"):
    synthetic.SyntheticOptions(num_groups=4, successors_per_group=3,
                               successor_probs=(0.5, 0.3, 0.2))


def test_command_line(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path / "cli"), "--num_users", "7", "--seed", "3",
                  "--successors_per_group", "2", "--successor_probs", "0.7", "0.3"])
  printed = json.loads(capsys.readouterr().out)
  assert printed["users"] == 7
  manifest = json.loads((tmp_path / "cli/manifest.json").read_text())
  assert manifest["options"]["seed"] == 3
  assert manifest["options"]["successor_probs"] == [0.7, 0.3]


def test_default_options_are_fast(tmp_path):
  start = time.perf_counter()
  dataset = synthetic.generate(tmp_path / "default")
  elapsed = time.perf_counter() - start
  assert dataset.manifest["counts"]["users"] == 2000
  assert dataset.manifest["counts"]["items"] == 100
  assert elapsed < 20, f"default generation took {elapsed:.1f}s; budget is about 10s"

"""Tests for the processed-dataset format, its validation and the leave-one-out splits."""

import json
import pathlib

import numpy as np
import pytest

from pixrec_jax.data import catalog
from pixrec_jax.data import prompts


def _user(user_id, items, timestamps=None):
  if timestamps is None:
    timestamps = [1_700_000_000_000 + 1000 * i for i in range(len(items))]
  return catalog.User(user_id, np.asarray(items, np.int32), np.asarray(timestamps, np.int64))


def _write_small(root: pathlib.Path) -> dict:
  """Three items (the last without a picture), three users, one extra file."""
  (root / "images").mkdir(parents=True)
  for item_id in range(2):
    (root / f"images/{item_id:06d}.png").write_bytes(b"picture %d" % item_id)
  (root / "notes").mkdir()
  (root / "notes/readme.txt").write_text("extra")
  items = [
      catalog.Item(0, {"title": "Cozy Mug", "main_category": "Home", "brand": "Acme", "price": "9.99"},
                   "images/000000.png"),
      catalog.Item(1, {"title": "Cozy Mug", "main_category": "Home", "brand": "Acme", "price": "9.99"},
                   "images/000001.png"),
      catalog.Item(2, {"title": "Sleek Lamp", "brand": ""}, None),
  ]
  users = [_user("u1", [0, 2]), _user("u2", [1, 0, 2], [5, 5, 7]), _user("u3", [])]
  return catalog.write_dataset(
      root, name="small", source="tests", items=items, users=users,
      options={"k": [1, 2]}, counts={"items": 3}, extra_files=["notes/readme.txt"])


def test_round_trip(tmp_path):
  manifest = _write_small(tmp_path)
  dataset = catalog.load_dataset(tmp_path, verify_hashes=True)

  assert dataset.manifest == manifest
  assert manifest["format"] == "pixrec_jax.dataset" and manifest["version"] == 1
  assert sorted(manifest["files"]) == [
      "images/000000.png", "images/000001.png", "items.jsonl", "notes/readme.txt", "users.jsonl"]
  assert manifest["files"]["notes/readme.txt"] == catalog.file_sha256(tmp_path / "notes/readme.txt")
  assert dataset.num_items == 3
  assert [item.item_id for item in dataset.items] == [0, 1, 2]
  assert dataset.items[0].fields["title"] == "Cozy Mug"
  assert dataset.image_path(1) == tmp_path.resolve() / "images/000001.png"
  assert dataset.image_path(1).is_absolute()
  assert dataset.image_path(2) is None
  assert dataset.item_text(0) == "Title: Cozy Mug. Category: Home. Brand: Acme. Price: 9.99. Image: "
  assert dataset.item_text(2) == prompts.render_item_text({"title": "Sleek Lamp"})
  assert dataset.item_text(2, template="{title} by {brand}") == "Sleek Lamp by Unknown"

  assert [u.user_id for u in dataset.users] == ["u1", "u2", "u3"]
  np.testing.assert_array_equal(dataset.users[1].items, [1, 0, 2])
  np.testing.assert_array_equal(dataset.users[1].timestamps, [5, 5, 7])
  assert dataset.users[1].items.dtype == np.int32
  assert dataset.users[1].timestamps.dtype == np.int64
  assert len(dataset.users[2].items) == 0
  with pytest.raises(ValueError):
    dataset.users[0].items[0] = 1  # Shared with the splits, so read-only.

  assert dataset.tokenizer_path is None
  (tmp_path / "tokenizer").mkdir()
  assert dataset.tokenizer_path == tmp_path.resolve() / "tokenizer"


def test_failed_rewrite_leaves_no_manifest(tmp_path):
  _write_small(tmp_path)
  with pytest.raises(catalog.DatasetError, match=r"users.jsonl:1: key 'items'\[0\]"):
    catalog.write_dataset(tmp_path, name="bad", source="tests", items=[], users=[_user("u", [0])],
                          options={}, counts={})
  assert not (tmp_path / "manifest.json").exists()


def test_extra_file_must_exist(tmp_path):
  with pytest.raises(catalog.DatasetError, match="missing.txt"):
    catalog.write_dataset(tmp_path, name="x", source="tests", items=[], users=[], options={},
                          counts={}, extra_files=["missing.txt"])
  assert not (tmp_path / "manifest.json").exists()


def _edit_line(path: pathlib.Path, line: int, edit) -> None:
  lines = path.read_text().splitlines()
  lines[line - 1] = edit(lines[line - 1])
  path.write_text("\n".join(lines) + "\n")


def _edit_record(path: pathlib.Path, line: int, edit) -> None:
  def edit_json(text):
    record = json.loads(text)
    edit(record)
    return json.dumps(record)
  _edit_line(path, line, edit_json)


@pytest.mark.parametrize(
    "file, line, edit, expected",
    [
        ("items.jsonl", 2, lambda text: text[:-1], [r"items.jsonl:2: malformed JSON"]),
        ("items.jsonl", 3, lambda text: "[1, 2]", [r"items.jsonl:3: expected a JSON object"]),
        ("users.jsonl", 3, lambda text: "", [r"users.jsonl:3: malformed JSON"]),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, file, line, edit, expected):
  _write_small(tmp_path)
  _edit_line(tmp_path / file, line, edit)
  with pytest.raises(catalog.DatasetError) as error:
    catalog.load_dataset(tmp_path)
  for pattern in expected:
    assert pattern in str(error.value)


@pytest.mark.parametrize(
    "file, line, edit, expected",
    [
        ("items.jsonl", 2, lambda r: r.pop("fields"), ["items.jsonl:2:", "missing key 'fields'"]),
        ("items.jsonl", 1, lambda r: r.pop("image"), ["items.jsonl:1:", "missing key 'image'"]),
        ("users.jsonl", 2, lambda r: r.pop("timestamps"), ["users.jsonl:2:", "missing key 'timestamps'"]),
        ("items.jsonl", 2, lambda r: r.update(item_id=5),
         ["items.jsonl:2:", "key 'item_id' is 5, expected 1", "dense"]),
        ("items.jsonl", 1, lambda r: r.update(item_id="0"), ["items.jsonl:1:", "key 'item_id'", "integer"]),
        ("items.jsonl", 1, lambda r: r["fields"].update(price=9.99),
         ["items.jsonl:1:", "key 'fields'['price']"]),
        ("items.jsonl", 1, lambda r: r.update(image="../outside.png"), ["items.jsonl:1:", "key 'image'"]),
        ("users.jsonl", 1, lambda r: r.update(items=[0, 3]),
         ["users.jsonl:1:", "key 'items'[1] is 3", "0..2"]),
        ("users.jsonl", 2, lambda r: r.update(items=[0, -1, 2]), ["users.jsonl:2:", "key 'items'[1] is -1"]),
        ("users.jsonl", 1, lambda r: r.update(items=[0, True]), ["users.jsonl:1:", "key 'items'[1]"]),
        ("users.jsonl", 2, lambda r: r.update(timestamps=[5, 5]),
         ["users.jsonl:2:", "key 'timestamps' has 2 entries but key 'items' has 3"]),
        ("users.jsonl", 2, lambda r: r.update(timestamps=[5, 7, 6]),
         ["users.jsonl:2:", "key 'timestamps' decreases at position 2"]),
        ("users.jsonl", 3, lambda r: r.update(user_id="u1"), ["users.jsonl:3:", "key 'user_id' 'u1'"]),
    ],
)
def test_invalid_records_name_file_line_and_key(tmp_path, file, line, edit, expected):
  _write_small(tmp_path)
  _edit_record(tmp_path / file, line, edit)
  with pytest.raises(catalog.DatasetError) as error:
    catalog.load_dataset(tmp_path)
  for part in expected:
    assert part in str(error.value)


def test_missing_image_names_item_and_path(tmp_path):
  _write_small(tmp_path)
  (tmp_path / "images/000001.png").unlink()
  with pytest.raises(catalog.DatasetError, match=r"items.jsonl:2: item 1 .*'images/000001.png'"):
    catalog.load_dataset(tmp_path)


def test_missing_data_file(tmp_path):
  _write_small(tmp_path)
  (tmp_path / "users.jsonl").unlink()
  with pytest.raises(catalog.DatasetError, match="users.jsonl: missing"):
    catalog.load_dataset(tmp_path)


def test_missing_manifest(tmp_path):
  _write_small(tmp_path)
  (tmp_path / "manifest.json").unlink()
  with pytest.raises(catalog.DatasetError, match="manifest.json: missing"):
    catalog.load_dataset(tmp_path)


@pytest.mark.parametrize(
    "key, value, expected",
    [("version", 2, "version 2"), ("format", "other", "format 'other'"), ("files", None, "missing key 'files'")],
)
def test_manifest_format_and_version(tmp_path, key, value, expected):
  manifest = _write_small(tmp_path)
  if value is None:
    del manifest[key]
  else:
    manifest[key] = value
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(catalog.DatasetError, match="manifest.json") as error:
    catalog.load_dataset(tmp_path)
  assert expected in str(error.value)


@pytest.mark.parametrize("name", ["users.jsonl", "images/000000.png", "notes/readme.txt"])
def test_verify_hashes_detects_modified_file(tmp_path, name):
  _write_small(tmp_path)
  path = tmp_path / name
  if name == "users.jsonl":  # Still valid, so only the hash can tell.
    _edit_record(path, 2, lambda r: r.update(timestamps=[5, 6, 7]))
  else:
    path.write_bytes(path.read_bytes() + b"!")
  catalog.load_dataset(tmp_path)
  with pytest.raises(catalog.DatasetError, match=f"{name}: sha256 differs"):
    catalog.load_dataset(tmp_path, verify_hashes=True)


def test_leave_one_out(tmp_path):
  # Repeated ids make an id-based leakage check meaningless; positions are checked.
  sequences = {
      "n1": [7],
      "n2": [1, 2],
      "n3": [3, 4, 3],
      "n4": [5, 6, 5, 6],
      "n5": [0, 1, 0, 1, 0],
  }
  users = [_user(name, items) for name, items in sequences.items()]
  items = [catalog.Item(i, {}, None) for i in range(8)]
  dataset = catalog.Dataset(path=tmp_path, manifest={}, items=items, users=users)
  splits = catalog.leave_one_out(dataset)

  assert splits.counts == {
      "users": 5, "users_skipped_short": 1, "users_test_only": 1,
      "train_users": 2, "valid_cases": 3, "test_cases": 4,
  }
  as_lists = lambda cases: [(c.user_index, c.history.tolist(), c.target) for c in cases]
  assert as_lists(splits.test) == [
      (1, [1], 2), (2, [3, 4], 3), (3, [5, 6, 5], 6), (4, [0, 1, 0, 1], 0)]
  assert as_lists(splits.valid) == [(2, [3], 4), (3, [5, 6], 5), (4, [0, 1, 0], 1)]
  assert [(u, seq.tolist()) for u, seq in splits.train] == [(3, [5, 6]), (4, [0, 1, 0])]

  for user_index, sequence in splits.train:
    items = users[user_index].items
    n = len(items)
    # The train sequence is exactly positions 0..n-3: it is a prefix of the user's items...
    assert np.shares_memory(sequence, items)
    assert sequence.__array_interface__["data"][0] == items.__array_interface__["data"][0]
    # ...that stops before the validation (n-2) and test (n-1) target positions.
    assert len(sequence) == n - 2
  for case in splits.valid:
    assert len(case.history) == len(users[case.user_index].items) - 2
  for case in splits.test:
    assert len(case.history) == len(users[case.user_index].items) - 1

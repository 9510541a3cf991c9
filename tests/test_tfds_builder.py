"""Tests for the `amazon_reviews_2023_mm` TFDS builder: build in array_record, read back
through `tfds.data_source` and grain, compare with the processed dataset it came from."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

tfds = pytest.importorskip(
    "tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install -e .[tfds])")
import grain  # noqa: E402

from pixrec_jax.data import catalog, synthetic  # noqa: E402
from pixrec_jax.data import tfds_builder  # noqa: E402
from tests import amazon_fixtures as fx  # noqa: E402

CATEGORY = "Subscription_Boxes"
NAME = f"{tfds_builder.NAME}/{CATEGORY}"
FAST = dict(image_timeout_s=2.0, image_deadline_s=5.0, retries=1, backoff_s=0.01, input_timeout_s=2.0)


def _build(data_dir: pathlib.Path, manual_dir: pathlib.Path | None = None, config=CATEGORY):
  builder = tfds_builder.AmazonReviews2023Mm(config=config, data_dir=str(data_dir), file_format="array_record")
  download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return builder


def _assert_same_as(dataset: catalog.Dataset, data_dir: pathlib.Path, name: str = NAME):
  """The data source, read through grain, holds exactly the dataset's users and items, in order."""
  sources = tfds.data_source(name, data_dir=str(data_dir))
  users = grain.MapDataset.source(sources["users"])
  items = grain.MapDataset.source(sources["items"])
  assert len(users) == len(dataset.users) and len(items) == dataset.num_items
  for index, expected in enumerate(dataset.users):
    got = tfds_builder.decode_user(users[index])
    assert got.user_id == expected.user_id
    np.testing.assert_array_equal(got.items, expected.items)
    np.testing.assert_array_equal(got.timestamps, expected.timestamps)
  for item_id, expected in enumerate(dataset.items):
    got, image = tfds_builder.decode_item(items[item_id])
    assert got == expected
    path = dataset.image_path(item_id)
    assert image == (path.read_bytes() if path is not None else None)
    raw = items[item_id]["item"]
    assert raw["title"].decode() == expected.fields.get("title", "")


def _tensorflow_not_imported():
  if importlib.util.find_spec("tensorflow") is None:
    assert "tensorflow" not in sys.modules
  else:
    pytest.skip("TensorFlow is installed here, so this cannot show that building works without it")


def test_configs_cover_the_categories():
  names = [c.name for c in tfds_builder.AmazonReviews2023Mm.BUILDER_CONFIGS]
  assert len(names) == 34 and "Unknown" in names and CATEGORY in names
  assert tfds_builder.REVIEWS_URL.format(category=CATEGORY) == (
      "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/review_categories/"
      "Subscription_Boxes.jsonl.gz")


def test_processed_dataset_in_manual_dir(tmp_path):
  dataset = synthetic.generate(tmp_path / "manual" / CATEGORY, synthetic.SyntheticOptions(num_groups=10, num_users=30))
  builder = _build(tmp_path / "data", tmp_path / "manual")
  assert builder.info.splits["users"].num_examples == 30
  assert builder.info.metadata["manifest"]["counts"] == dataset.manifest["counts"]
  _assert_same_as(dataset, tmp_path / "data")
  assert all(item.image is not None for item in dataset.items)  # So image bytes were compared.
  _tensorflow_not_imported()


def _raw_files(server, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Three users; items A-C have a MAIN image on the server, D has none (the paper preset drops it)."""
  server.routes.update({f"/img/{k}.jpg": fx.Route(fx.image_bytes(colour)) for k, colour in
                        (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200)))})
  main = lambda key: [fx.image_entry(large=server.url(f"/img/{key}.jpg"))]
  meta = [fx.meta("A", "Alpha", "Toys", "Acme", "9.99", main("a")), fx.meta("B", "Beta", "Toys", images=main("b")),
          fx.meta("C", "Gamma", images=main("c")), fx.meta("D", "Delta", images=[])]
  reviews = [fx.review("u1", "A", 100), fx.review("u1", "B", 200), fx.review("u2", "C", 50),
             fx.review("u2", "A", 60), fx.review("u2", "B", 70), fx.review("u3", "D", 10),
             fx.review("u3", "B", 20), fx.review("u3", "C", 30)]
  root.mkdir(parents=True, exist_ok=True)
  return (fx.write_jsonl(root / f"{CATEGORY}.jsonl.gz", reviews, compress=True),
          fx.write_jsonl(root / f"meta_{CATEGORY}.jsonl", meta))


# A custom config (built-in names are taken): the paper preset with short network limits.
FAST_CONFIG = f"{CATEGORY}_fast"


def _config():
  return tfds_builder.Config(name=FAST_CONFIG, category=CATEGORY, overrides=FAST)


def _processed(data_dir: pathlib.Path) -> catalog.Dataset:
  [folder] = (data_dir / "downloads" / f"{tfds_builder.NAME}_processed").glob(f"{FAST_CONFIG}-*")
  return catalog.load_dataset(folder, verify_hashes=True)


def test_raw_files_in_manual_dir_are_ingested(tmp_path):
  with fx.FixtureServer() as server:
    _raw_files(server, tmp_path / "manual")
    _build(tmp_path / "data", tmp_path / "manual", config=_config())
  dataset = _processed(tmp_path / "data")
  assert dataset.manifest["options"]["preset"] == "paper"
  assert [item.fields["parent_asin"] for item in dataset.items] == ["A", "B", "C"]
  assert [u.user_id for u in dataset.users] == ["u1", "u2", "u3"]
  np.testing.assert_array_equal(dataset.users[2].items, [1, 2])  # D had no image: dropped.
  _assert_same_as(dataset, tmp_path / "data", f"{tfds_builder.NAME}/{FAST_CONFIG}")
  _tensorflow_not_imported()


def test_raw_files_are_downloaded_without_a_manual_dir(tmp_path, monkeypatch):
  with fx.FixtureServer() as server:
    reviews, meta = _raw_files(server, tmp_path / "served")
    for attr, path in (("REVIEWS_URL", reviews), ("META_URL", meta)):
      # The official URL's path below /raw, served from the loopback server.
      tail = getattr(tfds_builder, attr).split("/raw", 1)[1]
      server.routes[tail.format(category=CATEGORY)] = fx.Route(path.read_bytes())
      monkeypatch.setattr(tfds_builder, attr, server.url(tail))
    _build(tmp_path / "data", config=_config())
    assert server.count(f"/review_categories/{CATEGORY}.jsonl.gz") == 1
    assert server.count(f"/meta_categories/meta_{CATEGORY}.jsonl.gz") == 1
  dataset = _processed(tmp_path / "data")
  assert dataset.manifest["counts"]["users"] == 3
  _assert_same_as(dataset, tmp_path / "data", f"{tfds_builder.NAME}/{FAST_CONFIG}")

"""Tests for raw Amazon Reviews 2023 ingestion, image downloads and the timestamp split."""

import hashlib
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from pixrec_jax.data import catalog
from pixrec_jax.data import download
from pixrec_jax.data import ingest
from tests import amazon_fixtures as fx

# Small network limits keep the stall and retry paths fast.
FAST = dict(image_timeout_s=0.3, image_deadline_s=5.0, retries=1, backoff_s=0.01, input_timeout_s=0.3)
STALL_S = 1.5
_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.(jpg|jpeg|png|gif|webp|bmp|img)$")

# Items and their pictures: A-C and H download, D has none, E-G and I fail, J is
# cut by the k-core before any download, K has no meta record.
_IMAGES = {
    "/img/a_hi.jpg": fx.Route(fx.image_bytes((200, 30, 30))),
    "/img/a_large.jpg": fx.Route(fx.image_bytes((0, 0, 0))),
    "/img/b_large.png": fx.Route(fx.image_bytes((30, 200, 30), format="PNG")),
    "/img/c_first.jpg": fx.Route(fx.image_bytes((30, 30, 200))),
    "/img/e_404.jpg": fx.Route(b"gone", status=404),
    "/img/f_stall.jpg": fx.Route(fx.image_bytes(), stall_s=STALL_S),
    "/img/g_corrupt.jpg": fx.Route(fx.corrupt_jpeg()),
    "/img/../../h_escape.jpg": fx.Route(fx.image_bytes((200, 200, 30))),
    "/img/i_bomb.png": fx.Route(fx.png_bomb()),
    "/img/j.jpg": fx.Route(fx.image_bytes()),
}


def _meta_lines(url):
  main = fx.image_entry
  return [
      fx.meta("A", "Alpha", "Toys", "Acme", 9.99, [main(hi_res=url("/img/a_hi.jpg"), large=url("/img/a_large.jpg"))]),
      fx.meta("B", "Beta", "Toys", "Bolt", "12.50", [main(large=url("/img/b_large.png"))]),
      fx.meta("C", "Gamma", "Toys", None, None, [fx.image_entry(variant="PT01"),
                                                 main(thumb=url("/img/c_first.jpg"), variant="PT02")]),
      fx.meta("D", "Delta", "Toys", images=[]),
      fx.meta("E", "Epsilon", images=[main(large=url("/img/e_404.jpg"))]),
      fx.meta("F", "Zeta", images=[main(large=url("/img/f_stall.jpg"))]),
      fx.meta("G", "Eta", images=[main(large=url("/img/g_corrupt.jpg"))]),
      fx.meta("H", None, "Toys", images=[main(large=url("/img/../../h_escape.jpg"))]),
      b'{"parent_asin": "Q", "title": ',  # Malformed.
      fx.meta("I", "Iota", images=[main(large=url("/img/i_bomb.png"))]),
      fx.meta("J", "Kappa", images=[main(large=url("/img/j.jpg"))]),
      {"title": "no parent_asin"},
      fx.meta("A", "Alpha duplicate", "Toys", images=[main(large=url("/img/j.jpg"))]),
  ]


def _review_lines():
  r = fx.review
  return [
      r("u1", "A", 100), r("u1", "B", 200), r("u1", "C", 300),
      r("u2", "A", 150), r("u2", "B", 150), r("u2", "H", 400),  # Equal timestamps: file order.
      r("u3", "C", 100), r("u3", "H", 200), r("u3", "A", 50),
      r("u3", "C", 500),  # A later repeat of (u3, C): dropped.
      b'{"user_id": "u9", "parent_asin": ',  # Malformed.
      b"",
      r("u4", "D", 100), r("u4", "E", 200), r("u4", "F", 300), r("u4", "G", 400), r("u4", "I", 500),
      r(None, "A", 1), r("u8", None, 1), r("u8", "A", None), r("u8", "A", "soon"),
      r("u5", "E", 100), r("u5", "F", 200), r("u5", "G", 300), r("u5", "I", 400), r("u5", "D", 500),
      b"[1, 2]",  # JSON, but not an object.
      r("u6", "J", 100), r("u6", "K", 200), r("u6", "A", 300),
      r("u7", "B", 100),
      json.dumps(r("u1", "H", 600, title="caf\u00e9"), ensure_ascii=False).encode().replace("\u00e9".encode(), b"\xff"),
  ]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """The fixture files and images on a loopback server, and a first ingestion from URLs."""
  with fx.FixtureServer() as server:
    server.routes.update(_IMAGES)
    # The meta URL has no .gz suffix: gzip is recognised by its magic bytes.
    server.routes["/data/reviews.jsonl.gz"] = fx.Route(fx.jsonl_bytes(_review_lines(), compress=True))
    server.routes["/data/meta"] = fx.Route(fx.jsonl_bytes(_meta_lines(server.url), compress=True))
    options = ingest.make_options(server.url("/data/reviews.jsonl.gz"), server.url("/data/meta"),
                                  user_core=2, item_core=2, skip_bad_lines=True, **FAST)
    out = tmp_path_factory.mktemp("ingest") / "toys"
    dataset = ingest.ingest(out, options, workers=4, progress=False)
    yield server, options, out, dataset


def test_end_to_end_from_urls(served):
  server, options, out, dataset = served
  counts = dataset.manifest["counts"]

  assert counts["reviews_file"] == {
      "lines": 32, "records": 29, "blank_lines": 1, "bad_lines": 2, "invalid_utf8_lines": 1,
      "skipped_missing_or_invalid": {"user_id": 1, "parent_asin": 1, "timestamp": 2}, "interactions": 25}
  assert counts["meta_file"] == {
      "lines": 13, "records": 12, "blank_lines": 0, "bad_lines": 1, "invalid_utf8_lines": 0,
      "skipped_missing_parent_asin": 1, "duplicate_parent_asin": 1, "items_used": 10}
  steps = counts["steps"]
  assert steps["reviews"] == {"users": 7, "items": 11, "interactions": 25}
  assert steps["deduplicated"] == {"users": 7, "items": 11, "interactions": 24, "duplicates_removed": 1,
                                   "equal_timestamps": 1}
  assert steps["with_meta"] == {"users": 7, "items": 10, "interactions": 23, "items_without_meta": 1,
                                "interactions_without_meta": 1}
  assert steps["with_image_url"] == {"users": 7, "items": 9, "interactions": 21}
  # Round 1 drops u7 and J, which leaves u6 with one review; round 2 drops u6.
  assert steps["k_core"] == {"users": 5, "items": 8, "interactions": 18, "rounds": 2, "per_round": [
      {"users": 6, "items": 8, "interactions": 19}, {"users": 5, "items": 8, "interactions": 18}]}
  assert steps["with_image"] == {"users": 3, "items": 4, "interactions": 10}
  assert steps["k_core_after_images"] == {"users": 3, "items": 4, "interactions": 10, "rounds": 0,
                                          "per_round": []}
  assert counts["images"] == {
      "chosen": 9, "main": 8, "fallback": 1, "no_url": 1, "urls": 8, "downloaded": 4, "cached": 0,
      "not_found": 1, "http_error": 0, "timeout": 1, "network_error": 0, "invalid": 1, "too_large": 1,
      "bad_url": 0, "items_without_image": 4, "placeholder": 0}
  assert {k: counts[k] for k in ("users", "items", "interactions", "equal_timestamps", "duplicates_removed",
                                 "k_core_rounds")} == {
      "users": 3, "items": 4, "interactions": 10, "equal_timestamps": 1, "duplicates_removed": 1,
      "k_core_rounds": 2}

  inputs = dataset.manifest["options"]["inputs"]
  assert inputs["reviews"]["sha256"] == hashlib.sha256(
      server.routes["/data/reviews.jsonl.gz"].body).hexdigest()
  assert inputs["meta"]["size"] == len(server.routes["/data/meta"].body)

  loaded = catalog.load_dataset(out, verify_hashes=True)
  assert [u.user_id for u in loaded.users] == ["u1", "u2", "u3"]
  assert [item.fields["parent_asin"] for item in loaded.items] == ["A", "B", "C", "H"]
  np.testing.assert_array_equal(loaded.users[0].items, [0, 1, 2, 3])
  np.testing.assert_array_equal(loaded.users[1].items, [0, 1, 3])  # A before B: tie in file order.
  np.testing.assert_array_equal(loaded.users[1].timestamps, [150, 150, 400])
  np.testing.assert_array_equal(loaded.users[2].items, [0, 2, 3])  # Sorted; the repeat of C dropped.
  np.testing.assert_array_equal(loaded.users[2].timestamps, [50, 100, 200])
  assert loaded.item_text(0) == "Title: Alpha. Category: Toys. Brand: Acme. Price: 9.99. Image: "
  assert loaded.item_text(1) == "Title: Beta. Category: Toys. Brand: Bolt. Price: 12.50. Image: "
  assert loaded.item_text(3) == "Title: Unknown. Category: Toys. Brand: Unknown. Price: Unknown. Image: "

  # A's hi_res won over its large URL, C fell back to its first entry with a URL.
  for item, path in zip(loaded.items, ["/img/a_hi.jpg", "/img/b_large.png", "/img/c_first.jpg",
                                       "/img/../../h_escape.jpg"]):
    assert item.image == "images/" + download.cache_name(server.url(path))
    assert loaded.image_path(item.item_id).read_bytes() == server.routes[path].body
  for path in ("/img/a_hi.jpg", "/img/b_large.png", "/img/c_first.jpg", "/img/e_404.jpg", "/img/g_corrupt.jpg",
               "/img/i_bomb.png"):
    assert server.count(path) == 1, path
  assert server.count("/img/f_stall.jpg") == 2  # One retry.
  assert server.count("/img/a_large.jpg") == server.count("/img/j.jpg") == 0
  assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))


def _snapshot(root: pathlib.Path) -> dict:
  return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_is_a_noop(served, capsys):
  server, options, out, _ = served
  before = _snapshot(out)
  server.reset()

  dataset = ingest.ingest(out, options, workers=4, progress=False)

  assert server.count(prefix="/img/") == 0
  assert server.count(prefix="/data/") == 0  # Inputs are checked by HEAD, not fetched again.
  assert server.count(prefix="/data/", method="HEAD") == 2
  assert _snapshot(out) == before
  assert dataset.manifest == json.loads((out / catalog.MANIFEST).read_text())
  assert "already holds this dataset" in capsys.readouterr().err


def test_interrupted_run_resumes_from_cached_images(served, tmp_path):
  server, options, out, first = served
  copy = shutil.copytree(out, tmp_path / "copy")
  (copy / catalog.MANIFEST).unlink()  # As if interrupted before the manifest was written.
  server.reset()

  dataset = ingest.ingest(copy, options, workers=4, progress=False)

  assert dataset.manifest["counts"]["images"]["cached"] == 4
  assert dataset.manifest["counts"]["images"]["downloaded"] == 0
  for path in ("/img/a_hi.jpg", "/img/b_large.png", "/img/c_first.jpg", "/img/../../h_escape.jpg"):
    assert server.count(path) == 0
  assert server.count("/img/e_404.jpg") == 1  # Failures are not cached.
  assert dataset.manifest["files"] == first.manifest["files"]


def test_shared_cache_placeholder_and_changed_options(served, tmp_path):
  server, options, out, _ = served
  server.reset()
  placeholder = ingest.make_options(options.reviews, options.meta, user_core=2, item_core=2, skip_bad_lines=True,
                                    missing_image="placeholder", **FAST)

  dataset = ingest.ingest(tmp_path / "p", placeholder, image_cache=out / "images", workers=4, progress=False)

  counts = dataset.manifest["counts"]
  # D (no URL) stays, so E-I keep their users: u1-u5 and all but J and K.
  assert {k: counts[k] for k in ("users", "items", "interactions")} == {"users": 5, "items": 9, "interactions": 20}
  assert counts["images"]["cached"] == 4 and counts["images"]["downloaded"] == 0
  assert counts["images"]["items_without_image"] == counts["images"]["placeholder"] == 5
  assert server.count("/img/a_hi.jpg") == 0
  by_asin = {item.fields["parent_asin"]: item for item in dataset.items}
  assert {a for a, item in by_asin.items() if item.image == ingest.PLACEHOLDER} == {"D", "E", "F", "G", "I"}
  assert (dataset.path / by_asin["A"].image).samefile(out / by_asin["A"].image)  # Linked, not fetched.

  with pytest.raises(catalog.DatasetError, match=r"other options: missing_image 'drop' -> 'placeholder'"):
    ingest.ingest(out, placeholder, progress=False)


def _local(tmp_path, reviews, metas=None, **overrides):
  """Ingests local files without images (fast); returns the dataset or raises."""
  metas = metas if metas is not None else [fx.meta(a, f"Title {a}") for a in "ABCDEFGH"]
  tmp_path.mkdir(parents=True, exist_ok=True)
  reviews_path = fx.write_jsonl(tmp_path / "reviews.jsonl", reviews)
  meta_path = fx.write_jsonl(tmp_path / "meta.jsonl.gz", metas, compress=True)
  settings = {"user_core": 1, "item_core": 1, "images": False, **overrides}
  options = ingest.make_options(str(reviews_path), str(meta_path), **settings)
  return ingest.ingest(tmp_path / "out", options, progress=False)


def test_malformed_line_names_file_and_line(tmp_path):
  lines = [fx.review("u1", "A", 1), fx.review("u1", "B", 2), b'{"user_id": "u2",', fx.review("u2", "A", 3)]
  with pytest.raises(catalog.DatasetError, match=r"reviews\.jsonl:3: malformed JSON .*--skip-bad-lines"):
    _local(tmp_path, lines)
  assert not (tmp_path / "out" / catalog.MANIFEST).exists()

  dataset = _local(tmp_path, lines, skip_bad_lines=True)
  assert dataset.manifest["counts"]["reviews_file"]["bad_lines"] == 1
  assert dataset.manifest["counts"]["interactions"] == 3


def test_malformed_meta_line_in_gzip_names_it(tmp_path):
  metas = [fx.meta("A", "x"), b"not json"]
  with pytest.raises(catalog.DatasetError, match=r"meta\.jsonl\.gz:2: malformed JSON"):
    _local(tmp_path, [fx.review("u1", "A", 1)], metas)


def test_sort_is_stable_and_keeps_the_earliest_repeat():
  raw = {"u": [(5, "a"), (3, "b"), (5, "c"), (3, "a"), (5, "b")]}
  sequences, removed = ingest.sort_and_deduplicate(raw)
  # Sorted by time with ties in file order: b@3, a@3, a@5, c@5, b@5; repeats dropped.
  assert sequences == {"u": [(3, "b"), (3, "a"), (5, "c")]}
  assert removed == 2
  assert ingest.equal_timestamps(sequences) == 1


def test_k_core_repeats_until_stable():
  sequences = {"uA": [(1, "i1"), (2, "i2")], "uB": [(1, "i1"), (2, "i2")],
               "uC": [(1, "i2"), (2, "i3")], "uD": [(1, "i3")]}
  # One pass would keep uC: dropping uD leaves i3 with one user, then uC with one item.
  core, rounds = ingest.k_core(sequences, user_core=2, item_core=2)
  assert core == {"uA": [(1, "i1"), (2, "i2")], "uB": [(1, "i1"), (2, "i2")]}
  assert rounds == [{"users": 3, "items": 3, "interactions": 6},
                    {"users": 3, "items": 2, "interactions": 5},
                    {"users": 2, "items": 2, "interactions": 4}]
  assert ingest.k_core(core, 2, 2) == (core, [])
  # The paper's preset: users only; one round suffices.
  users_only, rounds = ingest.k_core(sequences, user_core=2, item_core=0)
  assert sorted(users_only) == ["uA", "uB", "uC"] and len(rounds) == 1


def test_missing_fields_and_empty_inputs_are_clear_errors(tmp_path):
  with pytest.raises(catalog.DatasetError, match=r"no usable reviews .*user_id"):
    _local(tmp_path / "a", [fx.review(None, "A", 1), b""])
  with pytest.raises(catalog.DatasetError, match=r"k-core filter \(users >= 3.*--user-core"):
    _local(tmp_path / "b", [fx.review("u1", "A", 1), fx.review("u1", "B", 2)], user_core=3)
  with pytest.raises(catalog.DatasetError, match=r"no reviewed item has a meta record"):
    _local(tmp_path / "c", [fx.review("u1", "Z", 1)])


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
  line = json.dumps(fx.review("u1", "A", 1, text="ok")).encode().replace(b"ok", b"o\xfek")
  dataset = _local(tmp_path, [line, fx.review("u1", "B", 2)])
  assert dataset.manifest["counts"]["reviews_file"]["invalid_utf8_lines"] == 1
  assert dataset.manifest["counts"]["interactions"] == 2


def test_paper_preset_and_explicit_options(tmp_path):
  options = ingest.make_options("r.jsonl", "m.jsonl", preset="paper", item_core=3)
  assert (options.user_core, options.item_core, options.image_fallback) == (2, 3, "none")
  assert options.image_preference == ("large", "hi_res", "thumb")
  assert options.to_json()["preset"] == "paper" and options.name == "r"
  assert ingest.make_options("r", "m", images=False).missing_image == "none"
  with pytest.raises(ValueError, match=r"only the fields .*details.Brand is stored as brand"):
    ingest.make_options("r", "m", template="Title: {title}. Brand: {details.Brand}.")
  with pytest.raises(ValueError, match="unknown options"):
    ingest.make_options("r", "m", user_cores=2)


def test_choose_image_prefers_main_then_documented_fallback():
  main = fx.image_entry(hi_res="h", large="l", thumb="t")
  other = fx.image_entry(large="o", variant="PT01")
  assert ingest.choose_image([other, main]) == ("h", "main")
  assert ingest.choose_image([other, main], ("large",)) == ("l", "main")
  assert ingest.choose_image([fx.image_entry(variant="MAIN"), other]) == ("o", "fallback")
  assert ingest.choose_image([other], fallback="none") == (None, "none")
  assert ingest.choose_image(None) == (None, "none")


def test_cache_names_cannot_escape(tmp_path):
  urls = ["http://h/img/../../etc/passwd", "http://h/a/..%2F..%2Fx.jpg", "http://h/x.JPG?p=../../y",
          "http://h/..\\..\\x.png", "http://h//abs/x.webp", "file:///etc/passwd"]
  names = [download.cache_name(url) for url in urls]
  assert all(_NAME.match(name) for name in names), names
  assert len(set(names)) == len(urls)
  assert names[2].endswith(".jpg") and names[0].endswith(".img")
  assert all((tmp_path / n).resolve().is_relative_to(tmp_path.resolve()) for n in names)

  result = download.fetch("file:///etc/passwd", tmp_path)
  assert result.outcome == download.BAD_URL and not any(tmp_path.iterdir())


def test_decompression_bomb_and_corrupt_images_are_refused():
  with pytest.raises(download.Rejected) as info:
    download.check_image(fx.png_bomb(), max_pixels=10**8)
  assert info.value.args[0] == download.TOO_LARGE
  with pytest.raises(download.Rejected) as info:
    download.check_image(fx.image_bytes(size=40), max_pixels=1000)  # Our limit, below PIL's.
  assert info.value.args[0] == download.TOO_LARGE and "40x40" in info.value.args[1]
  with pytest.raises(download.Rejected) as info:
    download.check_image(fx.corrupt_jpeg(), max_pixels=10**8)
  assert info.value.args[0] == download.INVALID
  download.check_image(fx.image_bytes(), max_pixels=64)


def test_download_retries_and_deadline(tmp_path):
  settings = download.Settings(timeout_s=1.0, deadline_s=0.2, retries=2, backoff_s=0.01)
  with fx.FixtureServer() as server:
    server.routes["/busy.jpg"] = fx.Route(b"busy", status=503)
    server.routes["/drip.jpg"] = fx.Route(fx.image_bytes(size=32), stall_s=0.4, stall_after=10)
    server.routes["/ok.jpg"] = fx.Route(fx.image_bytes())
    results = download.fetch_all([server.url(p) for p in ("/busy.jpg", "/drip.jpg", "/ok.jpg")], tmp_path,
                                 settings, progress=False)
    busy, drip, ok = (results[server.url(p)] for p in ("/busy.jpg", "/drip.jpg", "/ok.jpg"))
    assert (busy.outcome, busy.attempts, server.count("/busy.jpg")) == (download.HTTP_ERROR, 3, 3)
    # Each read returns within the socket timeout, but the whole body misses the deadline.
    assert drip.outcome == download.TIMEOUT and "deadline" in drip.detail
    assert ok.outcome == download.DOWNLOADED and ok.path.read_bytes() == server.routes["/ok.jpg"].body
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [ok.path.name]  # No partial files.


def test_url_inputs_fail_clearly(tmp_path):
  body = fx.jsonl_bytes([fx.review("u1", "A", 1)] * 50)
  with fx.FixtureServer() as server:
    server.routes["/stall.jsonl"] = fx.Route(body, stall_s=STALL_S, stall_after=100)
    server.routes["/cut.jsonl.gz"] = fx.Route(fx.jsonl_bytes([fx.review("u1", "A", 1)] * 50, compress=True)[:-30])
    meta_path = str(fx.write_jsonl(tmp_path / "meta.jsonl", [fx.meta("A")]))
    for path, pattern in (("/missing.jsonl", r"missing\.jsonl: HTTP 404"),
                          ("/stall.jsonl", r"stall\.jsonl:\d+: reading failed \(TimeoutError"),
                          ("/cut.jsonl.gz", r"cut\.jsonl\.gz:\d+: reading failed \(EOFError")):
      options = ingest.make_options(server.url(path), meta_path, images=False, **FAST)
      with pytest.raises(catalog.DatasetError, match=pattern):
        ingest.ingest(tmp_path / "out", options, progress=False)
    assert server.count("/missing.jsonl") == 1  # A 404 is not retried.


def test_cli_and_split_from_manifest(tmp_path, capsys):
  day = 86_400_000
  reviews = fx.write_jsonl(tmp_path / "Toys.jsonl", [
      fx.review("u1", "A", 1 * day), fx.review("u1", "B", 2 * day), fx.review("u1", "C", 5 * day),
      fx.review("u1", "D", 9 * day), fx.review("u2", "B", 1 * day), fx.review("u2", "C", 6 * day),
  ])
  meta = fx.write_jsonl(tmp_path / "meta.jsonl", [fx.meta(a, f"Title {a}") for a in "ABCD"])
  argv = ["--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "out"), "--no-images",
          "--user-core", "2", "--item-core", "0", "--split", "timestamp", "--split-valid-start-ms", str(5 * day),
          "--split-test-start-ms", str(8 * day), "--quiet"]
  ingest.main(argv)
  summary = json.loads(capsys.readouterr().out)
  assert summary == {"path": str((tmp_path / "out").resolve()), "users": 2, "items": 4, "interactions": 6}

  dataset = catalog.load_dataset(tmp_path / "out")
  assert dataset.manifest["name"] == "Toys"
  assert dataset.manifest["options"]["split"] == "timestamp"
  assert all(item.image is None for item in dataset.items)
  splits = catalog.dataset_splits(dataset)
  assert [(u, s.tolist()) for u, s in splits.train] == [(0, [0, 1])]
  assert [(c.user_index, c.target) for c in splits.valid] == [(0, 2), (1, 2)]
  assert [(c.user_index, c.target) for c in splits.test] == [(0, 3)]

  with pytest.raises(SystemExit, match=r"other options: item_core 0 -> 1.*--overwrite"):
    ingest.main(argv[:-1] + ["--item-core", "1", "--quiet"])
  ingest.main(argv + ["--item-core", "1", "--overwrite"])
  assert catalog.load_dataset(tmp_path / "out").manifest["options"]["item_core"] == 1


def _dataset(sequences):
  users = [catalog.User(f"u{i}", np.asarray(items, np.int32), np.asarray(ts, np.int64))
           for i, (items, ts) in enumerate(sequences)]
  return catalog.Dataset(path=pathlib.Path("."), manifest={"name": "t"}, items=[], users=users)


def test_timestamp_split_cases_and_counts():
  dataset = _dataset([
      ([0, 1, 2, 3, 4, 5], [1, 2, 3, 10, 11, 20]),  # Train 3, valid 2, test 1.
      ([0, 1, 2, 3], [1, 10, 20, 21]),  # One item before the cut: no training sequence.
      ([4, 5], [10, 11]),  # Starts in the valid period: its first item has no history.
      ([6], [25]),  # Only a test item, nothing to predict it from.
      ([7, 8], [1, 9]),  # Training only.
  ])
  splits = catalog.timestamp_split(dataset, 10, 20)
  assert [(u, s.tolist()) for u, s in splits.train] == [(0, [0, 1, 2]), (4, [7, 8])]
  assert [(c.user_index, c.history.tolist(), c.target) for c in splits.valid] == [
      (0, [0, 1, 2], 3), (0, [0, 1, 2, 3], 4), (1, [0], 1), (2, [4], 5)]
  assert [(c.user_index, c.history.tolist(), c.target) for c in splits.test] == [
      (0, [0, 1, 2, 3, 4], 5), (1, [0, 1], 2), (1, [0, 1, 2], 3)]
  assert splits.counts == {"users": 5, "train_users": 2, "train_interactions": 5, "valid_cases": 4,
                           "test_cases": 3, "valid_users": 3, "test_users": 2, "valid_skipped_no_history": 1,
                           "test_skipped_no_history": 1}

  first = catalog.timestamp_split(dataset, 10, 20, cases="first")
  assert [(c.user_index, c.target) for c in first.valid] == [(0, 3), (1, 1), (2, 5)]
  assert [(c.user_index, c.target) for c in first.test] == [(0, 5), (1, 2)]
  with pytest.raises(ValueError, match="after"):
    catalog.timestamp_split(dataset, 20, 10)


def test_timestamp_split_never_trains_on_held_out_interactions():
  rng = np.random.default_rng(0)
  sequences = []
  for _ in range(200):
    n = int(rng.integers(1, 12))
    sequences.append((rng.permutation(50)[:n], np.sort(rng.integers(0, 100, n))))  # Ties included.
  dataset = _dataset(sequences)
  valid_start, test_start = 40, 70
  for cases in catalog.SPLIT_CASES:
    splits = catalog.timestamp_split(dataset, valid_start, test_start, cases)
    trained = {}
    for user_index, sequence in splits.train:
      user = dataset.users[user_index]
      assert np.all(user.timestamps[:len(sequence)] < valid_start)
      np.testing.assert_array_equal(sequence, user.items[:len(sequence)])
      trained[user_index] = len(sequence)
    for split, low, high in ((splits.valid, valid_start, test_start), (splits.test, test_start, np.inf)):
      for case in split:
        user = dataset.users[case.user_index]
        position = len(case.history)
        assert user.items[position] == case.target
        assert low <= user.timestamps[position] < high
        assert position >= trained.get(case.user_index, 0)  # The target is never in a training sequence.

"""Tests for the converter of the PixRec paper's preprocessed files (paper_format.py)."""

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import transformers
from PIL import Image

from pixrec_jax import config_lib
from pixrec_jax.data import catalog, paper_format, prompts
from pixrec_jax.data import tokenizer as tokenizer_lib
from pixrec_jax.train import run

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "amazon2023"
# users, interactions and distinct bought texts, as the shared README counts them.
CATEGORIES = {"Subscription_Boxes": (766, 1745, 323), "Magazine_Subscriptions": (7207, 18550, 1510)}


def _text(title, category="SUBSCRIPTION BOXES", brand="Unknown", price="Unknown"):
  return f"Title: {title}. Category: {category}. Brand: {brand}. Price: {price}. Image: "


MUG = _text("Mug Club", brand="Acme", price="12.99")
TEA = _text("Tea Box")
SOCKS = _text("Sock Club: Size L", category="Unknown")
UNBOUGHT = _text("Nobody Bought Me", brand="Zed")
IMG = "data/images/Subscription_Boxes/"


def _line(history, target):
  return {"user_history": [t for t, _ in history], "user_history_images": [IMG + i for _, i in history],
          "target_item": target[0], "target_item_image": IMG + target[1]}


# MUG comes in two pictures (two items with one text); TEA and SOCKS share a picture.
LINES = [
    _line([(MUG, "m1.jpg")], (TEA, "t.jpg")),
    _line([(TEA, "t.jpg"), (MUG, "m2.jpg")], (MUG, "m2.jpg")),
    _line([(SOCKS, "t.jpg"), (MUG, "m1.jpg"), (TEA, "t.jpg")], (MUG, "m2.jpg")),
]


def _write(path: pathlib.Path, lines) -> pathlib.Path:
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
  return path


@pytest.fixture()
def paper_file(tmp_path):
  return _write(tmp_path / "Tiny.jsonl", LINES)


def test_items_users_and_fields(paper_file, tmp_path):
  dataset = paper_format.convert(paper_file, tmp_path / "out")
  keys = sorted({(MUG, "m1.jpg"), (MUG, "m2.jpg"), (TEA, "t.jpg"), (SOCKS, "t.jpg")})
  assert [(dataset.item_text(i), it.fields["image_name"]) for i, it in enumerate(dataset.items)] == keys
  index = {key: i for i, key in enumerate(keys)}
  assert [u.user_id for u in dataset.users] == ["u000001", "u000002", "u000003"]
  np.testing.assert_array_equal(dataset.users[1].items, [index[TEA, "t.jpg"], index[MUG, "m2.jpg"],
                                                         index[MUG, "m2.jpg"]])
  np.testing.assert_array_equal(dataset.users[2].timestamps, [0, 1, 2, 3])  # Positions: no real times.
  mug = dataset.items[index[MUG, "m1.jpg"]]
  assert mug.fields == {"title": "Mug Club", "main_category": "SUBSCRIPTION BOXES", "brand": "Acme",
                        "price": "12.99", "image_name": "m1.jpg"}
  assert dataset.items[index[SOCKS, "t.jpg"]].fields == {"title": "Sock Club: Size L", "image_name": "t.jpg"}
  assert all(item.image is None for item in dataset.items)
  counts = dataset.manifest["counts"]
  assert {k: counts[k] for k in ("users", "interactions", "items", "bought_items", "corpus_only_items",
                                 "distinct_texts", "texts_with_several_items", "texts_unparsed",
                                 "images_found", "images_missing")} == {
      "users": 3, "interactions": 9, "items": 4, "bought_items": 4, "corpus_only_items": 0, "distinct_texts": 3,
      "texts_with_several_items": 1, "texts_unparsed": 0, "images_found": 0, "images_missing": 4}
  assert paper_format.item_template(dataset) == prompts.ITEM_TEMPLATE
  assert catalog.load_dataset(dataset.path, verify_hashes=True).num_items == 4


def test_corpus_items_follow_the_bought_ones(paper_file, tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("".join(t + "\n" for t in (UNBOUGHT, MUG, TEA)))
  plain = paper_format.convert(paper_file, tmp_path / "plain")
  dataset = paper_format.convert(paper_file, tmp_path / "with_corpus", corpus=corpus)
  assert dataset.items[:4] == plain.items  # Bought items keep their ids.
  assert dataset.items[4] == catalog.Item(4, {"title": "Nobody Bought Me", "main_category": "SUBSCRIPTION BOXES",
                                              "brand": "Zed"}, None)
  assert dataset.manifest["counts"]["corpus_only_items"] == 1
  assert dataset.manifest["options"]["corpus_sha256"] == catalog.file_sha256(corpus)


def test_images_are_copied_when_found(paper_file, tmp_path):
  images = tmp_path / "pictures"
  (images / IMG).mkdir(parents=True)
  Image.new("RGB", (4, 4), (255, 0, 0)).save(images / "m1.jpg")
  Image.new("RGB", (4, 4), (0, 255, 0)).save(images / IMG / "t.jpg")  # Found by the record's path.
  dataset = paper_format.convert(paper_file, tmp_path / "out", images=images)
  by_name = {(item.fields["image_name"], item.image) for item in dataset.items}
  assert by_name == {("m1.jpg", "images/m1.jpg"), ("m2.jpg", None), ("t.jpg", "images/t.jpg")}
  assert (dataset.path / "images/t.jpg").read_bytes() == (images / IMG / "t.jpg").read_bytes()
  counts = dataset.manifest["counts"]
  assert (counts["images_found"], counts["images_missing"]) == (3, 1)  # TEA and SOCKS share t.jpg.
  assert "images/m1.jpg" in dataset.manifest["files"]


def test_rerun_is_a_noop_and_other_options_fail(paper_file, tmp_path):
  out = tmp_path / "out"
  paper_format.convert(paper_file, out)
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  paper_format.convert(paper_file, out)
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
  with pytest.raises(catalog.DatasetError, match="already holds a dataset"):
    paper_format.convert(paper_file, out, tokenizer="bpe")
  _write(paper_file, LINES[:2])
  with pytest.raises(catalog.DatasetError, match="already holds a dataset"):
    paper_format.convert(paper_file, out)
  assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ("", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in LINES[0].items() if k != "target_item"}), "missing key 'target_item'"),
    (json.dumps({**LINES[0], "user_history": MUG}), "key 'user_history' is .* expected a list"),
    (json.dumps({**LINES[0], "user_history": [1]}), r"key 'user_history'\[0\] is 1, expected a string"),
    (json.dumps({**LINES[0], "target_item_image": None}), "key 'target_item_image' is None, expected a string"),
    (json.dumps({**LINES[0], "user_history_images": []}),
     "key 'user_history' has 1 texts but key 'user_history_images' has 0 paths"),
    (json.dumps({**LINES[0], "target_item_image": "data/images/"}),
     "image path 'data/images/' has no usable file name"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / "bad.jsonl", [LINES[0], line, LINES[1]])
  with pytest.raises(catalog.DatasetError, match=f"{path}:2: {message}"):
    paper_format.convert(path, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_parse_keeps_only_splits_that_reproduce_the_text():
  assert paper_format.parse_item_text(MUG) == {"title": "Mug Club", "main_category": "SUBSCRIPTION BOXES",
                                               "brand": "Acme", "price": "12.99"}
  assert paper_format.parse_item_text(_text("")) is None  # An empty title would render as Unknown.
  assert paper_format.parse_item_text(_text(" ")) is None
  assert paper_format.parse_item_text("Just a product name") is None
  tricky = _text("Box. Category: Mystery", brand="B. Price: 1")
  assert paper_format.is_ambiguous(tricky)
  assert prompts.render_item_text(paper_format.parse_item_text(tricky)) == tricky


def test_unparsable_texts_keep_the_whole_text(tmp_path):
  path = _write(tmp_path / "odd.jsonl", [_line([(MUG, "m1.jpg")], ("A product without the template", "x.jpg"))])
  dataset = paper_format.convert(path, tmp_path / "out")
  assert dataset.manifest["counts"]["texts_unparsed"] == 1
  assert paper_format.item_template(dataset) == paper_format.TEXT_TEMPLATE
  assert {dataset.item_text(i, paper_format.TEXT_TEMPLATE) for i in range(2)} == {
      MUG, "A product without the template"}
  assert all(set(item.fields) == {"text", "image_name"} for item in dataset.items)


@pytest.mark.parametrize("kind", paper_format.TOKENIZERS)
def test_tokenizer_covers_every_text(paper_file, tmp_path, kind):
  dataset = paper_format.convert(paper_file, tmp_path / "out", tokenizer=kind)
  tok = transformers.AutoTokenizer.from_pretrained(str(dataset.tokenizer_path))
  for index, token in enumerate(tokenizer_lib.SPECIAL_TOKENS):
    assert tok.convert_tokens_to_ids(token) == index
  for text in [dataset.item_text(i) for i in range(dataset.num_items)] + list(prompts.PROMPT_PHRASES):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    if kind == "bpe":
      assert tok.decode(ids) == text
  assert tok("Image: <image><image>", add_special_tokens=False)["input_ids"][-2:] == [
      tok.convert_tokens_to_ids(tokenizer_lib.IMAGE_TOKEN)] * 2


def test_cli(paper_file, tmp_path, capsys):
  paper_format.main(["--input", str(paper_file), "--out", str(tmp_path / "out")])
  printed = json.loads(capsys.readouterr().out)
  assert printed["users"] == 3 and printed["path"] == str((tmp_path / "out").resolve())


def _amazon_config(*overrides):
  cfg, _ = config_lib.parse_args(["--config", str(REPO / "configs/amazon_text.py"), *overrides])
  return cfg


def test_main_job_reads_paper_files(paper_file, tmp_path):
  cfg = _amazon_config(f"--config.data.input={paper_file}")
  assert cfg.data.source == "paper" and cfg.pixrec.text_only
  dataset = run.load_data(cfg, tmp_path)
  assert dataset.path == (tmp_path / "data").resolve() and dataset.num_items == 4
  with pytest.raises(ValueError, match="reproduces its item texts with the template"):
    run.load_data(_amazon_config(f"--config.data.input={paper_file}", "--config.data.template={title}"), tmp_path)
  with pytest.raises(FileNotFoundError, match="set --config.data.input"):
    run.load_data(_amazon_config(f"--config.data.input={tmp_path / 'absent.jsonl'}"), tmp_path / "other")


def test_amazon_config_defaults_and_options():
  cfg = _amazon_config()
  assert cfg.data.input == str(SHARED / "Subscription_Boxes.jsonl") and cfg.data.paper.corpus == ""
  magazines, _ = config_lib.parse_args(
      ["--config", f"{REPO / 'configs/amazon_text.py'}:Magazine_Subscriptions,corpus"])
  assert magazines.data.input == str(SHARED / "Magazine_Subscriptions.jsonl")
  assert magazines.data.paper.corpus == str(SHARED / "amazon_Magazine_Subscriptions_item_corpus.txt")
  with pytest.raises(ValueError, match="at most one category"):
    config_lib.parse_args(["--config", f"{REPO / 'configs/amazon_text.py'}:A,B"])


def _shared(name: str) -> pathlib.Path:
  path = SHARED / name
  if not path.is_file():
    pytest.skip(f"{path} is absent: the shared Amazon data sits beside the checkout, not in a fresh clone")
  return path


@pytest.mark.parametrize("category", CATEGORIES)
def test_shared_files_round_trip(category, tmp_path):
  source = _shared(f"{category}.jsonl")
  corpus = _shared(f"amazon_{category}_item_corpus.txt")
  dataset = paper_format.convert(source, tmp_path / "out", corpus=corpus)
  counts = dataset.manifest["counts"]
  assert counts["texts_unparsed"] == 0 and counts["texts_ambiguous"] == 0
  bought_texts = {dataset.item_text(i) for i in range(counts["bought_items"])}
  assert (counts["users"], counts["interactions"], len(bought_texts)) == CATEGORIES[category]
  with open(source, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == len(dataset.users) == counts["users"]
  for record, user in zip(records, dataset.users):
    texts = record["user_history"] + [record["target_item"]]
    images = record["user_history_images"] + [record["target_item_image"]]
    assert [dataset.item_text(int(i)) for i in user.items] == texts
    assert [dataset.items[int(i)].fields["image_name"] for i in user.items] == [p.rsplit("/", 1)[1] for p in images]
  corpus_texts = corpus.read_text(encoding="utf-8").splitlines()
  assert {dataset.item_text(i) for i in range(dataset.num_items)} == set(corpus_texts)
  assert all(prompts.render_item_text(paper_format.parse_item_text(t)) == t for t in corpus_texts)

"""Tests for the locally built word-level tokenizer."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # Loading must never need the network.

import pytest
import transformers

from pixrec_jax.data import prompts
from pixrec_jax.data import tokenizer as tokenizer_lib

_TEXTS = (
    prompts.render_item_text({"title": "Cozy Ceramic Mug", "main_category": "Home & Kitchen",
                              "brand": "Acme", "price": "12.99"}),
    prompts.render_item_text({"title": "Sleek Steel Lamp", "brand": "Lumen"}),
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return tokenizer_lib.build_word_tokenizer(_TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(saved):
  return transformers.AutoTokenizer.from_pretrained(saved)


def test_vocabulary_is_specials_then_sorted_words(tokenizer):
  words = sorted({w for text in (*_TEXTS, *prompts.PROMPT_PHRASES) for w in text.split()})
  expected = ["<pad>", "<unk>", "<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>"]
  expected += words
  vocab = tokenizer.get_vocab()
  assert sorted(vocab, key=vocab.get) == expected
  assert len(tokenizer) == len(expected)
  assert tokenizer.pad_token_id == 0
  assert (tokenizer.unk_token, tokenizer.eos_token) == ("<unk>", "<|endoftext|>")
  assert tokenizer.bos_token is None


def test_same_words_give_identical_files(saved, tmp_path):
  shuffled = tokenizer_lib.build_word_tokenizer(reversed(_TEXTS), tmp_path / "again")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (shuffled / name).read_bytes() == (saved / name).read_bytes()


def test_image_tokens_are_single_ids_even_without_spaces(tokenizer):
  prompt = ("Title: Cozy Ceramic Mug. <fake_token_around_image><global-img><image><image>"
            "<fake_token_around_image>\nThe next item")
  ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  assert tokenizer.convert_ids_to_tokens(ids) == [
      "Title:", "Cozy", "Ceramic", "Mug.", "<fake_token_around_image>", "<global-img>", "<image>",
      "<image>", "<fake_token_around_image>", "The", "next", "item"]
  image_ids = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer_lib.IMAGE_TOKENS]
  assert image_ids == [3, 4, 5]
  assert set(image_ids) <= set(tokenizer.all_special_ids)
  # Glued to a word on both sides, the special token must still split out.
  glued = tokenizer("Image:<image>Cozy", add_special_tokens=False)["input_ids"]
  assert tokenizer.convert_ids_to_tokens(glued) == ["Image:", "<image>", "Cozy"]


def test_no_bos_or_eos_so_pieces_concatenate(tokenizer):
  pieces = [prompts.HISTORY_INTRO, _TEXTS[0], prompts.TARGET_SEPARATOR, _TEXTS[1]]
  with_specials = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in pieces]
  without = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
  assert with_specials == without
  assert sum(with_specials, []) == tokenizer("".join(pieces))["input_ids"]


def test_known_words_never_unk_and_unknown_words_are(tokenizer):
  for text in (*_TEXTS, *prompts.PROMPT_PHRASES):
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
  assert tokenizer("Cozy Wicker")["input_ids"] == [tokenizer.convert_tokens_to_ids("Cozy"),
                                                   tokenizer.unk_token_id]

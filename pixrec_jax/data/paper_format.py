"""The PixRec paper authors' preprocessed Amazon files -> a processed dataset (format v1).

The paper's authors ship one JSON object per user (see
`../shared/data/amazon2023/README.md`):

  {"user_history": [text, ...], "user_history_images": [path, ...],
   "target_item": text, "target_item_image": path}

with no user ids, item ids or timestamps. This module turns such a file into the
folder `catalog.load_dataset` reads, so the paper's data and our own ingestion go
through one pipeline:

- Items are identified by (text, image file name): several items share a text and
  differ only in their image, which is exactly where images should help. Item ids
  are dense, in sorted (text, image name) order, so the same file always gives the
  same ids. Each item's `fields` keep `image_name` so its identity survives even
  though the image files are not shipped.
- Texts are parsed back into the fields of `prompts.ITEM_TEMPLATE` (title,
  main_category, brand, price; "Unknown" means missing and is left out), and a
  parse counts only if rendering the fields reproduces the text exactly. Should
  any text fail, every item stores its whole text in `text` instead, the manifest
  counts the failures, and the dataset must be read with TEXT_TEMPLATE
  (manifest counts "item_template" names the template that reproduces the texts).
- Users get ids u000001... in file order. The format has no timestamps, so each
  user's timestamps are the positions 0, 1, 2, ...: the order is the paper's (by
  review time), the gaps mean nothing, and only order-based splits (leave-one-out,
  the default) make sense; an absolute-time split does not.
- The item corpus (`amazon_<Category>_item_corpus.txt`), when given, adds the
  items no user of the file bought as further catalogue entries, after the bought
  ones (so bought items keep their ids). They are real catalogue items, but they
  can never be a target and the corpus has no image names, so in a run with images
  they would be the only image-less candidates. They are therefore off by default;
  include them to rank against the paper's whole BM25 catalogue.
- Images are copied into DIR/images/ only when an image folder is given and holds
  the file; otherwise `image` is null.
- A tokenizer for randomly initialised models is saved in DIR/tokenizer: by
  default one id per whitespace-separated word of the item texts. The catalogue is
  closed, so no text meets an unknown word, and it gives the shortest sequences
  (Subscription_Boxes: 1,268 words, 21 per item on average; a byte-level BPE with
  2,000 ids needs 36 tokens per item). "bpe" shares subwords between similar titles.

  python -m pixrec_jax.data.paper_format --input Subscription_Boxes.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import reprlib
import shutil
from collections.abc import Sequence

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pixrec_jax.data import catalog, prompts
from pixrec_jax.data import tokenizer as tokenizer_lib

SOURCE = "pixrec_jax.data.paper_format"
IMAGE_NAME_FIELD = "image_name"
TEXT_FIELD = "text"
# The template that reproduces every text when some could not be parsed.
TEXT_TEMPLATE = "{" + TEXT_FIELD + "}"
TOKENIZERS = ("word", "bpe")
BPE_VOCAB_SIZE = 2000

# Greedy title: a title is the field most likely to contain ". Category: " itself.
_TEXT_PATTERN = re.compile(
    r"Title: (?P<title>.*)\. Category: (?P<main_category>.*?)\. Brand: (?P<brand>.*?)"
    r"\. Price: (?P<price>.*?)\. Image: ", re.DOTALL)
_SEPARATORS = (". Category: ", ". Brand: ", ". Price: ", ". Image: ")


def parse_item_text(text: str) -> dict[str, str] | None:
  """The template fields of an item text, or None if they cannot reproduce it.

  Fields that read "Unknown" are left out (the template renders a missing field
  as "Unknown"), so `prompts.render_item_text(fields) == text` for every result.
  """
  match = _TEXT_PATTERN.fullmatch(text)
  if match is None:
    return None
  fields = {k: v for k, v in match.groupdict().items() if v != prompts.MISSING_FIELD}
  # An empty or blank field renders as "Unknown", not as itself.
  if prompts.render_item_text(fields) != text:
    return None
  return fields


def is_ambiguous(text: str) -> bool:
  """Whether a separator occurs more than once, so more than one split reproduces the text."""
  return any(text.count(separator) > 1 for separator in _SEPARATORS)


def _image_name(path: str, where: str) -> str:
  name = path.rsplit("/", 1)[-1]  # Not PurePosixPath: it would read "dir/" as the file "dir".
  if name in ("", ".", "..") or "\\" in name:
    raise catalog.DatasetError(f"{where}: image path {path!r} has no usable file name")
  return name


def read_paper_file(path: str | os.PathLike) -> list[list[tuple[str, str, str]]]:
  """Each user's purchases as (text, image name, image path) in the file's (time) order.

  Raises:
    catalog.DatasetError: naming the file and line of the first malformed record.
  """
  users = []
  # The format's own reader: the same file:line messages for malformed JSON and wrong types.
  for where, record in catalog._records(pathlib.Path(path)):
    texts = catalog._get(record, "user_history", list, where) + [catalog._get(record, "target_item", str, where)]
    paths = (catalog._get(record, "user_history_images", list, where)
             + [catalog._get(record, "target_item_image", str, where)])
    for key, values in (("user_history", texts[:-1]), ("user_history_images", paths[:-1])):
      for position, value in enumerate(values):
        if not isinstance(value, str):
          raise catalog.DatasetError(f"{where}: key {key!r}[{position}] is {reprlib.repr(value)}, expected a string")
    if len(texts) != len(paths):
      raise catalog.DatasetError(
          f"{where}: key 'user_history' has {len(texts) - 1} texts but key 'user_history_images' has "
          f"{len(paths) - 1} paths")
    users.append([(text, _image_name(image, where), image) for text, image in zip(texts, paths)])
  return users


def read_corpus(path: str | os.PathLike) -> list[str]:
  """The item texts of a corpus file, one per line (the trailing space of "Image: " kept)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise catalog.DatasetError(f"{path}: missing")
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def build_bpe_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike,
                        vocab_size: int = BPE_VOCAB_SIZE) -> pathlib.Path:
  """A byte-level BPE trained on `texts` and the prompt phrases, with the word tokenizer's
  special tokens (same ids, same added-token matching), saved in Hugging Face format."""
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(tokenizer_lib.SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator([*texts, *prompts.PROMPT_PHRASES], trainer)
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token=tokenizer_lib.PAD_TOKEN, unk_token=tokenizer_lib.UNK_TOKEN,
      eos_token=tokenizer_lib.EOS_TOKEN, extra_special_tokens=list(tokenizer_lib.IMAGE_TOKENS))
  out_dir = pathlib.Path(out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir


def _find_image(images: pathlib.Path, name: str, path: str) -> pathlib.Path | None:
  """The image in `images` by file name, or by the file's path as the record gives it (if inside)."""
  candidates = [images / name]
  pure = pathlib.PurePosixPath(path)
  if not pure.is_absolute() and ".." not in pure.parts:
    candidates.append(images / pure)
  return next((c for c in candidates if c.is_file()), None)


def _write(root: pathlib.Path, input_path: pathlib.Path, corpus: pathlib.Path | None,
           images: pathlib.Path | None, tokenizer: str, options: dict) -> None:
  """Writes the whole dataset into `root`, manifest last."""
  sequences = read_paper_file(input_path)
  image_paths = {(text, name): path for sequence in sequences for text, name, path in sequence}
  keys = sorted(image_paths)
  bought_texts = {text for text, _ in keys}
  corpus_only = sorted(set(read_corpus(corpus)) - bought_texts) if corpus else []
  texts = [text for text, _ in keys] + corpus_only
  names = [name for _, name in keys] + [None] * len(corpus_only)

  parsed = [parse_item_text(text) for text in texts]
  unparsed = sum(p is None for p in parsed)
  if unparsed:
    parsed = [{TEXT_FIELD: text} for text in texts]

  found = 0
  items = []
  for item_id, (text, name, fields) in enumerate(zip(texts, names, parsed)):
    image = None
    if name is not None:
      fields = {**fields, IMAGE_NAME_FIELD: name}
      source = _find_image(images, name, image_paths[text, name]) if images else None
      if source is not None:
        image = f"images/{name}"
        (root / "images").mkdir(exist_ok=True)
        if not (root / image).exists():  # Items that share an image share its copy.
          shutil.copyfile(source, root / image)
        found += 1
    items.append(catalog.Item(item_id=item_id, fields=fields, image=image))

  index = {key: item_id for item_id, key in enumerate(keys)}
  users = [
      catalog.User(user_id=f"u{u + 1:06d}",
                   items=np.asarray([index[text, name] for text, name, _ in sequence], np.int32),
                   timestamps=np.arange(len(sequence), dtype=np.int64))
      for u, sequence in enumerate(sequences)
  ]

  template = TEXT_TEMPLATE if unparsed else prompts.ITEM_TEMPLATE
  build = tokenizer_lib.build_word_tokenizer if tokenizer == "word" else build_bpe_tokenizer
  tokenizer_dir = build(texts, root / catalog.TOKENIZER_DIR)
  extra_files = [p.relative_to(root).as_posix() for p in sorted(tokenizer_dir.rglob("*")) if p.is_file()]

  items_per_text = collections.Counter(text for text, _ in keys)
  counts = {
      "users": len(users),
      "interactions": sum(len(s) for s in sequences),
      "items": len(items),
      "bought_items": len(keys),
      "corpus_only_items": len(corpus_only),
      "distinct_texts": len(set(texts)),
      "texts_with_several_items": sum(n > 1 for n in items_per_text.values()),
      "texts_unparsed": unparsed,
      "texts_ambiguous": sum(is_ambiguous(text) for text in texts),
      "images_found": found,
      "images_missing": len(keys) - found,
      "timestamps": "positions",
      "item_template": template,
  }
  catalog.write_dataset(root, name=input_path.stem, source=SOURCE, items=items, users=users,
                        options=options, counts=counts, extra_files=extra_files)


def _options(input_path: pathlib.Path, corpus: pathlib.Path | None, images: pathlib.Path | None,
             tokenizer: str) -> dict:
  """What decides the output: input contents (not paths, so moving the file changes nothing) and choices."""
  return {
      "input": input_path.name,
      "input_sha256": catalog.file_sha256(input_path),
      "corpus": corpus.name if corpus else None,
      "corpus_sha256": catalog.file_sha256(corpus) if corpus else None,
      "images": str(images.resolve()) if images else None,
      "tokenizer": tokenizer,
  }


def _existing(out_dir: pathlib.Path, options: dict) -> catalog.Dataset:
  dataset = catalog.load_dataset(out_dir)
  manifest = dataset.manifest
  if manifest["source"] != SOURCE or manifest["options"] != options:
    raise catalog.DatasetError(
        f"{out_dir} already holds a dataset from {manifest['source']} with options {manifest['options']}, "
        f"not {options}; choose another folder or delete it")
  return dataset


def item_template(dataset: catalog.Dataset) -> str:
  """The template that reproduces this converted dataset's item texts."""
  return dataset.manifest["counts"]["item_template"]


def convert(input_path: str | os.PathLike, out_dir: str | os.PathLike, *, corpus: str | os.PathLike | None = None,
            images: str | os.PathLike | None = None, tokenizer: str = "word") -> catalog.Dataset:
  """Converts a paper-format file into a processed dataset, or loads it if already there.

  A complete dataset converted from the same input (by sha256) with the same
  options is returned as is, so callers can convert unconditionally. Files are
  written into a hidden sibling folder renamed to `out_dir` once complete, so an
  interrupted run never leaves a half-written dataset.

  Args:
    input_path: the paper's `<Category>.jsonl`.
    out_dir: the dataset folder; must not exist, be empty, or hold this conversion.
    corpus: the paper's `amazon_<Category>_item_corpus.txt`, to add the items no
      user bought to the catalogue (see the module docstring); None: bought items only.
    images: a folder holding the image files (by file name, or by the path the
      records give); None: no images, every `image` is null.
    tokenizer: "word" (one id per whitespace-separated word of the item texts: the
      catalogue is closed, so no text ever meets an unknown word, and sequences are
      the shortest) or "bpe" (byte-level BPE with BPE_VOCAB_SIZE ids: subwords shared
      between similar titles, about 1.7x longer sequences).

  Returns:
    The loaded dataset.

  Raises:
    catalog.DatasetError: a malformed input (naming file and line), or `out_dir`
      holds something else.
  """
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
  input_path = pathlib.Path(input_path)
  corpus = pathlib.Path(corpus) if corpus else None
  images = pathlib.Path(images) if images else None
  for path in (input_path, corpus):
    if path is not None and not path.is_file():
      raise catalog.DatasetError(f"{path}: missing")
  if images is not None and not images.is_dir():
    raise catalog.DatasetError(f"{images}: not a folder of images")
  options = _options(input_path, corpus, images, tokenizer)

  return catalog.write_once(out_dir, lambda folder: _write(folder, input_path, corpus, images, tokenizer, options),
                            lambda d: _existing(d, options))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, type=pathlib.Path, help="the paper's <Category>.jsonl")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="dataset folder")
  parser.add_argument("--corpus", type=pathlib.Path, default=None,
                      help="amazon_<Category>_item_corpus.txt: add the items nobody bought to the catalogue")
  parser.add_argument("--images", type=pathlib.Path, default=None, help="folder holding the image files")
  parser.add_argument("--tokenizer", choices=TOKENIZERS, default="word")
  args = parser.parse_args(argv)
  dataset = convert(args.input, args.out, corpus=args.corpus, images=args.images, tokenizer=args.tokenizer)
  print(json.dumps({"path": str(dataset.path), **dataset.manifest["counts"]}, indent=2))


if __name__ == "__main__":
  main()

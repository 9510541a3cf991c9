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

from pixrec_jax.data import prompts

FLAGS = ("corpus",)
DEFAULT_CATEGORY = "Subscription_Boxes"
# The shared data sits beside the checkout: REPO/../shared/data/amazon2023.
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon2023"


def get_config(arg=None):
  options = [a for a in (arg or "").split(",") if a]
  categories = [a for a in options if a not in FLAGS]
  if len(categories) > 1 or any(not re.fullmatch(r"[A-Za-z_]+", c) for c in categories):
    raise ValueError(f"configs/amazon_text.py takes at most one category name (letters and _) and the flags "
                     f"{FLAGS}; got {options}")
  category = categories[0] if categories else DEFAULT_CATEGORY

  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # a local Hugging Face checkpoint directory; empty: random init from the sizes below
  c.model.scale_factor = 2
  # Unused (text only), but a random-init backbone config names a vision tower.
  c.model.vision = ml_collections.ConfigDict(dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"))
  c.model.text = ml_collections.ConfigDict(dict(
      hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True))
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.attention = "xla"

  c.pixrec = ml_collections.ConfigDict()
  c.pixrec.text_only = True
  c.pixrec.proj_dim = 128
  c.pixrec.pooling = "last"
  c.pixrec.alpha = 0.25  # item-item contrastive weight
  c.pixrec.beta = 0.5  # user-item contrastive weight
  c.pixrec.temperature = 0.1

  c.data = ml_collections.ConfigDict()
  c.data.source = "paper"
  c.data.input = str(SHARED / f"{category}.jsonl")
  c.data.path = ""  # where to convert it (default WORKDIR/data)
  c.data.paper = ml_collections.ConfigDict(dict(
      corpus=str(SHARED / f"amazon_{category}_item_corpus.txt") if "corpus" in options else "",
      images="",  # a folder holding the image files, if you have them
      tokenizer="word",  # or "bpe"; see paper_format.convert
  ))
  c.data.template = prompts.ITEM_TEMPLATE
  c.data.max_history = 5
  c.data.max_item_tokens = 0  # 0: the longest item text of the catalogue
  c.data.num_workers = 0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.epochs = 0
  c.train.batch_size = 32
  c.train.lr = 2e-3
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.clip_norm = 1.0
  c.train.trainable = "all"
  c.train.log_every = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.mask_history = False
  c.eval.splits = ("valid", "test")

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c

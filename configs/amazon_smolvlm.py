"""PixRec with images: a pretrained SmolVLM on a processed Amazon dataset, the paper's settings.

Needs two local folders; nothing is downloaded:
  data.path   a processed dataset folder with item images (pixrec_jax.data.ingest
              writes one from the raw Amazon Reviews 2023 files)
  model.path  a SmolVLM (Idefics3) checkpoint directory with its tokenizer and
              processor files, e.g. HuggingFaceTB/SmolVLM-256M-Instruct fetched
              beforehand with `huggingface-cli download ... --local-dir DIR`

  python -m pixrec_jax.main --config configs/amazon_smolvlm.py --workdir /tmp/smolvlm \
      --config.data.path=/data/amazon_toys --config.model.path=/models/SmolVLM-256M-Instruct

The paper's settings (PIXREC.md; pixrec_jax.recsys.presets.PAPER): histories of up
to 5 items in the paper's template, mean pooling, 128-d heads, a = 0.125,
b = -0.025, temperature 0.5, AdamW at 1e-4, batch 1, 10 epochs, the backbone
frozen except the LM head. With batch 1 the contrastive terms have no in-batch
negatives; --config.train.batch_size=16 gives them some.

Images go through the checkpoint's own processor settings. SmolVLM-256M resizes
the longest edge to 2048 px and cuts 512 px tiles: up to 4 x 4 tiles plus the
global image, 64 tokens each, so about 1,100 tokens per image and 102 tile slots
per training example. --config.data.max_image_tiles=4 bounds that (larger images
are processed at a shorter longest edge, 1024 px for a square one).
"""

import ml_collections

from pixrec_jax.data import prompts
from pixrec_jax.recsys import presets


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/amazon_smolvlm.py takes no options, got {arg!r}; set fields with --config.KEY=VALUE")

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.required = ("data.path", "model.path")

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # a local SmolVLM checkpoint directory (required)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.attention = "xla"

  c.pixrec = ml_collections.ConfigDict()
  c.pixrec.text_only = False
  c.pixrec.proj_dim = 128
  c.pixrec.pooling = "mean"

  c.data = ml_collections.ConfigDict()
  c.data.source = "dataset"
  c.data.path = ""  # a processed dataset folder with images (required)
  c.data.template = prompts.ITEM_TEMPLATE
  c.data.max_history = 5
  c.data.max_item_tokens = 0  # 0: the longest item text of the catalogue
  c.data.max_image_tiles = 0  # split tiles per image at most; 0: the processor's own bound
  c.data.num_workers = 0  # grain worker processes; raise it to decode and resize images in parallel
  # Batch 1 (the paper's): each batch cut to the tokens and image slots it uses, rounded up to one of 4 sizes
  # per axis (pixrec_jax/data/buckets.py), instead of always 6 images' worth of tiles and tokens; one compiled
  # step per shape. 0: static shapes.
  c.data.length_buckets = 4

  c.train = ml_collections.ConfigDict()
  c.train.steps = 0  # used when train.epochs is 0
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.01  # torch's AdamW default
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.clip_norm = 1.0
  c.train.log_every = 50
  # The paper's mode freezes the vision tower and the connector: each catalogue image tile is encoded once,
  # before training, and batches carry its features, not pixels (pixrec_jax/data/features.py).
  c.train.cache_image_features = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.mask_history = False  # the paper ranks every catalogue item, bought before or not
  c.eval.splits = ("valid", "test")

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # The loss weights and temperature, lr, batch_size, epochs and trainable.
  presets.apply(c, presets.PAPER)
  return c

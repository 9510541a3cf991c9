"""The embedded default: PixRec on the synthetic catalogue, trained from scratch.

Runs with no download: the data, its images and its tokenizer are generated
locally (pixrec_jax.data.synthetic), the backbone is a small randomly initialised
SmolVLM-family model. Its train step packs each batch: prompts and their items end to end into rows, each
distinct image once into an image budget, both sized from the data (data.pack_rows=-1, data.image_budget=-1;
the same outputs as a row per prompt, but for the few history items dropped where a batch does not fit,
counted in metrics.json; README, "Speed switches"). --config.data.pack_rows=0
--config.data.pack_items=False --config.data.image_budget=0 trains a row per prompt, as the paper's code does.
Options (comma separated after the colon):
  text_only  the text-only baseline: same backbone and data, no images anywhere
  paper      the PixRec reference code's loss weights and optimiser (see presets)
  lora       the paper's LoRA: r=8, alpha 8, dropout 0.1 on the decoder MLP linears; base frozen

  python -m pixrec_jax.main --config configs/demo.py --workdir /tmp/demo
  python -m pixrec_jax.main --config configs/demo.py:text_only --workdir /tmp/demo_text
"""

import dataclasses

import ml_collections

from pixrec_jax.data import prompts
from pixrec_jax.data.synthetic import SyntheticOptions
from pixrec_jax.recsys import presets

OPTIONS = ("text_only", "paper", "lora")


def get_config(arg=None):
  options = [a for a in (arg or "").split(",") if a]
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for configs/demo.py; valid: {OPTIONS}")

  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.path = ""  # a local Hugging Face checkpoint directory; empty: random init from the sizes below
  c.model.scale_factor = 2
  c.model.vision = ml_collections.ConfigDict(dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"))
  c.model.text = ml_collections.ConfigDict(dict(
      hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=True))
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.attention = "xla"
  c.model.scan_layers = False  # True: one jax.lax.scan over stacked layers (compiles one layer; checkpoints load either way)
  c.model.remat = "none"  # rematerialisation policy per layer: none, full, dots, minimal (models/scan.py)
  c.model.causal_blocks = 4  # XLA decoder attention in 4 query blocks that skip the causal mask's zeros (1: off)

  c.pixrec = ml_collections.ConfigDict()
  c.pixrec.text_only = "text_only" in options
  c.pixrec.proj_dim = 128
  c.pixrec.pooling = "last"  # mean (the paper's) also works, but trains slower from scratch
  c.pixrec.alpha = 0.25  # item-item contrastive weight
  c.pixrec.beta = 0.5  # user-item contrastive weight
  c.pixrec.temperature = 0.1

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # or "dataset": a processed dataset folder at data.path
  c.data.path = ""  # synthetic: where to generate (default WORKDIR/data)
  c.data.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticOptions()))
  c.data.template = prompts.ITEM_TEMPLATE
  c.data.max_history = 5
  c.data.max_item_tokens = 0  # 0: the longest item text of the catalogue
  c.data.max_image_tiles = 0  # with model.path: split tiles per image at most (0: the processor's bound)
  c.data.num_workers = 0  # grain worker processes (0: in the main process)
  # > 0: a batch carries each distinct image tile once, in this many rows per global batch, so the vision tower
  # skips empty slots and repeats; a batch with more drops its longest histories' oldest items (counted).
  # -1: the most distinct tiles a batch of the first 64 shows, rounded up to 8 (here 72 of 192 slots; 0 when
  # text_only); 0: every slot, B * (max_history + 1).
  c.data.image_budget = -1
  # > 0: the full prompts are packed end to end into this many rows per global batch (data/packing.py): the
  # decoder skips the padding of short histories. A batch that does not fit drops its longest prompts' oldest
  # items (counted). -1: the 95th percentile of the rows the first 64 batches need; 0: a row per example.
  c.data.pack_rows = -1
  c.data.pack_items = True  # with pack_rows: the items read alone are packed into the same rows (one decoder pass)
  # > 0: each batch is cut to the tokens, image rows or slots it uses, rounded up to one of this many sizes per
  # axis (data/buckets.py): for small batches, which packing cannot fill; the step compiles once per shape.
  # One process only (off, with a notice, in a multi-process run). 0: every batch has the layout's shapes. The
  # full-size configs' paper option (batch 1) sets 4; this tiny model's step at batch 1 is overhead, not work,
  # and would only compile more shapes (BENCHMARKS.md, "Batches cut to the lengths they use").
  c.data.length_buckets = 0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 650
  c.train.epochs = 0  # > 0: steps = epochs * training users / batch_size instead
  c.train.batch_size = 32  # global
  c.train.lr = 2e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.clip_norm = 1.0
  c.train.trainable = "all"  # all | heads_lm_head | frozen_vision
  # With the vision tower frozen (heads_lm_head, frozen_vision): every catalogue image tile is encoded once,
  # before training, and batches carry its features in place of pixels (pixrec_jax/data/features.py). The
  # paper option sets it.
  c.train.cache_image_features = False
  c.train.log_every = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.mask_history = True
  c.eval.splits = ("valid", "test")

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if "paper" in options:
    presets.apply(c, presets.PAPER)
    c.train.cache_image_features = "text_only" not in options  # the tower is frozen; there are images
  if "lora" in options:
    presets.apply(c, presets.LORA)
  return c

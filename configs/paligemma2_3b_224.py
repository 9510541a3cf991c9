"""PixRec on PaliGemma 2 3B at 224 px (google/paligemma2-3b-pt-224), the paper's large VLM backbone.

configs/demo.py with the full-size backbone (pixrec_jax.models.zoo "paligemma2_3b_224"):
SigLIP so400m-patch14-224 (256 tokens per image), a linear projector, a Gemma2-2B
decoder. Loads a local checkpoint directory (config.json + safetensors + tokenizer)
from model.path; with model.path empty the backbone is randomly initialised at full
size (benchmarks). Options as in demo.py (text_only, paper, lora). PixRec's prompts are
causal throughout: PaliGemma's bidirectional prefix (token_type_ids) is not used.

  python -m pixrec_jax.main --config configs/paligemma2_3b_224.py:paper \
      --config.model.path=/models/paligemma2-3b-pt-224 --config.data.source=dataset --config.data.path=DATA
  python -m pixrec_jax.main --config configs/paligemma2_3b_224.py --config.train.steps=20  # random init

On GPUs, --config.model.attention=pallas runs the fused soft-capping attention kernels
(pixrec_jax/models/flash.py) in place of XLA's; exact, not yet timed on a GPU (BENCHMARKS.md).

--config.data.pack_rows=-1 packs the prompts end to end (a third of a batch is padding at 1..5 history
items of 256 image tokens each): the decoder reads about 12 rows of 1680 for 16 prompts (data/packing.py).
"""

import pathlib

from pixrec_jax import config_lib
from pixrec_jax.models import zoo

DEMO = pathlib.Path(__file__).with_name("demo.py")


def get_config(arg=None):
  c = config_lib.load_config_file(f"{DEMO}:{arg or ''}")
  with c.unlocked():
    c.model = zoo.model_section("paligemma2_3b_224")
    c.model.scan_layers = True  # 26 + 27 layers compile as one of each
    c.model.remat = "minimal"  # keep the weight matmuls' outputs, recompute attention: 3B at 256 tokens per image
    # A row per prompt and every image slot, as this config's recorded benchmarks ran (their packed rows name
    # data.image_budget / data.pack_rows / --pack-rows explicitly); the demo itself packs by default
    # (data.image_budget=-1, data.pack_rows=-1, data.pack_items=True), and so can a run of this config.
    c.data.image_budget = 0
    c.data.pack_rows = 0
    c.data.pack_items = False
    if "paper" in (arg or "").split(","):  # batch 1: each batch cut to the tokens and images it uses
      c.data.length_buckets = 4  # (data/buckets.py; smolvlm_256m:paper's CPU step 2.23x faster: BENCHMARKS.md)
  return c

"""PixRec on SmolVLM-256M (HuggingFaceTB/SmolVLM-256M-Instruct), the paper's small VLM backbone.

configs/demo.py with the full-size backbone (pixrec_jax.models.zoo "smolvlm_256m"):
SigLIP base-patch16-512, pixel shuffle 4 (64 tokens per image), a SmolLM2-135M-like
Llama decoder. Loads a local checkpoint directory (config.json + safetensors +
tokenizer) from model.path; with model.path empty the backbone is randomly
initialised at full size (benchmarks). Options as in demo.py (text_only, paper, lora).

  python -m pixrec_jax.main --config configs/smolvlm_256m.py:paper \
      --config.model.path=/models/SmolVLM-256M-Instruct --config.data.source=dataset --config.data.path=DATA
  python -m pixrec_jax.main --config configs/smolvlm_256m.py --config.train.steps=20  # random init

--config.data.pack_rows=-1 packs the prompts end to end (about a third of a batch is padding at 1..5
history items): 16 prompts fit about 12 rows of 544 (pixrec_jax/data/packing.py).
"""

import pathlib

from pixrec_jax import config_lib
from pixrec_jax.models import zoo

DEMO = pathlib.Path(__file__).with_name("demo.py")


def get_config(arg=None):
  c = config_lib.load_config_file(f"{DEMO}:{arg or ''}")
  with c.unlocked():
    c.model = zoo.model_section("smolvlm_256m")
    # Layers unrolled: on an H200 the step runs 1.40x faster than scanned (95.9 vs 68.7 examples/s at batch 16,
    # BENCHMARKS.md; a scan stacks every activation the backward pass reads), for about 25 s more compilation.
    # True compiles the 30 + 12 layers as one of each; checkpoints load either way.
    c.model.scan_layers = False
    c.model.remat = "none"
    # A row per prompt and every image slot, as this config's recorded benchmarks ran (their packed rows name
    # data.image_budget / data.pack_rows / --pack-rows explicitly); the demo itself packs by default
    # (data.image_budget=-1, data.pack_rows=-1, data.pack_items=True), and so can a run of this config.
    c.data.image_budget = 0
    c.data.pack_rows = 0
    c.data.pack_items = False
    if "paper" in (arg or "").split(","):  # batch 1: each batch cut to the tokens and images it uses
      c.data.length_buckets = 4  # (data/buckets.py; smolvlm_256m:paper's CPU step 2.23x faster: BENCHMARKS.md)
  return c

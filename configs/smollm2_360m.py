"""Text-only PixRec on SmolLM2-360M (HuggingFaceTB/SmolLM2-360M), the paper's text baseline.

configs/demo.py with a text-only Llama backbone (pixrec_jax.models.zoo "smollm2_360m")
and no images anywhere. Loads a local checkpoint directory (config.json +
safetensors + tokenizer) from model.path; with model.path empty the backbone is
randomly initialised at full size (benchmarks). Option: paper (as in demo.py).

  python -m pixrec_jax.main --config configs/smollm2_360m.py:paper \
      --config.model.path=/models/SmolLM2-360M --config.data.source=dataset --config.data.path=DATA
  python -m pixrec_jax.main --config configs/smollm2_360m.py --config.train.steps=20  # random init
"""

import pathlib

from pixrec_jax import config_lib
from pixrec_jax.models import zoo

DEMO = pathlib.Path(__file__).with_name("demo.py")


def get_config(arg=None):
  c = config_lib.load_config_file(f"{DEMO}:{arg or ''}")
  with c.unlocked():
    c.model = zoo.model_section("smollm2_360m")
    c.model.scan_layers = True  # 32 layers compile as one
    c.model.remat = "none"
    c.pixrec.text_only = True
    c.train.cache_image_features = False  # no images to cache (demo.py's paper option sets it)
    if "paper" in (arg or "").split(","):  # batch 1: each batch cut to the tokens and images it uses
      c.data.length_buckets = 4  # (data/buckets.py; smolvlm_256m:paper's CPU step 2.23x faster: BENCHMARKS.md)
  return c

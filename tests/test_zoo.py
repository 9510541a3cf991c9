"""The model zoo: full-size parameter counts against transformers, config sections and files.

Full-size models are never allocated: transformers builds them on the meta device,
ours is counted from `nnx.eval_shape`.
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixrec_jax import config_lib
from pixrec_jax.models import config as config_mod
from pixrec_jax.models import zoo
from pixrec_jax.models.backbone import Backbone

# Published totals, where a source independent of transformers states one: SmolLM2-360M's
# model card (361,821,120), and keras-hub's PaliGemma2 pt 3B 224 preset (3,032,094,960 with the
# 257,152-token vocabulary; the Hugging Face checkpoint pads it to 257,216 rows of 2,304).
PUBLISHED = {"smollm2_360m": 361_821_120, "paligemma2_3b_224": 3_032_094_960 + (257_216 - 257_152) * 2_304}


def _our_count(cfg) -> int:
  abstract = nnx.eval_shape(lambda rngs: Backbone(cfg, rngs=rngs), nnx.Rngs(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_parameter_count_matches_transformers(name):
  with torch.device("meta"):
    hf_model = getattr(transformers, zoo.hf_architecture(name))(zoo.hf_config(name))
  # parameters() yields a tied tensor once, as our tied backbone holds it once.
  hf_count = sum(p.numel() for p in hf_model.parameters())
  assert _our_count(zoo.get(name)) == hf_count
  if name in PUBLISHED:
    assert hf_count == PUBLISHED[name]


def test_defaults_for_omitted_keys_are_transformers_defaults():
  gemma2 = transformers.Gemma2Config()
  for key, value in config_mod.GEMMA2_DEFAULTS.items():
    assert getattr(gemma2, key) == value, key
  for defaults, cls in ((config_mod.SIGLIP_VISION_DEFAULTS, transformers.SiglipVisionConfig),
                        (config_mod.IDEFICS3_VISION_DEFAULTS, transformers.Idefics3VisionConfig)):
    hf = cls()
    for key, value in defaults.items():
      assert getattr(hf, key) == value, (cls.__name__, key)
  paligemma = transformers.PaliGemmaConfig()
  for key, value in config_mod.PALIGEMMA_DEFAULTS.items():
    assert getattr(paligemma, key) == value, key
  assert gemma2.rope_parameters["rope_theta"] == 10000.0
  assert tuple(gemma2.layer_types) == config_mod.gemma2_layer_types(gemma2.num_hidden_layers)


def test_sparse_hub_config_reads_like_the_full_one():
  """Hub config.json files leave defaults out; they must read as transformers reads them."""
  sparse = {
      "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2304,
      "text_config": {"model_type": "gemma2", "vocab_size": 257216, "num_hidden_layers": 26,
                      "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0},
      "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                        "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14,
                        "projection_dim": 2304, "vision_use_head": False},
  }
  ours = config_mod.BackboneConfig.from_hf_dict(json.loads(json.dumps(sparse)))
  assert ours == zoo.get("paligemma2_3b_224")
  hf = transformers.PaliGemmaConfig(**sparse)
  assert (hf.text_config.head_dim, hf.text_config.attn_logit_softcapping, hf.vision_config.image_size) == (
      ours.text.head_dim, ours.text.attn_logit_softcapping, ours.vision.image_size)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_config_files_build_the_zoo_backbone(name):
  cfg, _ = config_lib.parse_args(["--config", f"configs/{name}.py"])
  assert zoo.backbone_config(cfg.model) == zoo.get(name)
  assert cfg.pixrec.text_only == (not zoo.get(name).is_vlm)
  override, _ = config_lib.parse_args(["--config", f"configs/{name}.py:paper",
                                       "--config.model.text.num_hidden_layers=2"])
  assert zoo.backbone_config(override.model).text.num_hidden_layers == 2
  assert override.train.trainable == "heads_lm_head"


class _Tokenizer:
  """What backbone_config reads from a tokenizer."""

  def __init__(self, size, image_id=7):
    self.size, self.image_id = size, image_id
    self.pad_token_id, self.unk_token_id = 1, 0

  def __len__(self):
    return self.size

  def convert_tokens_to_ids(self, token):
    return self.image_id if token == zoo.IMAGE_TOKEN else self.unk_token_id


def test_random_init_takes_ids_from_the_tokenizer():
  section = zoo.model_section("paligemma2_3b_224")
  cfg = zoo.backbone_config(section, _Tokenizer(1000))
  assert (cfg.text.vocab_size, cfg.text.pad_token_id, cfg.image_token_id) == (257216, 1, 7)
  assert cfg.text.attention_types == zoo.get("paligemma2_3b_224").text.attention_types
  with pytest.raises(ValueError, match="more than model.text.vocab_size"):
    zoo.backbone_config(section, _Tokenizer(300_000))
  with pytest.raises(ValueError, match="no '<image>' token"):
    zoo.backbone_config(section, _Tokenizer(1000, image_id=0))
  text_only = zoo.backbone_config(zoo.model_section("smollm2_360m"), _Tokenizer(1000, image_id=0))
  assert not text_only.is_vlm
  demo, _ = config_lib.parse_args(["--config", "configs/demo.py"])
  legacy = zoo.backbone_config(demo.model, _Tokenizer(500))
  assert (legacy.model_type, legacy.text.vocab_size, legacy.scale_factor) == ("idefics3", 500, 2)
  with pytest.raises(ValueError, match="model.text: unknown key.*'hidden_sise'"):
    bad = zoo.model_section("smollm2_360m")
    bad.text.hidden_sise = 3
    zoo.backbone_config(bad)


def test_checkpoint_of_another_type_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(zoo.ZOO["smollm2_360m"]))
  section = zoo.model_section("paligemma2_3b_224")
  section.path = str(tmp_path)
  with pytest.raises(ValueError, match="holds a 'llama' checkpoint.*model_type='paligemma'"):
    zoo.backbone_config(section)
  section = zoo.model_section("smollm2_360m")
  section.path = str(tmp_path)
  assert zoo.backbone_config(section) == zoo.get("smollm2_360m")


def test_unknown_name_lists_the_zoo():
  with pytest.raises(ValueError, match="paligemma2_3b_224"):
    zoo.get("paligemma_3b")


def test_backbone_config_round_trips_through_hf_json():
  for name in zoo.ZOO:
    cfg = zoo.get(name)
    assert config_mod.BackboneConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg, name

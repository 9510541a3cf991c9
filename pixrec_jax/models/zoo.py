"""The paper's three backbones by name, and the one place a config's `model` section
becomes a `BackboneConfig`.

Each zoo entry is the architecture part of its Hub checkpoint's config.json, in
Hugging Face's own keys, so that both sides are built from the same numbers: our
`BackboneConfig.from_hf_dict` and `transformers`' config classes
(tests/test_zoo.py checks that the two models have the same parameter count).

  smolvlm_256m       HuggingFaceTB/SmolVLM-256M-Instruct: SigLIP base-patch16-512,
                     pixel shuffle 4, SmolLM2-135M-like Llama decoder (untied head)
  paligemma2_3b_224  google/paligemma2-3b-pt-224: SigLIP so400m-patch14-224,
                     linear projector, Gemma2-2B decoder
  smollm2_360m       HuggingFaceTB/SmolLM2-360M: text-only Llama, tied embeddings

A config's `model` section (see configs/) names the architecture by `model_type`
and its sizes under `text` and `vision`; `model_section(name)` writes one for a zoo
entry. With `model.path` set, the checkpoint's own config.json decides instead.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from pixrec_jax.models.config import (BackboneConfig, TextConfig, VisionConfig, VLM_MODEL_TYPES,
                                      gemma2_layer_types)

# The image placeholder of SmolVLM's and PaliGemma's tokenizers (and the synthetic one).
IMAGE_TOKEN = "<image>"

ZOO: dict[str, dict[str, Any]] = {
    "smolvlm_256m": {
        "model_type": "idefics3",
        "architectures": ["Idefics3ForConditionalGeneration"],
        "image_token_id": 49190,
        "scale_factor": 4,
        "tie_word_embeddings": False,
        "vocab_size": 49280,
        "text_config": {
            "model_type": "llama",
            "vocab_size": 49280,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "max_position_embeddings": 8192,
            "pad_token_id": 2,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
            "layer_norm_eps": 1e-6,
        },
    },
    "paligemma2_3b_224": {
        "model_type": "paligemma",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "image_token_index": 257152,
        "projection_dim": 2304,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "gemma2",
            "vocab_size": 257216,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 8192,
            "pad_token_id": 0,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 2304,
            "vision_use_head": False,
        },
    },
    "smollm2_360m": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


def _entry(name: str) -> dict[str, Any]:
  if name not in ZOO:
    raise ValueError(f"unknown backbone {name!r}; the zoo has {sorted(ZOO)}")
  return copy.deepcopy(ZOO[name])


def get(name: str) -> BackboneConfig:
  """The zoo entry's BackboneConfig."""
  return BackboneConfig.from_hf_dict(_entry(name), source=f"zoo:{name}")


def hf_config(name: str):
  """The zoo entry as a `transformers` config object (imports transformers)."""
  import transformers  # pylint: disable=import-outside-toplevel

  return transformers.AutoConfig.for_model(**_entry(name))


def hf_architecture(name: str) -> str:
  """The `transformers` model class of the entry, e.g. "PaliGemmaForConditionalGeneration"."""
  return ZOO[name]["architectures"][0]


# -- config sections -----------------------------------------------------------


def _section_dict(obj) -> dict[str, Any]:
  """A dataclass as a ConfigDict-friendly dict: None (a default) left out, tuples kept."""
  return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def model_section(name: str) -> ml_collections.ConfigDict:
  """The `model` section of a config for zoo entry `name`, random init until `path` is set."""
  cfg = get(name)
  text = _section_dict(cfg.text)
  if cfg.text.layer_types == gemma2_layer_types(cfg.text.num_hidden_layers):
    del text["layer_types"]  # the default pattern; 26 names would only bury the sizes
  section = ml_collections.ConfigDict()
  section.path = ""  # a local Hugging Face checkpoint directory; empty: random init from the sizes below
  section.model_type = cfg.model_type
  section.text = ml_collections.ConfigDict(text)
  if cfg.is_vlm:
    section.scale_factor = cfg.scale_factor
    section.image_token_id = cfg.image_token_id  # random init with a tokenizer: its <image> id instead
    section.vision = ml_collections.ConfigDict(_section_dict(cfg.vision))
  section.dtype = "bfloat16"  # compute; parameters stay float32
  section.param_dtype = "float32"
  section.attention = "xla"
  section.causal_blocks = 4  # see configs/demo.py
  return section


def _build(cls, values: dict[str, Any], where: str):
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(fields)}")
  try:
    return cls(**values)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from None


def backbone_config(model: ml_collections.ConfigDict, tokenizer=None) -> BackboneConfig:
  """A config's `model` section -> BackboneConfig.

  With `model.path`, the checkpoint's config.json (and, if the section names a
  `model_type`, a check that the checkpoint is of that type). Otherwise random init
  from the section's sizes; a tokenizer then supplies the vocabulary size where the
  section gives none (it may not exceed one that is given), the pad id and the
  image token id. A section without `model_type` (configs/demo.py) is idefics3.
  """
  model_type = model.get("model_type")
  if model.get("path"):
    cfg = BackboneConfig.from_pretrained(model.path)
    if model_type and cfg.model_type != model_type:
      raise ValueError(f"model.path={model.path} holds a {cfg.model_type!r} checkpoint, but the config is for "
                       f"model_type={model_type!r}")
    return cfg
  model_type = model_type or "idefics3"
  text = model.text.to_dict()
  if tokenizer is not None:
    given = text.get("vocab_size")
    if given is not None and len(tokenizer) > given:
      raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than model.text.vocab_size={given}")
    text.setdefault("vocab_size", len(tokenizer))
    text["pad_token_id"] = tokenizer.pad_token_id
  if "vocab_size" not in text:
    raise ValueError("model.text.vocab_size is not set and no tokenizer gives one")
  if "layer_types" in text:
    text["layer_types"] = tuple(text["layer_types"])
  elif text.get("model_type") == "gemma2":
    text["layer_types"] = gemma2_layer_types(text["num_hidden_layers"])
  text_cfg = _build(TextConfig, text, "model.text")
  if model_type not in VLM_MODEL_TYPES:
    cfg = BackboneConfig(model_type=model_type, text=text_cfg)
  else:
    image_token = model.get("image_token_id")
    if tokenizer is not None:
      image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
      if image_token is None or image_token == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token")
    cfg = BackboneConfig(model_type=model_type, text=text_cfg,
                         vision=_build(VisionConfig, model.vision.to_dict(), "model.vision"),
                         scale_factor=int(model.get("scale_factor", 1)),
                         image_token_id=None if image_token is None else int(image_token))
  cfg.validate()
  return cfg

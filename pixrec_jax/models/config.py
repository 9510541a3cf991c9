"""Backbone configurations, read from (and written back to) Hugging Face config.json.

Architecture fields follow the Hugging Face names of three families:
  idefics3, smolvlm  SmolVLM (`Idefics3Config`, `SmolVLMConfig`): a SigLIP-style
                     vision config and a Llama text config
  paligemma          PaliGemma 2 (`PaliGemmaConfig`): a SigLIP vision config and a
                     Gemma2 text config
  llama              a text-only Llama decoder (`LlamaConfig`, SmolLM2)
config.json files leave out keys at their class defaults, so each family reads
missing keys as its Hugging Face class would. Runtime choices that are not part of
a checkpoint (compute dtype, parameter dtype, attention kernel) live in `Runtime`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

from pixrec_jax.models import scan

VLM_MODEL_TYPES = ("idefics3", "smolvlm", "paligemma")
TEXT_MODEL_TYPES = ("llama",)
ATTENTION_TYPES = ("full_attention", "sliding_attention")

# The Hugging Face class defaults (transformers 5.24) that config.json files omit;
# tests/test_zoo.py checks them against the classes.
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                       max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh", attention_bias=False,
                       query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0, pad_token_id=0, tie_word_embeddings=True)
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6)
IDEFICS3_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=16, num_channels=3, image_size=224, patch_size=32,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PALIGEMMA_DEFAULTS = dict(image_token_index=256000, projection_dim=2048, tie_word_embeddings=True)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")  # layers.attention's


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a backbone runs, separate from what it is."""

  dtype: str = "float32"  # compute dtype of matmuls and activations
  param_dtype: str = "float32"  # storage dtype of parameters
  attention: str = "xla"  # "xla" (einsum, float32 softmax), "cudnn" (fused GPU kernel) or "pallas" (fused, soft-caps)
  scan_layers: bool = False  # one jax.lax.scan over stacked layers: one layer to compile, not all
  remat: str = "none"  # a pixrec_jax.models.scan.REMAT_POLICIES name: what a layer saves for the backward pass
  causal_blocks: int = 1  # causal decoders: XLA attention in this many query blocks, skipping masked keys

  def __post_init__(self):
    scan.remat_policy(self.remat)  # an unknown name fails here, listing the valid ones
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    if not isinstance(self.causal_blocks, int) or self.causal_blocks < 1:
      raise ValueError(f"causal_blocks must be a positive integer (1: no blocking), got {self.causal_blocks!r}")

  @classmethod
  def from_config(cls, model) -> Runtime:
    """The Runtime a config's `model` section sets: each field it has (dtype, attention, remat, ...),
    the default for each it lacks (configs written before a field existed)."""
    return cls(**{f.name: model[f.name] for f in dataclasses.fields(cls) if f.name in model})

  @property
  def compute_dtype(self):
    return dtype_from_name(self.dtype)

  @property
  def params_dtype(self):
    return dtype_from_name(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  hidden_act: str = "silu"
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  pad_token_id: int | None = None
  # "llama" or "gemma2". The fields below are Gemma2's; None (Llama) switches each off.
  model_type: str = "llama"
  query_pre_attn_scalar: int | None = None  # attention scale is its -1/2 power (None: head_dim)
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  sliding_window: int | None = None  # keys a sliding-attention layer sees: the query and sliding_window - 1 before
  layer_types: tuple[str, ...] | None = None  # per layer, one of ATTENTION_TYPES; None: all full_attention

  @property
  def attention_types(self) -> tuple[str, ...]:
    return self.layer_types or ("full_attention",) * self.num_hidden_layers


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """A vision-language model (vision is not None) or a text-only Llama decoder."""

  model_type: str
  text: TextConfig
  vision: VisionConfig | None = None
  scale_factor: int = 1
  image_token_id: int | None = None

  @property
  def is_vlm(self) -> bool:
    return self.vision is not None

  @property
  def image_seq_len(self) -> int:
    """Language-model tokens per image (tile) after the connector (SmolVLM's pixel shuffle)."""
    if self.vision is None:
      return 0
    return self.vision.patches_per_side**2 // self.scale_factor**2

  def validate(self) -> None:
    t = self.text
    if t.num_attention_heads % t.num_key_value_heads:
      raise ValueError(f"num_attention_heads={t.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={t.num_key_value_heads}")
    if t.head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got {t.head_dim}")
    want = "gemma2" if self.model_type == "paligemma" else "llama"
    if t.model_type != want:
      raise ValueError(f"model_type {self.model_type!r} needs a {want!r} text config, got {t.model_type!r}")
    if t.layer_types is not None:
      if len(t.layer_types) != t.num_hidden_layers:
        raise ValueError(f"layer_types lists {len(t.layer_types)} layers, num_hidden_layers={t.num_hidden_layers}")
      unknown = sorted(set(t.layer_types) - set(ATTENTION_TYPES))
      if unknown:
        raise ValueError(f"layer_types: unknown attention type(s) {unknown}; valid: {ATTENTION_TYPES}")
      if "sliding_attention" in t.layer_types and not t.sliding_window:
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    if self.model_type == "paligemma" and self.scale_factor != 1:
      raise ValueError(f"paligemma has no pixel shuffle: scale_factor must be 1, got {self.scale_factor}")
    if self.vision is not None:
      v = self.vision
      if v.image_size % v.patch_size:
        raise ValueError(f"vision image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
      if v.patches_per_side % self.scale_factor:
        raise ValueError(f"patches per side {v.patches_per_side} is not a multiple of scale_factor={self.scale_factor}")
      if v.hidden_size % v.num_attention_heads:
        raise ValueError(f"vision hidden_size={v.hidden_size} is not a multiple of heads={v.num_attention_heads}")
      if self.image_token_id is None:
        raise ValueError("a vision-language backbone needs image_token_id")

  # -- Hugging Face config.json ---------------------------------------------

  @classmethod
  def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "BackboneConfig":
    model_type = cfg.get("model_type")
    if model_type == "paligemma":
      out = _paligemma_from_hf(cfg, source)
    elif model_type in VLM_MODEL_TYPES:
      text = _text_from_hf(_require(cfg, "text_config", source), source + ":text_config",
                           tie=bool(cfg.get("tie_word_embeddings", False)))
      vision = _vision_from_hf(_require(cfg, "vision_config", source), source + ":vision_config",
                               IDEFICS3_VISION_DEFAULTS)
      out = cls(model_type=model_type, text=text, vision=vision, scale_factor=int(cfg.get("scale_factor", 2)),
                image_token_id=int(_require(cfg, "image_token_id", source)))
    elif model_type in TEXT_MODEL_TYPES:
      out = cls(model_type=model_type, text=_text_from_hf(cfg, source, tie=bool(cfg.get("tie_word_embeddings", False))))
    else:
      raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: "
                       f"{sorted(VLM_MODEL_TYPES + TEXT_MODEL_TYPES)}")
    out.validate()
    return out

  @classmethod
  def from_pretrained(cls, path: str | pathlib.Path) -> "BackboneConfig":
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
      raise FileNotFoundError(f"no config.json in {path}: expected a local Hugging Face checkpoint directory")
    try:
      cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{file}: line {e.lineno}: invalid JSON: {e.msg}") from None
    return cls.from_hf_dict(cfg, str(file))

  def to_hf_dict(self) -> dict[str, Any]:
    if self.model_type == "paligemma":
      return _paligemma_to_hf(self)
    t = self.text
    text = {
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": t.hidden_act,
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "pad_token_id": t.pad_token_id,
    }
    if self.vision is None:
      return {**text, "architectures": ["LlamaForCausalLM"]}
    v = self.vision
    arch = "SmolVLMForConditionalGeneration" if self.model_type == "smolvlm" else "Idefics3ForConditionalGeneration"
    return {
        "model_type": self.model_type,
        "architectures": [arch],
        "image_token_id": self.image_token_id,
        "scale_factor": self.scale_factor,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": text,
        "vision_config": {"model_type": f"{self.model_type}_vision", **_vision_to_hf(v)},
    }


def _require(cfg: dict, key: str, source: str):
  if key not in cfg:
    raise ValueError(f"{source}: missing key {key!r}")
  return cfg[key]


def _rope_theta(cfg: dict, source: str) -> float:
  params = cfg.get("rope_parameters") or {}
  scaling = cfg.get("rope_scaling") or {}
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only 'default' rotary embeddings)")
  theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  return float(theta)


def _text_from_hf(cfg: dict, source: str, tie: bool) -> TextConfig:
  heads = int(_require(cfg, "num_attention_heads", source))
  hidden = int(_require(cfg, "hidden_size", source))
  return TextConfig(
      vocab_size=int(_require(cfg, "vocab_size", source)),
      hidden_size=hidden,
      intermediate_size=int(_require(cfg, "intermediate_size", source)),
      num_hidden_layers=int(_require(cfg, "num_hidden_layers", source)),
      num_attention_heads=heads,
      num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or hidden // heads),
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_theta=_rope_theta(cfg, source),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      hidden_act=str(cfg.get("hidden_act", "silu")),
      attention_bias=bool(cfg.get("attention_bias", False)),
      mlp_bias=bool(cfg.get("mlp_bias", False)),
      tie_word_embeddings=tie,
      pad_token_id=cfg.get("pad_token_id"),
  )


def _vision_from_hf(cfg: dict, source: str, defaults: dict) -> VisionConfig:
  def as_int(key):
    value = cfg.get(key, defaults[key])
    if value is None:
      raise ValueError(f"{source}: missing key {key!r}")
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ValueError(f"{source}: non-square {key}={value} is not supported")
      value = value[0]
    return int(value)

  return VisionConfig(
      hidden_size=as_int("hidden_size"),
      intermediate_size=as_int("intermediate_size"),
      num_hidden_layers=as_int("num_hidden_layers"),
      num_attention_heads=as_int("num_attention_heads"),
      image_size=as_int("image_size"),
      patch_size=as_int("patch_size"),
      num_channels=as_int("num_channels"),
      layer_norm_eps=float(cfg.get("layer_norm_eps", defaults["layer_norm_eps"])),
      hidden_act=str(cfg.get("hidden_act", defaults["hidden_act"])),
  )


def _vision_to_hf(v: VisionConfig) -> dict[str, Any]:
  return {
      "hidden_size": v.hidden_size,
      "intermediate_size": v.intermediate_size,
      "num_hidden_layers": v.num_hidden_layers,
      "num_attention_heads": v.num_attention_heads,
      "image_size": v.image_size,
      "patch_size": v.patch_size,
      "num_channels": v.num_channels,
      "layer_norm_eps": v.layer_norm_eps,
      "hidden_act": v.hidden_act,
  }


# Gemma2 keys where an explicit null means "off", not "default".
_NULLABLE_GEMMA2_KEYS = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "pad_token_id")


def gemma2_layer_types(num_layers: int) -> tuple[str, ...]:
  """Gemma2Config's default pattern: sliding attention first, then alternating."""
  return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))


def _gemma2_from_hf(cfg: dict, source: str, tie: bool) -> TextConfig:
  d = {**GEMMA2_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k in _NULLABLE_GEMMA2_KEYS}}
  layers = int(d["num_hidden_layers"])
  layer_types = tuple(d.get("layer_types") or gemma2_layer_types(layers))
  optional = lambda key, kind: None if d.get(key) is None else kind(d[key])
  return TextConfig(
      vocab_size=int(d["vocab_size"]),
      hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]),
      num_hidden_layers=layers,
      num_attention_heads=int(d["num_attention_heads"]),
      num_key_value_heads=int(d["num_key_value_heads"]),
      head_dim=int(d["head_dim"]),
      rms_norm_eps=float(d["rms_norm_eps"]),
      rope_theta=_rope_theta(cfg, source),
      max_position_embeddings=int(d["max_position_embeddings"]),
      hidden_act=str(d["hidden_activation"]),
      attention_bias=bool(d["attention_bias"]),
      tie_word_embeddings=tie,
      pad_token_id=d.get("pad_token_id"),
      model_type="gemma2",
      query_pre_attn_scalar=int(d["query_pre_attn_scalar"]),
      attn_logit_softcapping=optional("attn_logit_softcapping", float),
      final_logit_softcapping=optional("final_logit_softcapping", float),
      sliding_window=optional("sliding_window", int),
      layer_types=layer_types,
  )



def _paligemma_from_hf(cfg: dict, source: str) -> BackboneConfig:
  text_cfg = _require(cfg, "text_config", source)
  if text_cfg.get("model_type") != "gemma2":
    raise ValueError(f"{source}:text_config: model_type {text_cfg.get('model_type')!r} is not supported for "
                     "paligemma; only PaliGemma 2 (a 'gemma2' decoder) is")
  tie = bool(cfg.get("tie_word_embeddings", PALIGEMMA_DEFAULTS["tie_word_embeddings"]))
  text = _gemma2_from_hf(text_cfg, source + ":text_config", tie=tie)
  vision = _vision_from_hf(_require(cfg, "vision_config", source), source + ":vision_config", SIGLIP_VISION_DEFAULTS)
  projection = int(cfg.get("projection_dim", PALIGEMMA_DEFAULTS["projection_dim"]))
  if projection != text.hidden_size:
    raise ValueError(f"{source}: projection_dim={projection} must equal text_config.hidden_size={text.hidden_size} "
                     "(image features are written into the token embeddings)")
  image_token = cfg.get("image_token_index", cfg.get("image_token_id", PALIGEMMA_DEFAULTS["image_token_index"]))
  return BackboneConfig(model_type="paligemma", text=text, vision=vision, scale_factor=1,
                        image_token_id=int(image_token))


def _paligemma_to_hf(cfg: BackboneConfig) -> dict[str, Any]:
  t, v = cfg.text, cfg.vision
  text = {
      "model_type": "gemma2",
      "vocab_size": t.vocab_size,
      "hidden_size": t.hidden_size,
      "intermediate_size": t.intermediate_size,
      "num_hidden_layers": t.num_hidden_layers,
      "num_attention_heads": t.num_attention_heads,
      "num_key_value_heads": t.num_key_value_heads,
      "head_dim": t.head_dim,
      "rms_norm_eps": t.rms_norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
      "max_position_embeddings": t.max_position_embeddings,
      "hidden_activation": t.hidden_act,
      "attention_bias": t.attention_bias,
      "query_pre_attn_scalar": t.query_pre_attn_scalar,
      "attn_logit_softcapping": t.attn_logit_softcapping,
      "final_logit_softcapping": t.final_logit_softcapping,
      "sliding_window": t.sliding_window,
      "layer_types": list(t.attention_types),
      "tie_word_embeddings": t.tie_word_embeddings,
      "pad_token_id": t.pad_token_id,
  }
  return {
      "model_type": "paligemma",
      "architectures": ["PaliGemmaForConditionalGeneration"],
      "image_token_index": cfg.image_token_id,
      "projection_dim": t.hidden_size,
      "tie_word_embeddings": t.tie_word_embeddings,
      "text_config": text,
      # PaliGemma reads SigLIP's patch features, never its pooling head.
      "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False,
                        "projection_dim": t.hidden_size, **_vision_to_hf(v)},
  }

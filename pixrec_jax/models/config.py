"""Backbone configurations, read from (and written back to) Hugging Face config.json.

Architecture fields follow the Hugging Face names of the SmolVLM family
(`Idefics3Config`, `SmolVLMConfig`: a SigLIP-style vision config and a Llama text
config). Runtime choices that are not part of a checkpoint (compute dtype,
parameter dtype, attention kernel) live in `Runtime`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

VLM_MODEL_TYPES = ("idefics3", "smolvlm")
TEXT_MODEL_TYPES = ("llama",)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a backbone runs, separate from what it is."""

  dtype: str = "float32"  # compute dtype of matmuls and activations
  param_dtype: str = "float32"  # storage dtype of parameters
  attention: str = "xla"  # "xla" (einsum, float32 softmax) or "cudnn" (fused GPU kernel)

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


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """A SmolVLM-family VLM (vision is not None) or a text-only Llama decoder."""

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
    """Language-model tokens per image tile after the pixel shuffle."""
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
    if model_type in VLM_MODEL_TYPES:
      text = _text_from_hf(_require(cfg, "text_config", source), source + ":text_config",
                           tie=bool(cfg.get("tie_word_embeddings", False)))
      vision = _vision_from_hf(_require(cfg, "vision_config", source), source + ":vision_config")
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
        "vision_config": {
            "model_type": f"{self.model_type}_vision",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act,
        },
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


def _vision_from_hf(cfg: dict, source: str) -> VisionConfig:
  def as_int(key, default=None):
    value = cfg.get(key, default)
    if value is None:
      raise ValueError(f"{source}: missing key {key!r}")
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ValueError(f"{source}: non-square {key}={value} is not supported")
      value = value[0]
    return int(value)

  return VisionConfig(
      hidden_size=as_int("hidden_size", 1152),
      intermediate_size=as_int("intermediate_size", 3072),
      num_hidden_layers=as_int("num_hidden_layers", 12),
      num_attention_heads=as_int("num_attention_heads", 16),
      image_size=as_int("image_size", 224),
      patch_size=as_int("patch_size", 32),
      num_channels=as_int("num_channels", 3),
      layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
      hidden_act=str(cfg.get("hidden_act", "gelu_pytorch_tanh")),
  )

"""Hugging Face <-> pixrec_jax weights: one name table plus transforms that work both ways.

`param_table(cfg)` lists every parameter of a backbone as (Hugging Face name, our
state path, transform). Import reads the checkpoint's safetensors through it,
export (`to_hf_tensors`, `save_pretrained`) writes through it in the other
direction, so the two cannot disagree.

The table uses the names of the checkpoints published on the Hub. Writers that
name the same tensors differently (transformers 5 saves PaliGemma's as
`vision_tower.embeddings...`, its in-memory names are `model.language_model...`)
are read through `ALIASES`, which maps their names onto the table's.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixrec_jax import sharding as shd
from pixrec_jax.convert.safetensors_io import CheckpointReader, save_file
from pixrec_jax.models import scan
from pixrec_jax.models.backbone import Backbone
from pixrec_jax.models.config import BackboneConfig, Runtime


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear stores (out, in); we store (in, out).
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T)
# torch Conv2d stores (out, in, kh, kw); we store HWIO.
CONV = Transform("conv", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_name: str
  path: tuple[str | int, ...]
  transform: Transform


def _linear(hf: str, path: tuple, bias: bool) -> list[Entry]:
  out = [Entry(f"{hf}.weight", path + ("kernel",), LINEAR)]
  if bias:
    out.append(Entry(f"{hf}.bias", path + ("bias",), IDENTITY))
  return out


def _layer_norm(hf: str, path: tuple) -> list[Entry]:
  return [Entry(f"{hf}.weight", path + ("weight",), IDENTITY), Entry(f"{hf}.bias", path + ("bias",), IDENTITY)]


def _vision_entries(cfg: BackboneConfig, hf: str) -> list[Entry]:
  root = ("vision_model",)
  emb = root + ("embeddings",)
  out = [
      Entry(f"{hf}.embeddings.patch_embedding.weight", emb + ("patch_embedding", "kernel"), CONV),
      Entry(f"{hf}.embeddings.patch_embedding.bias", emb + ("patch_embedding", "bias"), IDENTITY),
      Entry(f"{hf}.embeddings.position_embedding.weight", emb + ("position_embedding", "embedding"), IDENTITY),
  ]
  for i in range(cfg.vision.num_hidden_layers):
    h, p = f"{hf}.encoder.layers.{i}", root + ("encoder", "layers", i)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += _linear(f"{h}.self_attn.{proj}", p + ("self_attn", proj), bias=True)
    out += _linear(f"{h}.mlp.fc1", p + ("mlp", "fc1"), bias=True)
    out += _linear(f"{h}.mlp.fc2", p + ("mlp", "fc2"), bias=True)
    out += _layer_norm(f"{h}.layer_norm1", p + ("layer_norm1",))
    out += _layer_norm(f"{h}.layer_norm2", p + ("layer_norm2",))
  out += _layer_norm(f"{hf}.post_layernorm", root + ("post_layernorm",))
  return out


# Per decoder layer, the RMSNorms of each text family (Gemma2 adds a pair around the MLP).
_LAYER_NORMS = {
    "llama": ("input_layernorm", "post_attention_layernorm"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"),
}


def _text_entries(cfg: BackboneConfig, hf: str) -> list[Entry]:
  t = cfg.text
  root = ("text_model",)
  out = [Entry(f"{hf}.embed_tokens.weight", root + ("embed_tokens", "embedding"), IDENTITY)]
  for i in range(t.num_hidden_layers):
    h, p = f"{hf}.layers.{i}", root + ("layers", i)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out += _linear(f"{h}.self_attn.{proj}", p + ("self_attn", proj), bias=t.attention_bias)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      out += _linear(f"{h}.mlp.{proj}", p + ("mlp", proj), bias=t.mlp_bias)
    for norm in _LAYER_NORMS[t.model_type]:
      out.append(Entry(f"{h}.{norm}.weight", p + (norm, "weight"), IDENTITY))
  out.append(Entry(f"{hf}.norm.weight", root + ("norm", "weight"), IDENTITY))
  return out


def param_table(cfg: BackboneConfig) -> list[Entry]:
  """Every parameter of the backbone for `cfg`, with its Hugging Face name."""
  head = "lm_head.weight"
  if cfg.model_type == "paligemma":
    out = _vision_entries(cfg, "vision_tower.vision_model")
    out += _linear("multi_modal_projector.linear", ("connector", "linear"), bias=True)
    out += _text_entries(cfg, "language_model.model")
    head = "language_model.lm_head.weight"
  elif cfg.is_vlm:
    out = _vision_entries(cfg, "model.vision_model")
    out.append(Entry("model.connector.modality_projection.proj.weight",
                     ("connector", "modality_projection", "proj", "kernel"), LINEAR))
    out += _text_entries(cfg, "model.text_model")
  else:
    out = _text_entries(cfg, "model")
  if not cfg.text.tie_word_embeddings:
    out.append(Entry(head, ("lm_head", "kernel"), LINEAR))
  return out


# Other writers' names -> the table's, per model type: (pattern, replacement), first match wins.
ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    "paligemma": (
        (r"^model\.language_model\.", "language_model.model."),
        (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
        (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^lm_head\.", "language_model.lm_head."),
    ),
}

# Buffers Hugging Face may save that are recomputed here, not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Tensors a checkpoint may hold that the model never reads: SigLIP's attention-pooling
# head, saved when a PaliGemma config leaves vision_use_head at SigLIP's default.
_IGNORED_PREFIXES = {"paligemma": ("vision_tower.vision_model.head.",)}


def canonical_name(cfg: BackboneConfig, name: str) -> str:
  """A checkpoint tensor's name as `param_table` spells it."""
  for pattern, replacement in ALIASES.get(cfg.model_type, ()):
    renamed, hits = re.subn(pattern, replacement, name)
    if hits:
      return renamed
  return name


def abstract_backbone(cfg: BackboneConfig, rt: Runtime):
  """(graphdef, abstract state) without allocating any parameter."""
  abstract = nnx.eval_shape(lambda: Backbone(cfg, rt, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def _locate(state, path: tuple):
  """(Variable, layer index or None) for a table path (looped layout) in a looped or scanned state.

  In a scanned state `layers/i/...` is row i of the stacked `layers/...`.
  """
  node, index = state, None
  for i, key in enumerate(path):
    if isinstance(key, int) and path[i - 1] == scan.LAYER_AXIS and key not in node:
      index = key
      continue
    node = node[key]
  return node, index


def _stacked_path(path: tuple) -> tuple:
  """The path with layer indices dropped: the Variable a scanned model keeps them in."""
  return tuple(k for i, k in enumerate(path) if not (isinstance(k, int) and path[i - 1] == scan.LAYER_AXIS))


def load_state(reader: CheckpointReader, cfg: BackboneConfig, rt: Runtime, abstract_state,
               shardings=None) -> nnx.State:
  """Fills an abstract backbone state from checkpoint tensors, checking names and shapes."""
  table = param_table(cfg)
  expected = {e.hf_name for e in table}
  stored = {canonical_name(cfg, n): n for n in reader.keys()}
  present = set(stored)
  missing = sorted(expected - present)
  if missing:
    raise ValueError(f"{reader.directory}: checkpoint lacks {len(missing)} parameters the config needs, "
                     f"e.g. {missing[:5]}")
  tied_heads = {"lm_head.weight", "language_model.lm_head.weight"} if cfg.text.tie_word_embeddings else set()
  ignored = _IGNORED_PREFIXES.get(cfg.model_type, ())
  unexpected = sorted(n for n in present - expected
                      if not n.endswith(_IGNORED_SUFFIXES) and not n.startswith(ignored) and n not in tied_heads)
  if unexpected:
    raise ValueError(f"{reader.directory}: checkpoint has {len(unexpected)} tensors this architecture does not use, "
                     f"e.g. {unexpected[:5]}")
  dtype = rt.params_dtype

  def put(var, path, value):
    if shardings is not None:
      var.set_value(jax.device_put(value, _locate(shardings, path)[0].get_value()))
    else:
      var.set_value(jnp.asarray(value))

  # A scanned model keeps each layer's tensor as a row of one stacked Variable: reading
  # the table grouped by Variable fills one stack at a time on the host.
  stack, filled = None, 0
  for entry in sorted(table, key=lambda e: [str(k) for k in _stacked_path(e.path)]):
    var, index = _locate(abstract_state, entry.path)
    value = entry.transform.to_ours(reader.get(stored[entry.hf_name]))
    want = tuple(var.shape) if index is None else tuple(var.shape[1:])
    if tuple(value.shape) != want:
      raise ValueError(f"{reader.directory}: {entry.hf_name} has shape {tuple(value.shape)} after the "
                       f"{entry.transform.name} transform, expected {want} for {'/'.join(map(str, entry.path))}")
    value = np.asarray(value).astype(dtype)
    if index is None:
      put(var, entry.path, value)
      continue
    if stack is None:
      stack, filled = np.empty(var.shape, dtype), 0
    stack[index] = value
    filled += 1
    if filled == var.shape[0]:
      put(var, entry.path, stack)
      stack = None
  return abstract_state


def from_pretrained(path: str | pathlib.Path, runtime: Runtime = Runtime(), mesh=None) -> Backbone:
  """Loads a local Hugging Face checkpoint directory (config.json + safetensors) into a Backbone.

  With a mesh, each parameter goes straight to its sharding (no full host copy on
  device 0). torch is not needed.
  """
  path = pathlib.Path(path)
  cfg = BackboneConfig.from_pretrained(path)
  graphdef, state = abstract_backbone(cfg, runtime)
  shardings = shd.state_shardings(state, mesh) if mesh is not None else None
  state = load_state(CheckpointReader(path), cfg, runtime, state, shardings)
  return nnx.merge(graphdef, state)


def to_hf_tensors(model: Backbone) -> dict[str, np.ndarray]:
  """The backbone's parameters under their Hugging Face names and layouts (float32 numpy)."""
  state = nnx.state(model, nnx.Param)
  out = {}
  for e in param_table(model.cfg):
    var, index = _locate(state, e.path)
    value = np.asarray(var[...] if index is None else var[...][index], dtype=np.float32)
    out[e.hf_name] = np.asarray(e.transform.to_hf(value))
  return out


def save_pretrained(model: Backbone, path: str | pathlib.Path) -> pathlib.Path:
  """Writes config.json and model.safetensors (float32) that `transformers` and `from_pretrained` load."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2))
  save_file(to_hf_tensors(model), path / "model.safetensors")
  return path

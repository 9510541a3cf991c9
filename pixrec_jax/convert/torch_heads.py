"""PixRec's two towers in PyTorch, on a directory written by `python -m pixrec_jax.export`.

  model = PixRecTorch.from_pretrained(D)
  users = model.user_embedding(input_ids, attention_mask, user_mask, pixel_values=..., image_valid=...)
  items = model.item_embedding(input_ids, attention_mask, pixel_values=..., image_valid=...)
  scores = normalize(users) @ normalize(items).T  # cosine similarity, as pixrec_jax ranks

The backbone is the transformers model of D (AutoModelForImageTextToText for a
vision-language backbone, AutoModelForCausalLM for a text-only one); the heads pool
its last hidden states (in float32: the mean over a mask, or the last real token)
and project them with user_proj / item_proj. Inputs are laid out as pixrec_jax's
prompt builder makes them: right padding, image tokens in place, pixel_values
(B, N, C, H, W) with `image_valid` (B, N) marking real image slots. Weights are read
from safetensors only.
"""

from __future__ import annotations

import json
import pathlib

import safetensors.torch
import torch
import transformers

FORMAT = "pixrec_jax.export"
VERSION = 1
HEADS_FILE = "pixrec_heads.safetensors"
CONFIG_FILE = "pixrec.json"
POOLINGS = ("mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
  """(B, S, D), (B, S) -> (B, D) float32: mean over the mask's tokens, or its last token's state."""
  mask = mask.bool()
  hidden = hidden.float()
  if how == "mean":
    w = mask.float().unsqueeze(-1)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
  last = hidden.shape[1] - 1 - torch.argmax(mask.flip(1).int(), dim=1)
  return hidden[torch.arange(hidden.shape[0]), last]


def normalize(x: torch.Tensor) -> torch.Tensor:
  return torch.nn.functional.normalize(x, dim=-1)


def read_config(path: str | pathlib.Path) -> dict:
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a directory written by python -m pixrec_jax.export")
  meta = json.loads(file.read_text())
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{file}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
                     f"version {VERSION}")
  if meta.get("pooling") not in POOLINGS:
    raise ValueError(f"{file}: pooling must be one of {POOLINGS}, got {meta.get('pooling')!r}")
  return meta


class PixRecHeads(torch.nn.Module):
  """user_proj and item_proj over pooled hidden states."""

  def __init__(self, hidden_size: int, proj_dim: int, pooling: str):
    super().__init__()
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    self.pooling = pooling
    self.user_proj = torch.nn.Linear(hidden_size, proj_dim)
    self.item_proj = torch.nn.Linear(hidden_size, proj_dim)

  @classmethod
  def from_pretrained(cls, path: str | pathlib.Path) -> "PixRecHeads":
    meta = read_config(path)
    heads = cls(meta["hidden_size"], meta["proj_dim"], meta["pooling"])
    heads.load_state_dict(safetensors.torch.load_file(str(pathlib.Path(path) / HEADS_FILE)), strict=True)
    return heads.float().eval()

  def user_embedding(self, hidden_states: torch.Tensor, user_mask: torch.Tensor) -> torch.Tensor:
    return self.user_proj(pool(hidden_states, user_mask, self.pooling))

  def item_embedding(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return self.item_proj(pool(hidden_states, mask, self.pooling))


class PixRecTorch(torch.nn.Module):
  """The exported backbone and heads: user and item embeddings from token ids (and images)."""

  def __init__(self, backbone: transformers.PreTrainedModel, heads: PixRecHeads, text_only: bool):
    super().__init__()
    self.backbone = backbone
    self.heads = heads
    self.text_only = text_only

  @classmethod
  def from_pretrained(cls, path: str | pathlib.Path) -> "PixRecTorch":
    meta = read_config(path)
    auto = transformers.AutoModelForCausalLM if meta["model_type"] == "llama" else \
        transformers.AutoModelForImageTextToText
    backbone = auto.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32, trust_remote_code=False)
    return cls(backbone.eval(), PixRecHeads.from_pretrained(path), bool(meta["text_only"])).eval()

  def hidden_states(self, input_ids, attention_mask, pixel_values=None, image_valid=None) -> torch.Tensor:
    """The backbone's last hidden states (B, S, D). Image slots that `image_valid` marks
    empty are zeroed, which transformers' Idefics3 reads as padding."""
    kwargs = {}
    if pixel_values is not None and not self.text_only:
      if image_valid is not None:
        pixel_values = pixel_values * image_valid.to(pixel_values.dtype)[:, :, None, None, None]
      kwargs["pixel_values"] = pixel_values
    return self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

  def user_embedding(self, input_ids, attention_mask, user_mask, pixel_values=None, image_valid=None):
    """user_proj(v_U) of history-only prompts (as pixrec_jax's user tower)."""
    return self.heads.user_embedding(self.hidden_states(input_ids, attention_mask, pixel_values, image_valid),
                                     user_mask)

  def item_embedding(self, input_ids, attention_mask, pixel_values=None, image_valid=None):
    """item_proj(v_T) of items read alone (as pixrec_jax's item tower)."""
    return self.heads.item_embedding(self.hidden_states(input_ids, attention_mask, pixel_values, image_valid),
                                     attention_mask)

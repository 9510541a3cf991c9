"""Analytic training FLOPs of one PixRec step, device peaks, and MFU.

Counts the matmuls the train step runs (2 FLOPs per multiply-add); norms,
activations, softmax, rotary embeddings and the losses' small (B, B) similarity
matrices are left out. Per step:
  vision tower on every image row the batch carries (PixRec.encode_images),
  connector on the same rows,
  decoder on the full prompt (B, seq_len) and on the item read alone (B, item_len) (packed
  rows: R rows of seq_len, the items among them with data.pack_items),
  LM head at the K next-item positions only (B, K),
  user_proj once and item_proj twice on pooled (B, D) vectors.
Attention scores and values are counted over every (query, key) pair, as
PaLM's MFU does (no halving for the causal mask, whose zeros XLA attention in
causal blocks partly skips; see layers.attention).

Backward, by the usual rule: a weight matmul costs its forward again for the
weight gradient when that weight trains, and again for the input gradient when
any parameter before it trains (gradients must flow back through it); an
attention matmul has no weight and costs twice its forward backward when any
parameter before it trains. So frozen parts that no gradient passes through
(the vision tower under `frozen_vision`, the decoder under `heads_lm_head` with an
untied LM head) are counted forward only.

MFU divides achieved FLOP/s per device by the device's dense bf16 peak
(`PEAK_FLOPS`); on a CPU, or a card not in the table, only TFLOP/s is reported.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from pixrec_jax.data import features
from pixrec_jax.models.config import BackboneConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = {
    "h100": 989.4e12,  # H100 SXM; the PCIe card is listed separately
    "h100 pcie": 756.0e12,
    "h200": 989.4e12,
    "a100": 312.0e12,
    "tpu v5e": 197.0e12,
    "tpu v5p": 459.0e12,
    "tpu v6e": 918.0e12,
}

# jax's device_kind strings for the TPUs (the lite chips are the "e" ones).
_TPU_KINDS = {"tpu v5 lite": "tpu v5e", "tpu v5e": "tpu v5e", "tpu v5p": "tpu v5p", "tpu v5": "tpu v5p",
              "tpu v6 lite": "tpu v6e", "tpu v6e": "tpu v6e"}


def device_key(device_kind: str) -> str | None:
  """The PEAK_FLOPS key of a jax `device_kind` ("NVIDIA H100 80GB HBM3", "TPU v5 lite"), or None (CPU, unknown)."""
  kind = " ".join(device_kind.lower().split())
  if kind.startswith("tpu"):
    return _TPU_KINDS.get(kind)
  for name in ("h200", "h100", "a100"):
    if name in kind:
      return "h100 pcie" if name == "h100" and "pcie" in kind else name
  return None


def peak_flops(device_kind: str) -> float | None:
  key = device_key(device_kind)
  return None if key is None else PEAK_FLOPS[key]


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The static shapes of one global training batch."""

  batch: int  # examples
  seq_len: int  # full prompt (user + target segment)
  item_len: int  # an item read alone
  nig_tokens: int  # K: next-item positions the LM head reads per example
  images: int  # image rows the vision tower encodes per step (0: text-only)
  full_rows: int = 0  # rows of seq_len the full pass reads: packed prompts (data.pack_rows); 0: one per example
  items_packed: bool = False  # data.pack_items: the items read alone are in those rows (no item pass)
  # What a frozen tower's feature table (train.cache_image_features, data.features) gives the step in
  # place of pixels: "" none, "vision" the tower's output (the connector still runs), "connector" both's.
  cached: str = ""


def step_shapes(layout, batch: int, images: int | None = None, full_rows: int | None = None,
                items_packed: bool = False, cached: str = "") -> StepShapes:
  """StepShapes of an `examples.Layout`; `images` defaults to every image slot of the batch, `full_rows`
  to one row per example."""
  if images is None:
    images = 0 if layout.text_only else batch * layout.example_image_slots
  return StepShapes(batch=batch, seq_len=layout.seq_len, item_len=layout.item_len,
                    nig_tokens=layout.max_item_tokens, images=images, full_rows=full_rows or 0,
                    items_packed=items_packed, cached=cached)


def batch_step_shapes(layout, shapes: Mapping[str, Sequence[int]]) -> StepShapes:
  """StepShapes of one global training batch from its arrays' shapes (`layout`'s where the arrays hold the
  layout's own): a batch cut by data.length_buckets (data.buckets), packed or not."""
  b = shapes["target_item"][0]
  packed_images = "image_index" in shapes
  return StepShapes(batch=b, seq_len=shapes["full_ids"][1],
                    item_len=shapes["item_ids"][1] if "item_ids" in shapes else layout.item_len,
                    nig_tokens=shapes["nig_positions"][1],
                    images=shapes[features.rows_key(shapes)][0] if packed_images else b * layout.example_image_slots,
                    full_rows=shapes["full_ids"][0] if "full_positions" in shapes else 0,
                    items_packed="item_row" in shapes,
                    cached={features.IMAGE_FEATURES: "connector", features.VISION_FEATURES: "vision"}.get(
                        features.rows_key(shapes) if packed_images else "", ""))


# Parts in the order gradients flow back through them (first = nearest the input).
PARTS = ("vision", "connector", "embed", "decoder", "lm_head", "heads")


def trainable_parts(mode: str, *, tied_embeddings: bool, text_only: bool) -> frozenset[str]:
  """Which PARTS train under `train.trainable` (as optim.trainable_filter decides)."""
  if mode == "all":
    parts = set(PARTS) - ({"vision", "connector"} if text_only else set())
  elif mode == "frozen_vision":
    parts = set(PARTS) - {"vision"} - ({"connector"} if text_only else set())
  elif mode == "heads_lm_head":
    parts = {"heads", "embed" if tied_embeddings else "lm_head"}
  else:
    raise ValueError(f"train.trainable must be one of ('all', 'heads_lm_head', 'frozen_vision'), got {mode!r}")
  if tied_embeddings and ("embed" in parts or "lm_head" in parts):
    parts |= {"embed", "lm_head"}  # one table
  return frozenset(parts)


def _vision_forward(cfg: BackboneConfig, n: int) -> tuple[float, float, float]:
  """(patch embedding, the layers' weight matmuls, the layers' attention matmuls) for n images."""
  v = cfg.vision
  p = v.patches_per_side**2
  d = v.hidden_size
  patch = 2 * n * p * v.patch_size**2 * v.num_channels * d
  weights = v.num_hidden_layers * (4 * 2 * n * p * d * d + 2 * 2 * n * p * d * v.intermediate_size)
  attn = v.num_hidden_layers * 2 * 2 * n * p * p * d
  return patch, weights, attn


def _decoder_forward(cfg: BackboneConfig, b: int, t: int) -> tuple[float, float]:
  """(weight matmuls, attention matmuls) of the decoder on (b, t) tokens."""
  c = cfg.text
  d, hd = c.hidden_size, c.head_dim
  q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
  per_layer = 2 * b * t * (d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size)
  attn = 2 * 2 * b * c.num_attention_heads * t * t * hd
  return c.num_hidden_layers * per_layer, c.num_hidden_layers * attn


def train_flops(cfg: BackboneConfig, shapes: StepShapes, *, proj_dim: int, trainable: str = "all",
                text_only: bool = False) -> dict[str, float]:
  """FLOPs of one train step, per part (forward + backward) and in total ("total")."""
  trains = trainable_parts(trainable, tied_embeddings=cfg.text.tie_word_embeddings, text_only=text_only)
  b = shapes.batch
  out = {}
  before = False  # does any parameter before this point train?

  def weight(fwd, part):
    return fwd * (1 + (part in trains) + before)

  def attention(fwd):
    return fwd * (1 + 2 * before)

  if shapes.cached not in ("", "vision", "connector"):
    raise ValueError(f"StepShapes.cached must be '', 'vision' or 'connector', got {shapes.cached!r}")
  if shapes.cached and ("vision" in trains or (shapes.cached == "connector" and "connector" in trains)):
    raise ValueError(f"cached {shapes.cached} features with train.trainable={trainable!r}: the cached part trains")
  if not text_only and shapes.images:
    if not shapes.cached:  # a feature table gives the step the tower's output (and the connector's)
      patch, w, a = _vision_forward(cfg, shapes.images)
      out["vision"] = weight(patch, "vision")
      before = before or "vision" in trains
      out["vision"] += weight(w, "vision") + attention(a)
    v = cfg.vision
    if shapes.cached != "connector":
      out["connector"] = weight(2 * shapes.images * v.patches_per_side**2 * v.hidden_size * cfg.text.hidden_size,
                                "connector")
      before = before or "connector" in trains
  before = before or "embed" in trains
  fw, fa = _decoder_forward(cfg, shapes.full_rows or b, shapes.seq_len)
  iw, ia = (0.0, 0.0) if shapes.items_packed else _decoder_forward(cfg, b, shapes.item_len)
  # Strictly, the first layer's q/k/v input gradient needs a trained part before the decoder; in every
  # train.trainable mode the decoder trains only together with the embeddings, so this is exact.
  before = before or "decoder" in trains
  out["decoder_full"] = weight(fw, "decoder") + attention(fa)
  out["decoder_item"] = weight(iw, "decoder") + attention(ia)
  # The LM head and the projection heads both read the decoder's output, side by side.
  out["lm_head"] = weight(2 * b * shapes.nig_tokens * cfg.text.hidden_size * cfg.text.vocab_size, "lm_head")
  out["heads"] = weight(3 * 2 * b * cfg.text.hidden_size * proj_dim, "heads")
  out["total"] = sum(out.values())
  return {k: float(v) for k, v in out.items()}


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, device_kind: str) -> dict:
  """{"tflops_per_device", "mfu"} of a measured step time; mfu is None where the peak is unknown."""
  achieved = flops_per_step / seconds_per_step / num_devices
  peak = peak_flops(device_kind)
  return {"tflops_per_device": achieved / 1e12, "mfu": None if peak is None else achieved / peak}

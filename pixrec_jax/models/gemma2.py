"""The Gemma2 decoder of PaliGemma 2 (HF `Gemma2Model`).

What sets it apart from Llama: token embeddings scaled by sqrt(hidden_size);
RMSNorms that scale by (1 + weight) in float32, around both the attention and
the MLP (pre and post); a GeGLU MLP (tanh-approximated GELU gate); attention
scaled by query_pre_attn_scalar**-0.5 with tanh soft-capped logits; and layers
that alternate between a sliding window and global attention.

PaliGemma lets a prefix (the image and the prompt, token_type_ids == 0) attend
bidirectionally within itself; the rest stays causal. Hugging Face applies the
prefix on top of both the causal and the sliding-window mask, so prefix tokens
see the whole prefix whatever the window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixrec_jax import sharding
from pixrec_jax.models import layers, scan
from pixrec_jax.models.config import Runtime, TextConfig
from pixrec_jax.models.llama import MLP, Attention, cached_mask, init_cache, run_cached


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    norm = dict(param_dtype=rt.params_dtype, rngs=rngs)
    d, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.input_layernorm = layers.GemmaRMSNorm(d, eps, **norm)
    self.self_attn = Attention(cfg, rt, rngs)
    self.post_attention_layernorm = layers.GemmaRMSNorm(d, eps, **norm)
    self.pre_feedforward_layernorm = layers.GemmaRMSNorm(d, eps, **norm)
    self.mlp = MLP(cfg, rt, rngs)
    self.post_feedforward_layernorm = layers.GemmaRMSNorm(d, eps, **norm)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, inv_freq: jax.Array, cache=None,
               cache_index: jax.Array | int = 0, causal: bool = False):
    """Returns x, or (x, cache) when given a cache (see `llama.Attention`)."""
    attn = self.self_attn(self.input_layernorm(x), mask, positions, inv_freq, cache, cache_index, causal)
    if cache is not None:
      attn, cache = attn
    x = x + self.post_attention_layernorm(attn)
    x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    x = sharding.constrain(x, ("batch", "length", None))
    return x if cache is None else (x, cache)


def attention_masks(attention_mask: jax.Array | None, token_type_ids: jax.Array | None, batch: int, length: int,
                    sliding_window: int | None) -> dict[str, jax.Array]:
  """{"full_attention", "sliding_attention"}: (B, 1, T, T) boolean masks, True where a query may attend.

  Causal (and, for sliding layers, at most sliding_window - 1 keys back), or both
  in the prefix (token_type_ids == 0); padded keys (attention_mask == 0) excluded. attention_mask may
  hold segment ids 1, 2, .. (packed rows, data.pack_rows): a token then sees its own segment only.
  """
  q = jnp.arange(length)[:, None]
  k = jnp.arange(length)[None, :]
  causal = k <= q
  masks = {"full_attention": causal[None]}
  if sliding_window is not None:
    masks["sliding_attention"] = (causal & (k > q - sliding_window))[None]
  if token_type_ids is not None:
    prefix = token_type_ids == 0
    both_prefix = prefix[:, :, None] & prefix[:, None, :]
    masks = {name: m | both_prefix for name, m in masks.items()}
  if attention_mask is not None:  # padded keys out; with segment ids (packed rows), other segments too
    keys = layers.segment_mask(attention_mask)[:, 0]
    masks = {name: m & keys for name, m in masks.items()}
  return {name: jnp.broadcast_to(m, (batch, length, length))[:, None] for name, m in masks.items()}


class Gemma2Model(nnx.Module):
  """Scaled embeddings -> decoder layers -> final norm. Returns the last hidden states."""

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = rt.compute_dtype
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=rt.compute_dtype,
                                     param_dtype=rt.params_dtype, scale=cfg.hidden_size**0.5, rngs=rngs)
    self.scan_layers = rt.scan_layers
    self.remat = rt.remat
    self.layers = scan.layer_stack(lambda: DecoderLayer(cfg, rt, rngs), cfg.num_hidden_layers, rt.scan_layers)
    self.norm = layers.GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=rt.params_dtype, rngs=rngs)

  def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
    return init_cache(self.cfg, self.dtype, batch, length)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, token_type_ids: jax.Array | None = None,
               cache: dict[str, jax.Array] | None = None, cache_index: jax.Array | int = 0):
    """With `cache`, as `LlamaModel`: causal decoding (no bidirectional prefix), sliding layers
    limited to sliding_window slots back; returns (hidden, cache)."""
    b, t, _ = inputs_embeds.shape
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    inv_freq = layers.rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
    x = sharding.constrain(inputs_embeds.astype(self.dtype), ("batch", "length", None))
    if cache is not None:
      if token_type_ids is not None:
        raise ValueError("cached decoding is causal: token_type_ids (a bidirectional prefix) is not supported")
      full = cached_mask(attention_mask, cache_index, t)
      window = cached_mask(attention_mask, cache_index, t, self.cfg.sliding_window)
      if self.scan_layers:
        xs = jnp.asarray([kind == "sliding_attention" for kind in self.cfg.attention_types])
        pick = lambda is_sliding: jnp.where(is_sliding, window, full)
      else:
        xs = self.cfg.attention_types
        pick = lambda kind: window if kind == "sliding_attention" else full
      call = lambda layer, x, kv, kind: layer(x, pick(kind), position_ids, inv_freq, kv, cache_index)
      x, cache = run_cached(self.layers, self.scan_layers, x, cache, call, xs)
      return self.norm(x), cache
    masks = attention_masks(attention_mask, token_type_ids, b, t, self.cfg.sliding_window)
    causal = token_type_ids is None  # a bidirectional prefix lets queries see later keys
    if self.scan_layers:
      # One traced layer serves both kinds: each layer's flag picks its mask.
      sliding = jnp.asarray([kind == "sliding_attention" for kind in self.cfg.attention_types])
      full, window = masks["full_attention"], masks.get("sliding_attention", masks["full_attention"])
      call = lambda layer, x, is_sliding: layer(x, jnp.where(is_sliding, window, full), position_ids, inv_freq,
                                                causal=causal)
      x = scan.scan(self.layers, x, call, xs=sliding, remat_name=self.remat)
    else:
      call = scan.remat(lambda layer, x, mask: layer(x, mask, position_ids, inv_freq, causal=causal), self.remat)
      for layer, kind in zip(self.layers, self.cfg.attention_types):
        x = call(layer, x, masks[kind])
    return self.norm(x)

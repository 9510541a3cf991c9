"""The Llama decoder of SmolLM2 (HF `LlamaModel`): RMSNorm, rotary embeddings,
grouped-query attention and a SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixrec_jax import sharding
from pixrec_jax.models import layers, scan
from pixrec_jax.models.config import Runtime, TextConfig


class Attention(nnx.Module):
  """Rotary grouped-query attention; Gemma2 reuses it with its own scale and logit soft-capping."""

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim)**-0.5
    self.softcap = cfg.attn_logit_softcapping
    self.implementation = rt.attention
    self.causal_blocks = rt.causal_blocks
    kw = dict(use_bias=cfg.attention_bias, dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)
    d, h = cfg.hidden_size, cfg.head_dim
    self.q_proj = layers.Linear(d, self.num_heads * h, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, self.num_kv_heads * h, axes=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Linear(d, self.num_kv_heads * h, axes=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Linear(self.num_heads * h, d, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | int = 0,
               causal: bool = False):
    """With `cache` (keys, values: (B, S, K, H)), x's keys and values are written at slot
    cache_index, the queries attend over all S slots (as `mask` allows), and (out, cache) is returned.
    `causal`: the caller's word that `mask` is causal, which lets attention skip masked key blocks."""
    b, t, _ = x.shape
    q, k, v = layers.side_by_side(x, (self.q_proj, self.k_proj, self.v_proj))
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, axis=1)
    blocks = self.causal_blocks if causal and cache is None else 1
    out = layers.attention(q, k, v, mask, self.scale, self.implementation, self.softcap, blocks)
    out = self.o_proj(out.reshape(b, t, -1))
    return out if cache is None else (out, (k, v))


class MLP(nnx.Module):

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)
    self.act = layers.activation(cfg.hidden_act)
    self.gate_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = layers.side_by_side(x, (self.gate_proj, self.up_proj))
    return self.down_proj(self.act(gate) * up)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    norm = dict(param_dtype=rt.params_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.self_attn = Attention(cfg, rt, rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.mlp = MLP(cfg, rt, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, inv_freq: jax.Array, cache=None,
               cache_index: jax.Array | int = 0, causal: bool = False):
    """Returns x, or (x, cache) when given a cache (see `Attention`)."""
    attn = self.self_attn(self.input_layernorm(x), mask, positions, inv_freq, cache, cache_index, causal)
    if cache is not None:
      attn, cache = attn
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    x = sharding.constrain(x, ("batch", "length", None))
    return x if cache is None else (x, cache)


def causal_mask(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
  """(B, 1, T, T) boolean: causal, and padded keys (attention_mask == 0) excluded. Packed rows
  (data.pack_rows) give segment ids 1, 2, .. as attention_mask: a token then sees its own segment only."""
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  if attention_mask is None:
    return jnp.broadcast_to(causal, (batch, 1, length, length))
  return causal & layers.segment_mask(attention_mask)


def init_cache(cfg: TextConfig, dtype, batch: int, length: int) -> dict[str, jax.Array]:
  """Zero keys and values for cached decoding, {"k", "v"}: (layers, batch, length, kv_heads, head_dim) each.

  Stacked by layer in both layouts: a scanned stack scans over them with its layers, a looped
  one indexes them.
  """
  shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_mask(key_valid: jax.Array, cache_index: jax.Array | int, length: int,
                sliding_window: int | None = None) -> jax.Array:
  """(B, 1, T, S) boolean for T queries at cache slots cache_index.. over all S slots: causal by slot
  (and at most sliding_window - 1 slots back), and only keys that key_valid (B, S) marks."""
  q = cache_index + jnp.arange(length)[:, None]
  k = jnp.arange(key_valid.shape[1])[None, :]
  allowed = k <= q
  if sliding_window is not None:
    allowed = allowed & (k > q - sliding_window)
  return allowed[None, None] & key_valid.astype(bool)[:, None, None, :]


def run_cached(stack, scanned: bool, x: jax.Array, cache: dict[str, jax.Array], call, xs=None):
  """x through every layer with its slice of the cache, x, (k, v) = call(layer, x, (k, v), xs[i]);
  returns x and the updated cache, stacked as `init_cache` makes it."""
  if scanned:
    graphdef, state = nnx.split(stack)

    def body(x, inputs):
      layer_state, k, v, layer_xs = inputs
      return call(nnx.merge(graphdef, layer_state), x, (k, v), layer_xs)

    x, (k, v) = jax.lax.scan(body, x, (state, cache["k"], cache["v"], xs))
    return x, {"k": k, "v": v}
  ks, vs = [], []
  for i, layer in enumerate(stack):
    x, (k, v) = call(layer, x, (cache["k"][i], cache["v"][i]), None if xs is None else xs[i])
    ks.append(k)
    vs.append(v)
  return x, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


class LlamaModel(nnx.Module):
  """Embeddings -> decoder layers (looped or scanned, see `Runtime`) -> final norm. Returns the last hidden states."""

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = rt.compute_dtype
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=rt.compute_dtype,
                                     param_dtype=rt.params_dtype, rngs=rngs)
    self.scan_layers = rt.scan_layers
    self.remat = rt.remat
    self.layers = scan.layer_stack(lambda: DecoderLayer(cfg, rt, rngs), cfg.num_hidden_layers, rt.scan_layers)
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=rt.params_dtype, rngs=rngs)

  def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
    return init_cache(self.cfg, self.dtype, batch, length)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
               cache_index: jax.Array | int = 0):
    """With `cache` (from `init_cache`), attention_mask marks the valid slots of the whole cache
    (B, S), the inputs go to slots cache_index.., and (hidden, cache) is returned."""
    b, t, _ = inputs_embeds.shape
    if position_ids is None:
      # Hugging Face's default: 0..T-1 whatever the padding.
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    inv_freq = layers.rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
    x = sharding.constrain(inputs_embeds.astype(self.dtype), ("batch", "length", None))
    if cache is not None:
      mask = cached_mask(attention_mask, cache_index, t)
      call = lambda layer, x, kv, _: layer(x, mask, position_ids, inv_freq, kv, cache_index)
      x, cache = run_cached(self.layers, self.scan_layers, x, cache, call)
      return self.norm(x), cache
    mask = causal_mask(attention_mask, b, t)
    call = lambda layer, x, _: layer(x, mask, position_ids, inv_freq, causal=True)
    if self.scan_layers:
      x = scan.scan(self.layers, x, call, remat_name=self.remat)
    else:
      call = scan.remat(call, self.remat)
      for layer in self.layers:
        x = call(layer, x, None)
    return self.norm(x)

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
    kw = dict(use_bias=cfg.attention_bias, dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)
    d, h = cfg.hidden_size, cfg.head_dim
    self.q_proj = layers.Linear(d, self.num_heads * h, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Linear(d, self.num_kv_heads * h, axes=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Linear(d, self.num_kv_heads * h, axes=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Linear(self.num_heads * h, d, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = layers.apply_rope(q, positions, inv_freq)
    k = layers.apply_rope(k, positions, inv_freq)
    out = layers.attention(q, k, v, mask, self.scale, self.implementation, self.softcap)
    return self.o_proj(out.reshape(b, t, -1))


class MLP(nnx.Module):

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.mlp_bias, dtype=rt.compute_dtype, param_dtype=rt.params_dtype, rngs=rngs)
    self.act = layers.activation(cfg.hidden_act)
    self.gate_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    norm = dict(param_dtype=rt.params_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.self_attn = Attention(cfg, rt, rngs)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
    self.mlp = MLP(cfg, rt, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), mask, positions, inv_freq)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", "length", None))


def causal_mask(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
  """(B, 1, T, T) boolean: causal, and padded keys (attention_mask == 0) excluded."""
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
  if attention_mask is None:
    return jnp.broadcast_to(causal, (batch, 1, length, length))
  return causal & attention_mask.astype(bool)[:, None, None, :]


class LlamaModel(nnx.Module):
  """Embeddings -> decoder layers (looped or scanned, see `Runtime`) -> final norm. Returns the last hidden states."""

  def __init__(self, cfg: TextConfig, rt: Runtime, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = rt.compute_dtype
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=rt.compute_dtype,
                                     param_dtype=rt.params_dtype, rngs=rngs)
    self.scan_layers = rt.scan_layers
    self.remat = rt.remat
    make = lambda: DecoderLayer(cfg, rt, rngs)
    if rt.scan_layers:
      self.layers = scan.stack(make, cfg.num_hidden_layers)
    else:
      self.layers = nnx.List([make() for _ in range(cfg.num_hidden_layers)])
    self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=rt.params_dtype, rngs=rngs)

  def __call__(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    b, t, _ = inputs_embeds.shape
    if position_ids is None:
      # Hugging Face's default: 0..T-1 whatever the padding.
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    mask = causal_mask(attention_mask, b, t)
    inv_freq = layers.rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)
    x = sharding.constrain(inputs_embeds.astype(self.dtype), ("batch", "length", None))
    call = lambda layer, x, _: layer(x, mask, position_ids, inv_freq)
    if self.scan_layers:
      x = scan.scan(self.layers, x, call, remat_name=self.remat)
    else:
      call = scan.remat(call, self.remat)
      for layer in self.layers:
        x = call(layer, x, None)
    return self.norm(x)

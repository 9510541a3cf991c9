"""Beam search over the backbone's language model: jitted, static shapes, a KV cache.

The search is transformers' `_beam_search` (5.24) step for step, vectorised the
same way: at each step the top 2 * num_beams (more with several EOS tokens)
continuations of all beams are kept, the best num_beams unfinished ones run on,
and those that just finished (an EOS, or the last new token) among the top
num_beams join the finished set when their score, sum of log-probabilities /
new_length ** length_penalty, beats its worst. `early_stopping` (False, True or
"never") stops the loop as transformers does. Logits are turned into
log-probabilities first and the repetition penalty is applied to those (as
transformers' logits processors see them): a token already in the prompt or the
beam has its log-probability multiplied by the penalty. With `do_sample` the
log-probabilities are divided by the temperature and the K continuations are
drawn without replacement (Gumbel top-k, from `seed`): random by design, so off
by default.

Prompts arrive right-padded, as evaluation builds them; they are moved to the
right end of the prompt window (left padding) so that every row's new tokens
share one cache slot per step. Positions count real tokens only (from 1 for
PaliGemma, as its forward pass does), so a prompt reads the same as unpadded.

Two ways to run the model, with the same results: `use_cache=True` prefills the
prompt once and then feeds one token per step against a cache of keys and values
(one (rows, prompt + new tokens, kv_heads, head_dim) pair per decoder layer,
written in place with `lax.dynamic_update_slice`, reordered with the beams);
`use_cache=False` recomputes the whole window at every step (the reference the
cache is tested against).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG = -1.0e9  # transformers' "impossible" score, kept so that scores match it bit for bit


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """Beam search settings; hashable (a static argument of the jitted search)."""

  num_beams: int = 8
  max_new_tokens: int = 50
  repetition_penalty: float = 1.2
  length_penalty: float = 1.0
  early_stopping: bool | str = False  # transformers' meaning: False, True or "never"
  do_sample: bool = False
  temperature: float = 1.0
  seed: int = 0
  use_cache: bool = True

  def validate(self) -> "GenerationSettings":
    if self.num_beams < 1:
      raise ValueError(f"eval.generative.num_beams must be >= 1, got {self.num_beams}")
    if self.max_new_tokens < 1:
      raise ValueError(f"eval.generative.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.repetition_penalty <= 0:
      raise ValueError(f"eval.generative.repetition_penalty must be > 0, got {self.repetition_penalty}")
    if self.do_sample and self.temperature <= 0:
      raise ValueError(f"eval.generative.temperature must be > 0 when sampling, got {self.temperature}")
    if self.early_stopping not in (False, True, "never"):
      raise ValueError(f"eval.generative.early_stopping must be False, True or 'never', got {self.early_stopping!r}")
    return self


class Beams(NamedTuple):
  """The num_beams best finished sequences of each prompt, best first."""

  tokens: np.ndarray  # (B, num_beams, max_new_tokens) int32; after an EOS, pad
  scores: np.ndarray  # (B, num_beams) float32: sum of log-probabilities / length ** length_penalty
  lengths: np.ndarray  # (B, num_beams) int32: new tokens, the EOS included


# -- the model, two ways --------------------------------------------------------


def _positions(valid: jax.Array, offset: int) -> jax.Array:
  return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32) + offset


class _Recompute:
  """No cache: every step runs the whole window (prompt and new tokens so far) again."""

  def __init__(self, backbone):
    self.backbone = backbone

  def _last(self, state, slot):
    embeds, valid, positions = state
    hidden = self.backbone.hidden_states(embeds, valid, positions)
    return self.backbone.logits(jax.lax.dynamic_index_in_dim(hidden, slot, axis=1, keepdims=False))

  def prefill(self, embeds, valid, positions, total):
    n, p, d = embeds.shape
    pad = total - p
    state = (jnp.concatenate([embeds, jnp.zeros((n, pad, d), embeds.dtype)], axis=1),
             jnp.concatenate([valid, jnp.zeros((n, pad), bool)], axis=1),
             jnp.concatenate([positions, jnp.zeros((n, pad), jnp.int32)], axis=1))
    return self._last(state, p - 1), state

  def step(self, state, tokens, positions, slot):
    embeds, valid, pos = state
    new = self.backbone.embed(tokens[:, None])
    state = (jax.lax.dynamic_update_slice_in_dim(embeds, new.astype(embeds.dtype), slot, axis=1),
             jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((tokens.shape[0], 1), bool), slot, axis=1),
             jax.lax.dynamic_update_slice_in_dim(pos, positions[:, None], slot, axis=1))
    return self._last(state, slot), state

  def reorder(self, state, rows):
    return jax.tree.map(lambda x: x[rows], state)

  def expand(self, state, n):
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), state)


class _Cached:
  """Prefill once, then one token per step against the decoder's key/value cache."""

  def __init__(self, backbone):
    self.backbone = backbone
    self.text_model = backbone.text_model

  def prefill(self, embeds, valid, positions, total):
    n, p, _ = embeds.shape
    cache = self.text_model.init_cache(n, total)
    keys = jnp.concatenate([valid, jnp.zeros((n, total - p), bool)], axis=1)
    hidden, cache = self.text_model(embeds, keys, positions, cache=cache, cache_index=0)
    return self.backbone.logits(hidden[:, -1]), (cache, keys)

  def step(self, state, tokens, positions, slot):
    cache, keys = state
    keys = jax.lax.dynamic_update_slice_in_dim(keys, jnp.ones((tokens.shape[0], 1), bool), slot, axis=1)
    hidden, cache = self.text_model(self.backbone.embed(tokens[:, None]), keys, positions[:, None], cache=cache,
                                    cache_index=slot)
    return self.backbone.logits(hidden[:, 0]), (cache, keys)

  def reorder(self, state, rows):
    cache, keys = state  # the cache is stacked by layer: rows are its axis 1
    return jax.tree.map(lambda x: x[:, rows], cache), keys[rows]

  def expand(self, state, n):
    cache, keys = state
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=1), cache), jnp.repeat(keys, n, axis=0)


# -- the search ------------------------------------------------------------------


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x (B, M, ...) rows idx (B, K) -> (B, K, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _repetition_penalty(log_probs: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """transformers' RepetitionPenaltyLogitsProcessor on log-probabilities; seen (N, L) token ids,
  out of range (>= V) where there is no token."""
  if penalty == 1.0:
    return log_probs
  rows = jnp.arange(log_probs.shape[0])[:, None]
  score = jnp.take_along_axis(log_probs, jnp.minimum(seen, log_probs.shape[1] - 1), axis=1)
  score = jnp.where(score < 0, score * penalty, score / penalty)
  return log_probs.at[rows, seen].set(score, mode="drop")


def beam_search(backbone, embeds: jax.Array, mask: jax.Array, ids: jax.Array, settings: GenerationSettings,
                eos_ids: Sequence[int], pad_id: int, key: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """Beam search from right-padded prompts (embeds (B, P, D), mask (B, P), ids (B, P)); traceable.

  Returns (tokens (B, nb, T), scores (B, nb), lengths (B, nb)), T = max_new_tokens.
  """
  s = settings
  b, p, _ = embeds.shape
  nb, t_max = s.num_beams, s.max_new_tokens
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  keep = max(2, 1 + len(eos_ids)) * nb
  vocab = backbone.cfg.text.vocab_size
  offset = 1 if backbone.cfg.model_type == "paligemma" else 0

  # Left-align: the real tokens end at slot P - 1 in every row.
  lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
  src = (jnp.arange(p)[None, :] - (p - lengths)[:, None]) % p
  embeds = jnp.take_along_axis(embeds, src[..., None], axis=1)
  valid = jnp.arange(p)[None, :] >= (p - lengths)[:, None]
  prompt_ids = jnp.where(valid, jnp.take_along_axis(ids, src, axis=1), vocab)  # vocab: no token
  positions = _positions(valid, offset)

  def beams(x):  # (B, ...) -> (B * nb, ...), each row's beams together
    return jnp.repeat(x, nb, axis=0)

  # The prompt is read once per row, then copied to its beams (which all start from it).
  model = _Cached(backbone) if s.use_cache else _Recompute(backbone)
  logits, state = model.prefill(embeds, valid, positions, p + t_max)
  logits, state = beams(logits), model.expand(state, nb)
  prompt_ids = beams(prompt_ids)
  last_position = beams(positions[:, -1])

  running = jnp.full((b, nb, t_max), pad_id, jnp.int32)
  running_scores = jnp.where(jnp.arange(nb) == 0, 0.0, NEG)[None].repeat(b, 0).astype(jnp.float32)
  carry = dict(
      t=jnp.int32(0), logits=logits, state=state, running=running, running_scores=running_scores,
      finished=jnp.full((b, nb, t_max), pad_id, jnp.int32), scores=jnp.full((b, nb), NEG, jnp.float32),
      lengths=jnp.zeros((b, nb), jnp.int32), done=jnp.zeros((b, nb), bool), improvable=jnp.ones((b, 1), bool),
      go=jnp.bool_(True), key=jax.random.key(s.seed) if key is None else key)
  top_nb = jnp.arange(keep) < nb

  def body(c):
    t = c["t"]
    log_probs = jax.nn.log_softmax(c["logits"].astype(jnp.float32), axis=-1)
    generated = jnp.where(jnp.arange(t_max)[None] < t, c["running"].reshape(b * nb, t_max), vocab)
    log_probs = _repetition_penalty(log_probs, jnp.concatenate([prompt_ids, generated], axis=1),
                                    s.repetition_penalty)
    if s.do_sample:
      log_probs = log_probs / s.temperature
    acc = (log_probs.reshape(b, nb, vocab) + c["running_scores"][:, :, None]).reshape(b, nb * vocab)
    key, sub = jax.random.split(c["key"])
    if s.do_sample:
      _, idx = jax.lax.top_k(acc + jax.random.gumbel(sub, acc.shape), keep)
      top_lp = jnp.take_along_axis(acc, idx, axis=1)
      top_lp, order = jax.lax.top_k(top_lp, keep)
      idx = jnp.take_along_axis(idx, order, axis=1)
    else:
      top_lp, idx = jax.lax.top_k(acc, keep)
    parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
    top_seqs = _gather(c["running"], parent)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[..., None], t, axis=2)
    hits = (t + 1 >= t_max) | jnp.any(token[..., None] == eos, axis=-1)

    # The best unfinished continuations run on.
    run_lp = top_lp + hits.astype(jnp.float32) * NEG
    _, nxt = jax.lax.top_k(run_lp, nb)
    running = _gather(top_seqs, nxt)
    running_scores = _gather(run_lp, nxt)
    rows = (_gather(parent, nxt) + jnp.arange(b)[:, None] * nb).reshape(-1)

    # The top num_beams that just finished join the finished set if they beat it.
    just = hits & top_nb[None]
    fin_lp = top_lp / ((t + 1).astype(jnp.float32)**s.length_penalty)
    full = jnp.all(c["done"], axis=-1, keepdims=True) & (s.early_stopping is True)
    fin_lp = fin_lp + full.astype(jnp.float32) * NEG
    fin_lp = fin_lp + (~c["improvable"]).astype(jnp.float32) * NEG
    fin_lp = fin_lp + (~just).astype(jnp.float32) * NEG
    merged = jnp.concatenate([c["scores"], fin_lp], axis=1)
    _, best = jax.lax.top_k(merged, nb)
    finished = _gather(jnp.concatenate([c["finished"], top_seqs], axis=1), best)
    scores = _gather(merged, best)
    lengths = _gather(jnp.concatenate([c["lengths"], jnp.full((b, keep), t + 1, jnp.int32)], axis=1), best)
    done = _gather(jnp.concatenate([c["done"], just], axis=1), best)

    t = t + 1
    if s.early_stopping == "never" and s.length_penalty > 0.0:
      best_len = jnp.float32(t_max)
    else:
      best_len = t.astype(jnp.float32)
    best_possible = running_scores[:, :1] / (best_len**s.length_penalty)
    worst = jnp.where(done, jnp.min(scores, axis=1, keepdims=True), NEG)
    improvable = c["improvable"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
    go = jnp.any(improvable) & ~(jnp.all(done) & (s.early_stopping is True)) & ~jnp.all(hits)

    # The next token of every running beam, in its parent's cache rows.
    state = model.reorder(c["state"], rows)
    positions = last_position + t
    token = jnp.take(running.reshape(b * nb, t_max), t - 1, axis=1)
    logits, state = model.step(state, token, positions, p + t - 1)
    return dict(t=t, logits=logits, state=state, running=running, running_scores=running_scores, finished=finished,
                scores=scores, lengths=lengths, done=done, improvable=improvable, go=go, key=key)

  out = jax.lax.while_loop(lambda c: c["go"] & (c["t"] < t_max), body, carry)
  return out["finished"], out["scores"], out["lengths"]


def prompt_embeds(model, ids: jax.Array, images: jax.Array | None = None,
                  image_valid: jax.Array | None = None, cached: dict | None = None) -> jax.Array:
  """Token embeddings of prompts, image features in place of their image tokens. `model` is a
  PixRec (images (B, M, C, H, W) by slot, or `cached`: a frozen tower's rows by slot,
  {"user_image_features" or "user_vision_features": (B, M, ...)}, data.features) or a bare Backbone
  (no images)."""
  backbone = getattr(model, "backbone", model)
  if images is None and not cached:
    return backbone.embed(ids)
  feats = model.cached_slot_features(cached, "user") if cached else model.encode_images(images)
  n = feats.shape[0] * feats.shape[1]
  return backbone.embed(ids, feats.reshape((n,) + feats.shape[2:]), image_valid.reshape(n))


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "eos_ids", "pad_id"))
def _search(graphdef, states, ids, mask, images, image_valid, cached, key, settings, eos_ids, pad_id):
  model = nnx.merge(graphdef, *states)
  embeds = prompt_embeds(model, ids, images, image_valid, cached)
  return beam_search(getattr(model, "backbone", model), embeds, mask, ids, settings, eos_ids, pad_id, key)


def generate(model_or_split: Any, ids: np.ndarray, mask: np.ndarray, settings: GenerationSettings,
             eos_ids: Sequence[int], pad_id: int, images: np.ndarray | None = None,
             image_valid: np.ndarray | None = None, key: jax.Array | None = None,
             cached: dict | None = None) -> Beams:
  """Beam search from a batch of right-padded prompts (ids, mask: (B, P)); one compilation per
  model structure, batch shape and settings. `model_or_split`: an nnx module (PixRec or
  Backbone), or (graphdef, states) as nnx.split gives them."""
  if isinstance(model_or_split, nnx.Module):
    graphdef, *states = nnx.split(model_or_split)
  else:
    graphdef, states = model_or_split
  mask = np.asarray(mask)
  if not np.all(mask.sum(axis=1) > 0):
    raise ValueError("generate: every prompt needs at least one token (a row of the mask is all zero)")
  if key is None:
    key = jax.random.key(settings.seed)
  static = dataclasses.replace(settings.validate(), seed=0)  # the seed travels in `key`: no recompilation
  tokens, scores, lengths = jax.device_get(
      _search(graphdef, tuple(states), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), images,
              image_valid, cached or None, key, static, tuple(int(e) for e in eos_ids), int(pad_id)))
  return Beams(np.asarray(tokens), np.asarray(scores), np.asarray(lengths))

"""Optimiser and the choice of which parameters train."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pixrec_jax.models import layers
from pixrec_jax.models import lora as lora_lib
from pixrec_jax.models.lora import LoRAParam

TRAINABLE = ("all", "heads_lm_head", "frozen_vision")


def schedule(lr: float, steps: int, warmup_steps: int, end_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to lr * end_factor at `steps`."""
  warmup = min(max(warmup_steps, 0), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
                                            decay_steps=max(steps, warmup + 1), end_value=lr * end_factor)


def _decays(path: tuple, _) -> bool:
  """Weight decay on matrices only: not on norms, biases or embedding-like tables."""
  return path[-1] == "kernel"


def global_norm(tree) -> jax.Array:
  """The global L2 norm of a tree of arrays, as optax.tree.norm (float32; equal to rounding).

  On CPU each leaf's sum of squares runs as halves added elementwise, in rows of 128, until at most 8 rows
  remain, then one short sum: XLA:CPU (under our compiler options, `pixrec_jax/xla_options.py`) writes
  the squares to memory and reduces them in windows of 32 far below memory speed, where the halves are
  elementwise passes that read each gradient once (BENCHMARKS.md, "Sums in halves on the CPU"). Other
  platforms, and meshes of several devices (whose shards the halves would slice across: the same choice
  as the model's sums, `layers.halved_sums`), take optax's form."""
  if not layers.halved_sums():
    return optax.tree.norm(tree)
  return jnp.sqrt(sum((_sum_of_squares(x) for x in jax.tree.leaves(tree)), jnp.float32(0)))


def _sum_of_squares(x: jax.Array) -> jax.Array:
  x = jnp.ravel(x).astype(jnp.float32)
  x = x * x
  return jnp.sum(layers.fold_halves(x.reshape(-1, 128) if x.size % 128 == 0 else x, 0, 8, jnp.add))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (the same state; the same result, to a rounding where it clips) that takes
  the gradient's global norm from the caller when given one (`update(..., grad_norm=...)`), instead of
  computing it again.

  The trainer computes that norm anyway (its non-finite check and the logged grad_norm), and computes it
  outside the `lax.cond` that applies the update (Trainer._update), where XLA could not share it with
  optax's copy inside: a second pass over every gradient (smolvlm_256m: a gigabyte)."""
  inner = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    if grad_norm is None:
      grad_norm = global_norm(updates)
    # One scalar factor (1 below the threshold: the gradient unchanged, bit for bit), and a multiply by it,
    # which XLA fuses into each of the optimiser's passes over the gradient. optax's per-element division,
    # (t / norm) * max_norm, is an expensive op to XLA, which then writes the whole clipped gradient and
    # reads it back: smolvlm_256m's update 536 / 528 -> 453 / 456 ms on the CPU (BENCHMARKS.md, "Sums in
    # halves on the CPU"). Above the threshold the result is optax's to a rounding.
    factor = jnp.where(jnp.squeeze(grad_norm < max_norm), 1.0, max_norm / jnp.squeeze(grad_norm))
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def optimizer(*, lr: float, steps: int, warmup_steps: int, weight_decay: float, clip_norm: float,
              b1: float = 0.9, b2: float = 0.999) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = schedule(lr, steps, warmup_steps)
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay,
                           mask=lambda params: nnx.map_state(_decays, params)))
  return optax.chain(*parts), sched


def _under(prefixes: Sequence[tuple]):
  """An nnx filter: true for variables whose path starts with one of `prefixes`."""
  prefixes = tuple(tuple(p) for p in prefixes)

  def f(path, _):
    return any(tuple(path[:len(p)]) == p for p in prefixes)

  return f


def trainable_filter(mode: str, *, tied_embeddings: bool, text_only: bool, lora: bool = False):
  """Which parameters train.

  all: everything (but the vision tower in text-only mode, which reads no image).
  heads_lm_head: the paper's frozen mode: the two projection heads and the LM head
    (with tied embeddings the LM head is the embedding table, which then trains).
  frozen_vision: everything except the vision tower (the connector trains).

  With `lora` the base weights are frozen: the adapters (LoRAParam) and the two
  projection heads train, plus what the mode adds beyond "all": the LM head
  (heads_lm_head) or everything but the vision tower (frozen_vision).
  """
  if mode not in TRAINABLE:
    raise ValueError(f"train.trainable must be one of {TRAINABLE}, got {mode!r}")
  vision = [("backbone", "vision_model")] + ([("backbone", "connector")] if text_only else [])
  heads = [("user_proj",), ("item_proj",)]
  if lora:
    if mode == "all":
      return nnx.Any(LoRAParam, nnx.All(nnx.Param, _under(heads)))
    return nnx.Any(LoRAParam, trainable_filter(mode, tied_embeddings=tied_embeddings, text_only=text_only))
  if mode == "all":
    frozen = vision if text_only else []
    return nnx.All(nnx.Param, nnx.Not(_under(frozen))) if frozen else nnx.Param
  if mode == "frozen_vision":
    return nnx.All(nnx.Param, nnx.Not(_under(vision)))
  head = ("backbone", "text_model", "embed_tokens") if tied_embeddings else ("backbone", "lm_head")
  return nnx.All(nnx.Param, _under(heads + [head]))


def freeze(trainable, patterns: Sequence[str], model: nnx.Module):
  """`trainable` less the parameters whose path matches one of `patterns` (train.freeze).

  A pattern that matches no parameter of `model` is an error naming it.
  """
  if not patterns:
    return trainable
  if isinstance(patterns, str):
    patterns = (patterns,)
  paths = [lora_lib.join(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  lora_lib.check_patterns_match(patterns, paths, "train.freeze")
  match = lora_lib.path_matcher(patterns, "train.freeze")
  return nnx.All(trainable, nnx.Not(lambda path, _: match(lora_lib.join(path))))

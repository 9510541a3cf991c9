"""PixRec's mixed objective: next-item generation plus two in-batch contrastive terms.

All losses are computed in float32 on the global batch. Under jit with the batch
sharded over data-parallel devices, the similarity matrices span the whole global
batch, so every example's negatives come from every shard.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """loss = (1 - alpha - beta) * NIG + alpha * L_TT + beta * L_UT."""

  alpha: float  # item-item (v_T|U vs v_T)
  beta: float  # user-item (v_U vs v_T)
  temperature: float

  @property
  def nig(self) -> float:
    return 1.0 - self.alpha - self.beta


def nig_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(weighted token NLL sum, weighted correct-token count) of next-item generation.

  Sums rather than means, so that microbatches add up to the batch's figures (the
  mean divides by the batch's token count, `nig_weights.sum()`).
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return (nll * weights).sum(), (correct * weights).sum()


def nig_count(weights: jax.Array) -> jax.Array:
  """The number of target tokens NIG averages over (at least 1)."""
  return jnp.maximum(weights.astype(jnp.float32).sum(), 1.0)


def next_item_generation(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token cross-entropy on the target segment's text tokens.

  logits (B, K, V) are taken at the K positions that predict the target's text
  tokens `labels` (B, K); `weights` is 0 for padding slots. History, image and
  padding tokens never appear here. Returns (mean loss, token accuracy).
  """
  nll, correct = nig_sums(logits, labels, weights)
  count = nig_count(weights)
  return nll / count, correct / count


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def info_nce(queries: jax.Array, keys: jax.Array, item_ids: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """In-batch InfoNCE: query i's positive is key i; the other keys are negatives.

  Cosine similarity over temperature. A key of the same item as the positive
  (the item appears twice in the batch) is a false negative and is masked out.
  Returns (mean loss, in-batch top-1 accuracy).
  """
  q, k = l2_normalize(queries), l2_normalize(keys)
  logits = (q @ k.T) / temperature
  n = logits.shape[0]
  eye = jnp.eye(n, dtype=bool)
  same_item = item_ids[:, None] == item_ids[None, :]
  logits = jnp.where(same_item & ~eye, -jnp.inf, logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.diagonal(logp))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == jnp.arange(n)).astype(jnp.float32))
  return loss, accuracy


EMBEDDINGS = ("user", "target_given_user", "item")


def contrastive_loss(embeddings: dict, target_item: jax.Array, weights: LossWeights) -> tuple[jax.Array, dict]:
  """alpha * L_TT + beta * L_UT on the whole batch's embeddings (the keys of EMBEDDINGS)."""
  tt, tt_acc = info_nce(embeddings["target_given_user"], embeddings["item"], target_item, weights.temperature)
  ut, ut_acc = info_nce(embeddings["user"], embeddings["item"], target_item, weights.temperature)
  return weights.alpha * tt + weights.beta * ut, {"l_tt": tt, "l_ut": ut, "tt_acc": tt_acc, "ut_acc": ut_acc}


def mixed_loss(outputs: dict, batch: dict, weights: LossWeights) -> tuple[jax.Array, dict]:
  """outputs: nig_logits, user, target_given_user, item (from PixRec.train_outputs)."""
  nig, nig_acc = next_item_generation(outputs["nig_logits"], batch["nig_labels"], batch["nig_weights"])
  contrastive, metrics = contrastive_loss(outputs, batch["target_item"], weights)
  loss = weights.nig * nig + contrastive
  return loss, {"loss": loss, "nig": nig, "l_tt": metrics["l_tt"], "l_ut": metrics["l_ut"], "nig_token_acc": nig_acc,
                "tt_acc": metrics["tt_acc"], "ut_acc": metrics["ut_acc"]}

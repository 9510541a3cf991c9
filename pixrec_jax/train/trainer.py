"""Sharded train state and the jitted train step.

State is created already sharded: the shapes come from `jax.eval_shape`, the
shardings from each parameter's logical axes, and a jitted init with those
`out_shardings` materialises it on the devices. The train step is jitted with
explicit in/out shardings and donates the state.

An update whose loss or gradient is not finite is not applied: parameters and
optimiser state stay as they were, decided on the device so that the host never
waits for it, and the state counts such steps (the run then stops or carries on,
by `train.nonfinite`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixrec_jax import sharding as shd
from pixrec_jax.recsys.losses import LossWeights, mixed_loss


class TrainState(NamedTuple):
  step: jax.Array
  params: nnx.State  # the trainable parameters
  frozen: nnx.State  # everything else in the model
  opt_state: Any
  nonfinite_steps: jax.Array  # steps whose update was not applied: a non-finite loss or gradient
  first_nonfinite_step: jax.Array  # the first of them, 0 if none


def _shardings(tree: Any, mesh: Mesh) -> Any:
  """Logical-axis shardings for Variables; other leaves (step counters) replicated."""
  def one(x):
    if isinstance(x, nnx.Variable):
      return shd.state_shardings(x, mesh)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Trainer:
  """Owns the graph definition, the optimiser and the compiled step."""

  def __init__(self, model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, trainable,
               weights: LossWeights, mesh: Mesh, schedule: optax.Schedule | None = None):
    self.tx = tx
    self.trainable = trainable
    self.weights = weights
    self.mesh = mesh
    self.schedule = schedule

    def init() -> TrainState:
      model = model_fn()
      _, params, frozen = nnx.split(model, trainable, ...)
      zero = jnp.zeros((), jnp.int32)
      return TrainState(zero, params, frozen, tx.init(params), zero, zero)

    abstract_model = nnx.eval_shape(model_fn)
    self.graphdef = nnx.split(abstract_model, trainable, ...)[0]
    abstract = jax.eval_shape(init)
    self.state_shardings = _shardings(abstract, mesh)
    # What a checkpoint restores into: every array's shape, dtype and sharding.
    self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                       self.state_shardings)
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self._step = None

  def init_state(self) -> TrainState:
    with jax.set_mesh(self.mesh):
      return self._init()

  def model(self, state: TrainState) -> nnx.Module:
    return nnx.merge(self.graphdef, state.params, state.frozen)

  def param_counts(self, state: TrainState) -> dict[str, int]:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"trainable": count(state.params), "frozen": count(state.frozen)}

  def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    def loss_fn(params):
      model = nnx.merge(self.graphdef, params, state.frozen)
      return mixed_loss(model.train_outputs(batch), batch, self.weights)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep_if_bad, params, state.params)
    opt_state = jax.tree.map(keep_if_bad, opt_state, state.opt_state)
    step = state.step + 1
    nonfinite = state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
    first = jnp.where((state.first_nonfinite_step == 0) & ~finite, step, state.first_nonfinite_step)
    metrics["grad_norm"] = grad_norm
    metrics["nonfinite_steps"] = nonfinite
    if self.schedule is not None:
      metrics["lr"] = self.schedule(state.step)
    return TrainState(step, params, state.frozen, opt_state, nonfinite, first), metrics

  def batch_shardings(self, batch: dict) -> dict:
    return shd.tree_batch_shardings(batch, self.mesh)

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One update. `batch` is this host's numpy batch; it becomes a global array here."""
    shardings = self.batch_shardings(batch)
    if self._step is None:
      self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, shardings),
                           out_shardings=(self.state_shardings, shd.replicated(self.mesh)), donate_argnums=(0,))
    global_batch = {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
    with jax.set_mesh(self.mesh):
      return self._step(state, global_batch)

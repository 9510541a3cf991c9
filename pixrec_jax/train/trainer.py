"""Sharded train state and the jitted train step.

State is created already sharded: the shapes come from `jax.eval_shape`, the
shardings from each parameter's logical axes, and a jitted init with those
`out_shardings` materialises it on the devices. The train step is jitted with
explicit in/out shardings and donates the state.
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
      return TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params))

    abstract_model = nnx.eval_shape(model_fn)
    self.graphdef = nnx.split(abstract_model, trainable, ...)[0]
    abstract = jax.eval_shape(init)
    self.state_shardings = _shardings(abstract, mesh)
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
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if self.schedule is not None:
      metrics["lr"] = self.schedule(state.step)
    return TrainState(state.step + 1, params, state.frozen, opt_state), metrics

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

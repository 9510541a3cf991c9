"""Sharded train state and the jitted train step.

State is created already sharded: the shapes come from `jax.eval_shape`, the
shardings from each parameter's logical axes, and a jitted init with those
`out_shardings` materialises it on the devices. The train step is jitted with
explicit in/out shardings and donates the state.

An update whose loss or gradient is not finite is not applied: parameters and
optimiser state stay as they were, decided on the device so that the host never
waits for it, and the state counts such steps (the run then stops or carries on,
by `train.nonfinite`).

With `grad_accum_steps` k > 1 the global batch is cut into k microbatches and the
update is the large batch's, exactly, GradCache-style (Gao et al. 2021): PixRec's
contrastive terms compare every example with every other, so averaging the
microbatches' own gradients would not be the batch's gradient. Pass 1 computes
every microbatch's embeddings (no gradients kept); the batch's contrastive loss
gives their cotangents; pass 2 re-runs each microbatch under `jax.vjp` with those
cotangents (and NIG's, a sum over tokens that decomposes), summing parameter
gradients. Activation memory is one microbatch's; compute is about 1.5 forwards
more per step. A packed batch (data.image_budget) shares its image rows across
examples: the vision tower encodes them once before pass 1, pass 2 also sums each
microbatch's gradient in those features, and one backward pass through the tower
ends the step (the tower's activations are the whole batch's packed rows).

LoRA dropout (models.lora) gets a key from (seed, step, microbatch), the same in
both passes, so that pass 2 differentiates the forward pass 1 ran.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixrec_jax import sharding as shd
from pixrec_jax import host_memory, xla_options
from pixrec_jax.data import packing
from pixrec_jax.models import lora
from pixrec_jax.recsys import losses
from pixrec_jax.recsys.losses import LossWeights, mixed_loss
from pixrec_jax.train import optim


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


def update_under_cond(platform: str) -> bool:
  """Whether the train step applies its optimiser update under a `lax.cond` on the non-finite check
  (`Trainer._update`) rather than selecting new against old values leaf by leaf.

  CPU: the cond. XLA:CPU reads the predicate where it lies, in host memory, and the select made it copy
  every old Adam moment before overwriting it (smolvlm_256m's update 809 -> 557 ms: BENCHMARKS.md, "The
  optimiser update under a cond"). Elsewhere: the select, which fuses into the update's elementwise
  kernels. XLA:GPU runs a conditional by copying its predicate to the host and blocking until the stream
  has drained, a host-device synchronisation in every step between the backward pass and the update; the
  GPU timings in BENCHMARKS.md were measured with the select. TPUs take the select too (not timed there;
  XLA:TPU decides a conditional on the chip, so either form keeps the host out)."""
  return platform == "cpu"


class Trainer:
  """Owns the graph definition, the optimiser and the compiled step."""

  def __init__(self, model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, trainable,
               weights: LossWeights, mesh: Mesh, schedule: optax.Schedule | None = None, *,
               grad_accum_steps: int = 1, freeze: Sequence[str] = (), seed: int = 0):
    if grad_accum_steps < 1:
      raise ValueError(f"train.grad_accum_steps must be >= 1, got {grad_accum_steps}")
    self.tx = optax.with_extra_args_support(tx)  # passes grad_norm to the transformations that take it
    self.weights = weights
    self.mesh = mesh
    self.update_under_cond = update_under_cond(mesh.devices.flat[0].platform)
    self.schedule = schedule
    self.grad_accum_steps = grad_accum_steps
    self.seed = seed

    def init() -> TrainState:
      model = model_fn()
      _, params, frozen = nnx.split(model, trainable, ...)
      zero = jnp.zeros((), jnp.int32)
      return TrainState(zero, params, frozen, tx.init(params), zero, zero)

    abstract_model = nnx.eval_shape(model_fn)
    trainable = optim.freeze(trainable, freeze, abstract_model)
    self.trainable = trainable
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

  def random_state(self, seed: int = 0, std: float = 0.02) -> TrainState:
    """A state of the real shapes, dtypes and shardings filled with cheap values, for benchmarks.

    Kernels and embedding tables N(0, std), other floating parameters ones, optimiser
    moments and counters zero. It compiles one tiny program per distinct (shape, dtype,
    sharding) instead of the model's initialisers, whose one program for a full-size
    backbone (hundreds of random initialisers) takes minutes to compile. Not for training.
    """
    programs = {}
    key = jax.random.key(seed)

    def fill(path, x, i, moments):
      name = jax.tree_util.keystr(path)
      floating = jnp.issubdtype(x.dtype, jnp.floating)
      kind = ("zeros" if moments or not floating else
              "normal" if ("kernel" in name or "embedding" in name or "lora" in name) else "ones")
      sig = (kind, x.shape, x.dtype, x.sharding)
      if sig not in programs:
        def make(k, kind=kind, shape=x.shape, dtype=x.dtype):
          if kind == "normal":
            return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
          return (jnp.zeros if kind == "zeros" else jnp.ones)(shape, dtype)
        programs[sig] = jax.jit(make, out_shardings=x.sharding)
      return programs[sig](jax.random.fold_in(key, i))

    with jax.set_mesh(self.mesh):
      fields = {}
      count = 0
      for field in TrainState._fields:
        flat, treedef = jax.tree_util.tree_flatten_with_path(getattr(self.abstract_state, field))
        moments = field not in ("params", "frozen")
        values = [fill(p, x, count + i, moments) for i, (p, x) in enumerate(flat)]
        count += len(flat)
        fields[field] = jax.tree_util.tree_unflatten(treedef, values)
      return TrainState(**fields)

  def model(self, state: TrainState) -> nnx.Module:
    return nnx.merge(self.graphdef, state.params, state.frozen)

  def param_counts(self, state: TrainState) -> dict[str, int]:
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {"trainable": count(state.params), "frozen": count(state.frozen)}

  def _dropout_key(self, step: jax.Array, micro: int | jax.Array = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), step), micro)

  def _model(self, params, frozen, key) -> nnx.Module:
    model = nnx.merge(self.graphdef, params, frozen)
    lora.set_dropout_key(model, key)
    return model

  def _loss_and_grads(self, state: TrainState, batch: dict) -> tuple[dict, Any]:
    """(metrics, gradients) of the mixed loss on the whole batch, in one pass."""
    def loss_fn(params):
      model = self._model(params, state.frozen, self._dropout_key(state.step))
      return mixed_loss(model.train_outputs(batch), batch, self.weights)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return metrics, grads

  def _accumulated_loss_and_grads(self, state: TrainState, batch: dict) -> tuple[dict, Any]:
    """The same (metrics, gradients) as `_loss_and_grads`, from k microbatches (see the module docstring)."""
    k = self.grad_accum_steps
    n = batch["target_item"].shape[0]
    # A packed batch's image rows (data.image_budget) are shared across its examples: the vision tower
    # encodes them once, before the microbatches; pass 2 sums each microbatch's gradient in those features
    # and one backward pass through the tower ends the step.
    packed = "image_index" in batch
    shared = {name: batch[name] for name in packing.shared_keys(batch) if packed and name in batch}
    rows, rows_vjp = None, None
    if packed:
      def encode_rows(params):  # the key k is no microbatch's: the tower's own (LoRA dropout, if any)
        return self._model(params, state.frozen, self._dropout_key(state.step, k)).packed_rows(shared)
      rows, rows_vjp = jax.vjp(encode_rows, state.params)
    # Microbatch j is rows j, j + k, j + 2k, ...: a batch sharded in row blocks stays sharded over
    # every device in each microbatch.
    examples = {name: x for name, x in batch.items() if name not in shared}
    # Packed prompts (data.pack_rows) split the same way: rows j, j + k, .. hold microbatch j's prompts
    # (packing.plan_groups), and its row r is row r // k of the microbatch.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), examples)
    for name in ("example_row", "item_row"):
      if name in micro:
        micro[name] = micro[name] // k
    if "feature_order" in micro:  # 2 (M e + m) + item for global example e = k n + j: n is microbatch j's
      slots2 = micro["feature_order"].shape[-1]
      e, rest = micro["feature_order"] // slots2, micro["feature_order"] % slots2
      micro["feature_order"] = (e // k) * slots2 + rest
    weights = self.weights
    count = losses.nig_count(batch["nig_weights"])

    # Each microbatch spread over the data-parallel devices, where its size divides over them.
    dp = shd.data_parallel_size(self.mesh)
    spread = lambda x: shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if x.shape[0] % dp == 0 else x

    def forward(params, mb, j, rows):
      if (n // k) % dp == 0:
        mb = jax.tree.map(spread, mb)
      model = self._model(params, state.frozen, self._dropout_key(state.step, j))
      out = model.train_outputs(mb, row_feats=rows)
      nll, correct = losses.nig_sums(out["nig_logits"], mb["nig_labels"], mb["nig_weights"])
      return {name: out[name] for name in losses.EMBEDDINGS}, nll, correct

    def embed(_, xs):
      mb, j = xs
      return None, forward(state.params, mb, j, rows)

    steps = jnp.arange(k)
    _, (emb, nll, correct) = jax.lax.scan(embed, None, (micro, steps))
    # (k, n / k, P) back to the batch's row order.
    emb = jax.tree.map(lambda e: jnp.swapaxes(e, 0, 1).reshape((n,) + e.shape[2:]), emb)
    (contrastive, metrics), emb_grads = jax.value_and_grad(losses.contrastive_loss, has_aux=True)(
        emb, batch["target_item"], weights)
    emb_grads = jax.tree.map(lambda g: jnp.swapaxes(g.reshape((n // k, k) + g.shape[1:]), 0, 1), emb_grads)
    nig_cotangent = jnp.asarray(weights.nig, jnp.float32) / count

    def backward(carry, xs):
      grads, d_rows = carry
      mb, j, cot = xs
      _, vjp = jax.vjp(lambda p, r: forward(p, mb, j, r)[:2], state.params, rows)
      g, dr = vjp((cot, nig_cotangent))
      return (jax.tree.map(jnp.add, grads, g), None if rows is None else d_rows + dr), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, d_rows), _ = jax.lax.scan(backward, (zeros, None if rows is None else jnp.zeros_like(rows)),
                                      (micro, steps, emb_grads))
    if rows_vjp is not None:
      (g,) = rows_vjp(d_rows)
      grads = jax.tree.map(jnp.add, grads, g)
    nig = nll.sum() / count
    loss = weights.nig * nig + contrastive
    return {"loss": loss, "nig": nig, "l_tt": metrics["l_tt"], "l_ut": metrics["l_ut"],
            "nig_token_acc": correct.sum() / count, "tt_acc": metrics["tt_acc"], "ut_acc": metrics["ut_acc"]}, grads

  def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    if self.grad_accum_steps > 1:
      metrics, grads = self._accumulated_loss_and_grads(state, batch)
    else:
      metrics, grads = self._loss_and_grads(state, batch)
    return self._update(state, metrics, grads)

  def _update(self, state: TrainState, metrics: dict, grads: Any) -> tuple[TrainState, dict]:
    """One optimiser update from the batch's gradients, unless the loss or the gradient is not finite.

    On the CPU the update runs under a `lax.cond` on that check; elsewhere new and old values are selected
    leaf by leaf (`update_under_cond`: a conditional on a GPU synchronises with the host). The gradient's
    norm is computed once, here (`optim.global_norm`: in halves on the CPU), and handed to the optimiser's
    clipping (`optim.clip_by_global_norm` takes it; other transformations ignore it), not a second time
    inside optax's clip.
    """
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(operands):
      params, opt_state = operands
      updates, opt_state = self.tx.update(grads, opt_state, params, grad_norm=grad_norm)
      return optax.apply_updates(params, updates), opt_state

    old = (state.params, state.opt_state)
    if self.update_under_cond:
      params, opt_state = jax.lax.cond(finite, apply, lambda operands: operands, old)
    else:
      params, opt_state = jax.tree.map(lambda new, was: jnp.where(finite, new, was), apply(old), old)
    step = state.step + 1
    nonfinite = state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32)
    first = jnp.where((state.first_nonfinite_step == 0) & ~finite, step, state.first_nonfinite_step)
    metrics["grad_norm"] = grad_norm
    metrics["nonfinite_steps"] = nonfinite
    if self.schedule is not None:
      metrics["lr"] = self.schedule(state.step)
    return TrainState(step, params, state.frozen, opt_state, nonfinite, first), metrics

  def batch_shardings(self, batch: dict) -> dict:
    """Rows over the data-parallel axes; the pixel table (not per example) on every device."""
    shardings = shd.tree_batch_shardings(batch, self.mesh)
    if "pixel_lut" in batch:
      shardings["pixel_lut"] = shd.replicated(self.mesh)
    return shardings

  def check_batch_size(self, batch: dict) -> None:
    """The batch (arrays or shapes) splits into the microbatches of train.grad_accum_steps."""
    k = self.grad_accum_steps
    batch_size = batch["target_item"].shape[0]
    if batch_size % k:
      raise ValueError(f"train.batch_size={batch_size} is not divisible by train.grad_accum_steps={k}")
    rows, item_rows = batch.get("example_row"), batch.get("item_row")
    if isinstance(rows, np.ndarray):  # a host batch of packed prompts: packed for this k (data.packing)
      for j in range(k):
        mine = rows[j::k]
        if (np.any(mine % k != j) or np.any(np.diff(mine) < 0)
            or (isinstance(item_rows, np.ndarray) and np.any(item_rows[j::k] % k != j))):
          raise ValueError(f"this batch's prompts were packed for another train.grad_accum_steps than {k} "
                           f"(data.packing.plan_groups): microbatch {j} would read other examples' rows")

  def jitted_step(self, batch_shardings: dict):
    """The train step jitted with the state's and the batch's shardings, the state donated."""
    return jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_shardings),
                   out_shardings=(self.state_shardings, shd.replicated(self.mesh)), donate_argnums=(0,),
                   compiler_options=xla_options.for_mesh(self.mesh))

  def lower(self, abstract_batch: dict):
    """The train step lowered for the abstract state and a batch of these shapes (nothing is allocated)."""
    self.check_batch_size(abstract_batch)
    shardings = self.batch_shardings(abstract_batch)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in abstract_batch.items()}
    with jax.set_mesh(self.mesh):
      return self.jitted_step(shardings).lower(self.abstract_state, batch)

  def put_batch(self, batch: dict, shardings: dict | None = None) -> dict:
    """This host's numpy batch as global arrays on the mesh (arrays already global pass through)."""
    shardings = shardings or self.batch_shardings(batch)
    return {k: v if isinstance(v, jax.Array) else jax.make_array_from_process_local_data(shardings[k], v)
            for k, v in batch.items()}

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One update. `batch` is this host's numpy batch (it becomes a global array here) or `put_batch`'s."""
    self.check_batch_size(batch)
    shardings = self.batch_shardings(batch)
    global_batch = self.put_batch(batch, shardings)
    if host_memory.retained():
      # The batch's copy done before the step starts, so that the step runs on this thread and its scratch
      # memory comes from the heap host_memory keeps (a step waiting on the copy would start on a pool thread).
      jax.block_until_ready(global_batch)
    if self._step is None:
      self._step = self.jitted_step(shardings)
    with jax.set_mesh(self.mesh):
      return self._step(state, global_batch)

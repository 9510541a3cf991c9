"""Scanned layers, rematerialisation policies, and the scanned <-> looped parameter layouts.

A looped stack keeps its layers in an `nnx.List` (state paths `.../layers/0/...`);
a scanned stack is ONE layer module whose every array has a leading layer axis
(`.../layers/...`, logical axis "layers", never sharded) and runs under
`jax.lax.scan`, so a deep model compiles one layer instead of all of them. Both
are built from the same random draws, so a scanned and a looped model made with
one seed hold the same weights; `to_layout` converts a state (or checkpoint)
from one layout to the other.

Rematerialisation (`jax.checkpoint`) trades compute for memory: a layer's
activations are recomputed in the backward pass instead of stored, except those
the named policy saves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_AXIS = "layers"

# name -> jax.checkpoint policy; "none" turns rematerialisation off.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    # Save nothing: every activation of a layer is recomputed (least memory).
    "full": jax.checkpoint_policies.nothing_saveable,
    # Save every matmul output; recompute only the cheap elementwise work.
    "dots": jax.checkpoint_policies.dots_saveable,
    # Save the weight matmuls (no batch dimension), recompute attention's batched einsums.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
  """The jax.checkpoint policy for a name (None for "none")."""
  try:
    return REMAT_POLICIES[name]
  except KeyError:
    raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(REMAT_POLICIES)}") from None


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _with_layer_axis(v: nnx.Variable, value) -> nnx.Variable:
  axes = v.get_metadata().get("logical_axes")
  if axes is None:
    return v.replace(value)
  return v.replace(value, logical_axes=(LAYER_AXIS,) + tuple(axes))


def stack(make: Callable[[], nnx.Module], num_layers: int) -> nnx.Module:
  """`num_layers` layers made in order (the draws a Python loop makes), stacked into one module."""
  if num_layers < 1:
    raise ValueError(f"a scanned stack needs at least one layer, got num_layers={num_layers}")
  modules = [make() for _ in range(num_layers)]
  graphdef, _ = nnx.split(modules[0])
  states = [nnx.state(m) for m in modules]
  stacked = jax.tree.map(lambda first, *rest: _with_layer_axis(first, jnp.stack([first[...]] + [r[...] for r in rest])),
                         *states, is_leaf=_is_variable)
  return nnx.merge(graphdef, stacked)


def layer_stack(make: Callable[[], nnx.Module], num_layers: int, scanned: bool) -> nnx.Module:
  """`num_layers` layers from `make`: one stacked module to scan over, or an `nnx.List` to loop over."""
  if scanned:
    return stack(make, num_layers)
  return nnx.List([make() for _ in range(num_layers)])


def remat(fn: Callable, policy_name: str) -> Callable:
  """fn(layer, *args) rematerialised under the named policy (unchanged for "none")."""
  policy = remat_policy(policy_name)
  if policy is None:
    return fn

  def wrapped(layer, *args):
    graphdef, state = nnx.split(layer)
    return jax.checkpoint(lambda s, *a: fn(nnx.merge(graphdef, s), *a), policy=policy)(state, *args)

  return wrapped


def scan(stacked: nnx.Module, x: jax.Array, fn: Callable, xs: Any = None, remat_name: str = "none") -> jax.Array:
  """x through every layer of a stacked module: x = fn(layer, x, xs[i]) for i in order.

  xs: a pytree whose arrays have a leading layer axis (per-layer inputs), or None.
  """
  graphdef, state = nnx.split(stacked)
  policy = remat_policy(remat_name)

  def body(carry, inputs):
    layer_state, layer_xs = inputs
    return fn(nnx.merge(graphdef, layer_state), carry, layer_xs), None

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  out, _ = jax.lax.scan(body, x, (state, xs))
  return out


# -- layouts -------------------------------------------------------------------


def _flat(state) -> dict[tuple, Any]:
  return dict(nnx.to_flat_state(state))


def _value(leaf):
  return leaf[...] if _is_variable(leaf) else leaf


def value_for(path: tuple, source: dict[tuple, Any], shape) -> Any:
  """The value at `path` (of shape `shape`) of the target layout, read from a flat source in either layout."""
  if path in source:
    return _value(source[path])
  for i, key in enumerate(path):
    if key != LAYER_AXIS:
      continue
    head, tail = path[:i + 1], path[i + 1:]
    if tail and isinstance(tail[0], int):  # target looped, source scanned
      stacked = head + tail[1:]
      if stacked in source:
        return _value(source[stacked])[tail[0]]
    else:  # target scanned, source looped
      n = shape[0] if shape else 0
      parts = [head + (j,) + tail for j in range(n)]
      if n and all(p in source for p in parts):
        if head + (n,) + tail in source:
          raise ValueError(f"{'/'.join(map(str, head))}: the source has more than the target's {n} layers")
        values = [_value(source[p]) for p in parts]
        stack_fn = np.stack if all(isinstance(v, np.ndarray) for v in values) else jnp.stack
        return stack_fn(values)
  raise ValueError(f"no value for {'/'.join(map(str, path))} in either layout of the source state")


def to_layout(source, target):
  """The values of `source` (an nnx.State or a flat {path: array} dict) in the layout of `target`.

  `target` is an nnx.State, concrete or abstract (`nnx.eval_shape`), scanned or
  looped; its Variables (and their metadata) are kept, their values replaced.
  Every target path must be found in the source, directly or by stacking or
  unstacking `layers`.
  """
  flat_source = source if isinstance(source, dict) else _flat(source)
  out = []
  for path, var in nnx.to_flat_state(target):
    shape = tuple(var.shape)
    value = value_for(path, flat_source, shape)
    if tuple(value.shape) != shape:
      raise ValueError(f"{'/'.join(map(str, path))}: source has shape {tuple(value.shape)}, target {shape}")
    out.append((path, var.replace(value) if _is_variable(var) else value))
  return nnx.from_flat_state(out)


def is_scanned(state) -> bool:
  """True if any `layers` subtree of the state is stacked (no layer index after `layers`)."""
  for path, _ in nnx.to_flat_state(state):
    for i, key in enumerate(path[:-1]):
      if key == LAYER_AXIS and not isinstance(path[i + 1], int):
        return True
  return False

"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code names axes logically ("embed", "mlp", "heads", "batch"); only this
module knows the mesh. The mesh has three axes: `data` (pure data parallel),
`fsdp` (data parallel with parameters and optimiser state sharded) and `tensor`
(model parallel over heads, MLP and vocabulary).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes). Names absent here are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("position", None),
    ("patch", None),
    ("proj", None),
    ("length", None),
    # The leading axis of scanned (stacked) layers: each device holds every layer's slice.
    ("layers", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; -1 in one axis takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh axes data={data} fsdp={fsdp} tensor={tensor}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs {math.prod(shape)} devices, "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec, dropping mesh axes of size 1."""
  out = []
  used: set[str] = set()
  for name in axes:
    target = _RULES.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    # A mesh axis shards at most one dimension of an array.
    targets = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape[t] > 1))
    used.update(targets)
    out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*out)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an nnx State (abstract or concrete), from each Variable's logical axes.

  A dimension whose size the mesh axis does not divide is replicated instead.
  """

  def one(v):
    axes = v.get_metadata().get("logical_axes")
    shape = v.shape if hasattr(v, "shape") else v[...].shape
    if axes is None:
      return v.replace(NamedSharding(mesh, PartitionSpec()))
    spec = list(logical_to_spec(axes, mesh))
    for i, entry in enumerate(spec):
      if entry is not None:
        size = math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))
        if shape[i] % size:
          spec[i] = None
    return v.replace(NamedSharding(mesh, PartitionSpec(*spec)))

  return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))


def data_parallel_size(mesh: Mesh) -> int:
  """The devices a batch's leading dimension splits over (batch_sharding): data x fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def tree_batch_shardings(tree: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), tree)


def process_batch_shard(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """(index, count): this process feeds rows [index * n, (index + 1) * n), n = batch_size // count,
  of every global batch, as `jax.make_array_from_process_local_data` expects them.

  One process: (0, 1). Processes whose devices hold the same rows (the batch
  replicated over a mesh axis that spans processes) share an index and must read
  the same examples.
  """
  slices = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,)).values()
  rows = set()
  for (s,) in slices:
    rows.update(range(*s.indices(batch_size)))
  lo, n = min(rows), len(rows)
  if rows != set(range(lo, lo + n)) or batch_size % n or lo % n:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)} of a batch of {batch_size}: not one "
                     f"aligned block; the batch size must divide evenly over the mesh's data x fsdp axes "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']}, with each process's devices adjacent")
  return lo // n, batch_size // n


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names, inside a jit that runs under a mesh; a no-op otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> Mapping[str, int]:
  return dict(mesh.shape)

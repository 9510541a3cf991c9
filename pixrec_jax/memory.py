"""python -m pixrec_jax.memory --config CONFIG.py[:ARGS] [--config.KEY=VALUE ...] [--mesh data=1,fsdp=8]
    [--devices N] [--device_memory_gib 80] [--workdir DIR]

How much memory one device needs to train a config, before renting it: the train
step is compiled ahead of time for the config's abstract state (never allocated)
and a batch of the config's real shapes (sequence lengths, image tiles: one real
batch is built from the config's data), and XLA's estimate is printed per device:
arguments (parameters, optimiser state, batch), outputs, temporaries, and the total
live at the peak (arguments + outputs - what the donated state lets outputs reuse
+ temporaries). Parameter and optimiser bytes are also counted from the shapes and
shardings. The last line is one JSON object of the figures.

--devices N simulates N devices on the host CPU (XLA's forced host device count;
set before JAX starts), so a mesh can be sized on a laptop. XLA's estimate comes
from the compiled program of the backend it runs on: run it on the target kind of
accelerator for that backend's exact figure; a CPU compile is a close guide
(its fusion and layout choices differ), not a guarantee.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import tempfile

GIB = 1024**3
USAGE = __doc__.split("\n\n")[0]


def _pop_option(args: list[str], name: str) -> str | None:
  """Removes `--name=V` or `--name V` from args; returns V (None if absent)."""
  for i, arg in enumerate(args):
    if arg == f"--{name}":
      if i + 1 >= len(args):
        raise SystemExit(f"error: --{name} needs a value")
      value = args[i + 1]
      del args[i:i + 2]
      return value
    if arg.startswith(f"--{name}="):
      del args[i]
      return arg.split("=", 1)[1]
  return None


def parse_mesh(spec: str) -> dict[str, int]:
  """"data=1,fsdp=8" -> {"data": 1, "fsdp": 8}; unknown axes or non-integers fail naming them."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    if not eq or name not in ("data", "fsdp", "tensor"):
      raise ValueError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS one of data, fsdp, tensor")
    try:
      out[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh: {name}={value!r} is not an integer") from None
  return out


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree whose leaves carry shardings (the largest shard)."""
  import jax
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize
  return total


def _total_bytes(tree) -> int:
  import jax
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def report(cfg, workdir: str | pathlib.Path, device_memory_gib: float = 80.0) -> dict:
  """Compiles the train step of `cfg` ahead of time and returns the memory figures (see the module docstring)."""
  import jax
  import numpy as np

  from pixrec_jax.data import pipeline
  from pixrec_jax.train import run

  job = run.setup(cfg, workdir)
  trainer = job.trainer
  batch, _ = pipeline.split_bookkeeping(next(run._train_iterator(job)))
  abstract_batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
  if job.feature_cache:  # train.cache_image_features: the step reads a table's rows, not pixels (data.features)
    table = run.feature_table(job)
    rows = abstract_batch.pop("images").shape[0]
    abstract_batch.pop("pixel_lut")
    abstract_batch[table.key] = jax.ShapeDtypeStruct((rows,) + table.row_shape, table.dtype)
  compiled = trainer.lower(abstract_batch).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis for compiled programs")
  state = trainer.abstract_state
  arguments, outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temps, aliased = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  peak = arguments + outputs - aliased + temps
  per_device = {
      "params": _per_device_bytes((state.params, state.frozen)),
      "trainable_params": _per_device_bytes(state.params),
      "optimizer": _per_device_bytes(state.opt_state),
  }
  figures = {
      "config": "",
      "backend": jax.default_backend(),
      "devices": len(trainer.mesh.devices.flat),
      "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
      "batch_size": int(cfg.train.batch_size),
      "grad_accum_steps": int(trainer.grad_accum_steps),
      "lora_rank": int(cfg.get("lora", {}).get("rank", 0)),
      "trainable": cfg.train.trainable,
      "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves((state.params, state.frozen)))),
      "trainable_param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "pack_rows": int(job.pack_rows),  # data.pack_rows and data.image_budget, resolved (-1: chosen from the data)
      "image_budget": int(job.image_budget),
      "batch_shapes": {k: list(v.shape) for k, v in abstract_batch.items()},
      "per_device_gib": {
          "arguments": arguments / GIB,
          "outputs": outputs / GIB,
          "aliased": aliased / GIB,
          "temporaries": temps / GIB,
          "total": peak / GIB,
          "params_analytic": per_device["params"] / GIB,
          "trainable_params_analytic": per_device["trainable_params"] / GIB,
          "optimizer_analytic": per_device["optimizer"] / GIB,
          "batch_analytic": _total_bytes(abstract_batch) / len(trainer.mesh.devices.flat) / GIB,
      },
      "device_memory_gib": device_memory_gib,
      "fits": bool(peak <= device_memory_gib * GIB),
  }
  return figures


def format_report(f: dict) -> str:
  g = f["per_device_gib"]
  lines = [
      f"backend {f['backend']}, {f['devices']} device(s), mesh {f['mesh']}, global batch {f['batch_size']}"
      f" in {f['grad_accum_steps']} microbatch(es), trainable={f['trainable']}, lora rank {f['lora_rank']}",
      f"parameters {f['param_count'] / 1e6:.1f} M, of which trainable {f['trainable_param_count'] / 1e6:.2f} M",
      "per device (GiB):",
      f"  parameters       {g['params_analytic']:8.3f}  (from shapes and shardings)",
      f"  optimiser state  {g['optimizer_analytic']:8.3f}  (from shapes and shardings)",
      f"  arguments        {g['arguments']:8.3f}  (XLA: parameters + optimiser state + batch)",
      f"  outputs          {g['outputs']:8.3f}  (XLA; {g['aliased']:.3f} of it reuses the donated state)",
      f"  temporaries      {g['temporaries']:8.3f}  (XLA: activations, gradients, workspace)",
      f"  total            {g['total']:8.3f}",
      f"{'fits' if f['fits'] else 'does NOT fit'} in {f['device_memory_gib']:g} GiB per device",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help") for a in args):
    print(__doc__)
    return 0
  try:
    devices = _pop_option(args, "devices")
    mesh = _pop_option(args, "mesh")
    budget = float(_pop_option(args, "device_memory_gib") or 80.0)
    if devices is not None:
      if int(devices) < 1:
        raise ValueError(f"--devices must be a positive integer, got {devices}")
      # Before JAX starts: the forced host device count is read once, at backend initialisation.
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={int(devices)}").strip()
      os.environ["JAX_PLATFORMS"] = "cpu"
    from pixrec_jax import config_lib
    cfg, workdir = config_lib.parse_args(args)
    if mesh:
      for axis, size in parse_mesh(mesh).items():
        config_lib.override(cfg, f"mesh.{axis}", str(size))
    if devices is not None:
      import jax
      if jax.device_count() != int(devices):
        raise RuntimeError(f"--devices {devices} asked for, but JAX has {jax.device_count()} devices: it had "
                           "started before the flag could be set (run this module as a command)")
    with tempfile.TemporaryDirectory(prefix="pixrec_memory_") as tmp:
      figures = report(cfg, workdir or tmp, budget)
    figures["config"] = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                              if a == "--config" or a.startswith("--config=")), "")
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_report(figures))
  print(json.dumps(figures))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Compiler options our heavy programs (the train step, the evaluation towers) pass to XLA, per platform.

CPU: XLA's CPU backend runs matmuls as YNNPACK fusions. Its default fuses each matmul on its
own ("individual dot" fusions); with `LIBRARY_FUSION_TYPE_DOT` the same matmuls (and a
cheap elementwise neighbour now and then) become YNNPACK "dot" fusions, which run faster
(a SwiGLU MLP's forward and backward at the demo's shapes, `bench/cpu_ops.py`: 21-22 ->
14 ms). The demo's train step goes from 346-349 to 228-231 ms (272-277 to
186-187 with packed prompts) and its main job from 262 to 186 s (BENCHMARKS.md, "XLA's CPU
matmul fusions"). Results agree to float32 rounding (the main job's metrics to the last digit).

Other platforms get no options. An `XLA_FLAGS` that names an option itself wins (this
module then leaves that option to it), and a jaxlib that does not know an option is told
so once in the log and compiles without it.
"""

from __future__ import annotations

import functools
import logging
import os

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(platform: str | None = None) -> dict | None:
  """The options for `jax.jit(..., compiler_options=...)` on `platform` (default: jax's default backend);
  None where there are none."""
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return None
  options = _accepted_cpu_options(os.environ.get("XLA_FLAGS", ""))
  return dict(options) if options else None


@functools.cache
def _accepted_cpu_options(xla_flags: str) -> tuple:
  options = []
  one = jax.device_put(1.0, jax.devices("cpu")[0])
  for name, value in CPU_OPTIONS.items():
    if f"--{name}" in xla_flags:
      continue  # the user's XLA_FLAGS chose this one
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(one).compile()
    except jax.errors.JaxRuntimeError as e:
      logging.warning("this jaxlib (%s) does not take the XLA CPU option %s=%s (%s); compiling without it",
                      jax.__version__, name, value, str(e).splitlines()[0])
      continue
    options.append((name, value))
  return tuple(options)


def for_mesh(mesh) -> dict | None:
  """compiler_options for a program that runs on `mesh` (its devices' platform)."""
  return compiler_options(mesh.devices.flat[0].platform)

"""pixrec_jax.host_memory: a CPU train step's scratch memory is reused from step to step, not mapped afresh."""

import json
import pathlib
import subprocess
import sys

import pytest

from pixrec_jax import host_memory

ROOT = pathlib.Path(__file__).parents[1]
glibc_only = pytest.mark.skipif(host_memory._mallopt() is None, reason="needs glibc's mallopt (Linux with glibc)")


def test_nothing_changes_once_jax_has_started_or_off_the_cpu():
  """In a process whose jax backends exist (this test session) prepare cannot reach the CPU client, so it
  and retain leave everything as it is; retain never applies to accelerators."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  assert not host_memory.prepare(True) and not host_memory.retain("cpu") and not host_memory.retained()
  assert jax.config.values["jax_cpu_enable_async_dispatch"]
  assert not host_memory.retain("gpu") and not host_memory.retain("tpu")


@glibc_only
def test_demo_step_reuses_its_scratch_memory():
  """bench/train_step.py on the demo (its step's scratch buffer is 157 MB, above what a malloc arena of a
  pool thread holds): with cpu.reuse_step_memory (the default) a timed step faults in almost no fresh
  pages; without, it maps and zeroes the buffer again every step."""
  faults = {}
  for reuse in (True, False):
    out = subprocess.run([sys.executable, "bench/train_step.py", "--config", "configs/demo.py", "--warmup", "1",
                          "--rounds", "1", "--steps", "2", f"--config.cpu.reuse_step_memory={reuse}"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cpu_step_memory_reused"] is reuse
    faults[reuse] = result["minor_faults_per_step"]
  assert faults[False] > 20_000 and faults[True] < faults[False] / 10, faults

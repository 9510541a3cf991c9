"""The main job as a child process, at tiny sizes, for tests that kill it or read its work directory.

Every child shares one persistent XLA compilation cache, so only the first run of a
configuration compiles; a rerun of the tests reuses it too. Compiled code is loaded,
never changed, so results stay bitwise those of a fresh compile.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
JIT_CACHE = pathlib.Path(tempfile.gettempdir()) / f"pixrec_jax_test_jit_cache_{os.getuid()}"

# A text-only run of the demo config small enough for a step to take a fraction of a second.
TINY = {
    "data.synthetic.num_users": 60, "data.synthetic.num_groups": 12, "train.batch_size": 8,
    "train.warmup_steps": 2, "train.log_every": 1, "model.text.num_hidden_layers": 1,
    "model.vision.num_hidden_layers": 1, "eval.batch_size": 32, "eval.splits": "()",
}


def env() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
          "JAX_COMPILATION_CACHE_DIR": str(JIT_CACHE), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def main_args(workdir, config: str = "configs/demo.py:text_only", **overrides) -> list[str]:
  """`python -m pixrec_jax.main` arguments: TINY, then `overrides` (dots written as __)."""
  values = {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}
  return ["--config", config, "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in values.items()]


# A child that runs the main job after `prelude` (Python code: a test's fault injection).
_HARNESS = """
import sys
{prelude}
from pixrec_jax import main
sys.exit(main.main(sys.argv[1:]))
"""


def command(args: list[str], prelude: str = "") -> list[str]:
  if prelude:
    return [sys.executable, "-c", _HARNESS.format(prelude=prelude)] + args
  return [sys.executable, "-m", "pixrec_jax.main"] + args


def run(args: list[str], prelude: str = "", timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(command(args, prelude), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def start(args: list[str], prelude: str = "") -> subprocess.Popen:
  return subprocess.Popen(command(args, prelude), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 600, what: str = "condition") -> None:
  """Polls `condition()` until true; fails if the child ends first."""
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"the child ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def committed(workdir, step: int):
  """A condition: checkpoint `step` is committed (orbax renames it into place when complete)."""
  return lambda: (pathlib.Path(workdir) / "checkpoints" / str(step)).is_dir()


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 300) -> tuple[str, str]:
  proc.send_signal(sig)
  return proc.communicate(timeout=timeout)


def log(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "train_log.jsonl").read_text().splitlines()]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc

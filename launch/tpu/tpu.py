#!/usr/bin/env python3
"""Cloud TPU VMs for pixrec_jax: create, install, run, logs, stop, status, delete.

  python launch/tpu/tpu.py create  NAME --zone Z --accelerator-type v5litepod-16 [--spot] [--queued]
  python launch/tpu/tpu.py install NAME --zone Z
  python launch/tpu/tpu.py run     NAME --zone Z --config configs/demo.py --workdir DIR [-- --config.KEY=VALUE ...]
  python launch/tpu/tpu.py logs    NAME --zone Z [--worker 0] [--no-follow]
  python launch/tpu/tpu.py stop    NAME --zone Z
  python launch/tpu/tpu.py status  NAME --zone Z [--queued]
  python launch/tpu/tpu.py delete  NAME --zone Z [--queued]

Every command takes --dry-run: it prints the commands, one per line, exactly as
they would run (paste them into a shell to run them), and runs nothing.

A slice of several hosts has one TPU VM per host ("worker"); install and run go
to every worker (--worker=all), and the job's processes find each other through
the TPU metadata (pixrec_jax.distributed). install ships the committed tree
(`git archive HEAD`), so each worker runs exactly one commit. Only process 0
(worker 0) writes logs and reports; its output goes to ~/pixrec_run.log there.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The TPU software version ("runtime") to create each generation's VMs with, from
# https://cloud.google.com/tpu/docs/runtimes; by the accelerator type's prefix.
RUNTIMES = {"v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Names people use for a generation -> the prefix gcloud's accelerator types use.
ALIASES = {"v5e": "v5litepod"}

REMOTE_DIR = "~/pixrec_jax"
REMOTE_VENV = "~/pixrec_venv"
REMOTE_LOG = "~/pixrec_run.log"
REMOTE_PID = "~/pixrec_run.pid"
PYTHON_VERSION = "3.12"  # the TPU images' system Python is older than the pinned numpy and jax need


def accelerator_type(raw: str) -> str:
  """'v5e-16' -> 'v5litepod-16'; checks that the generation is one we know a runtime for."""
  generation, dash, size = raw.partition("-")
  generation = ALIASES.get(generation, generation)
  if generation not in RUNTIMES or not dash or not size.isdigit():
    raise ValueError(f"accelerator type {raw!r}: expected GENERATION-SIZE with GENERATION one of "
                     f"{sorted(RUNTIMES) + sorted(ALIASES)} (e.g. v5litepod-16, v5p-32, v6e-8)")
  return f"{generation}-{size}"


def runtime_version(accelerator: str) -> str:
  return RUNTIMES[accelerator.partition("-")[0]]


def _scope(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, worker: str, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args), f"--worker={worker}",
          "--command", command]


def _pinned(package: str) -> str:
  """The version requirements.txt pins for `package`."""
  match = re.search(rf"^{re.escape(package)}==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
  if not match:
    raise ValueError(f"requirements.txt pins no {package} version")
  return match.group(1)


def create(args) -> list[list[str]]:
  accelerator = accelerator_type(args.accelerator_type)
  version = args.version or runtime_version(accelerator)
  if args.queued:
    # A queued resource waits for capacity instead of failing; its node is NAME.
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}",
           *_scope(args), f"--accelerator-type={accelerator}", f"--runtime-version={version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_scope(args),
           f"--accelerator-type={accelerator}", f"--version={version}"]
  return [cmd + (["--spot"] if args.spot else [])]


def install(args) -> list[list[str]]:
  archive = f"/tmp/pixrec_jax-{args.name}.tar.gz"
  jax_tpu = f'"jax[tpu]=={_pinned("jax")}"'
  remote = " && ".join([
      "set -euo pipefail",
      # uv brings its own Python: the TPU images' system one is too old for the pins.
      'export PATH="$HOME/.local/bin:$PATH"',
      "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
      f"rm -rf {REMOTE_DIR} {REMOTE_VENV}",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/pixrec_jax.tar.gz -C {REMOTE_DIR}",
      f"uv venv --python {PYTHON_VERSION} {REMOTE_VENV}",
      f"uv pip install --python {REMOTE_VENV}/bin/python -r {REMOTE_DIR}/requirements.txt -e {REMOTE_DIR} {jax_tpu}",
      f"{REMOTE_VENV}/bin/python -c \"import jax, pixrec_jax; print(jax.__version__)\"",
  ])
  return [
      ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:pixrec_jax.tar.gz", *_scope(args),
       "--worker=all"],
      _ssh(args, "all", remote),
  ]


def run(args) -> list[list[str]]:
  # The interpreter's path stays unquoted, for the remote shell to expand its ~.
  job = f"{REMOTE_VENV}/bin/python " + shlex.join(
      ["-m", "pixrec_jax.main", "--config", args.config, "--workdir", args.workdir,
       "--config.distributed.enabled=true", *args.overrides])
  if args.foreground:
    remote = f"cd {REMOTE_DIR} && {job} 2>&1 | tee {REMOTE_LOG}"
  else:
    # Detached, so that the job outlives this ssh session; `logs` follows it, `stop` ends it.
    remote = f"cd {REMOTE_DIR} && (nohup {job} > {REMOTE_LOG} 2>&1 < /dev/null & echo $! > {REMOTE_PID})"
  return [_ssh(args, args.worker, remote)]


def logs(args) -> list[list[str]]:
  return [_ssh(args, args.worker, f"tail -n +1 -F {REMOTE_LOG}" if args.follow else f"cat {REMOTE_LOG}")]


def stop(args) -> list[list[str]]:
  # SIGTERM, as a preemption sends it: the job saves a checkpoint at the next step and exits.
  return [_ssh(args, "all", f"if [ -f {REMOTE_PID} ]; then kill -TERM \"$(cat {REMOTE_PID})\" || true; fi")]


def status(args) -> list[list[str]]:
  kind = "queued-resources" if args.queued else "tpu-vm"
  return [["gcloud", "compute", "tpus", kind, "describe", args.name, *_scope(args)]]


def delete(args) -> list[list[str]]:
  if args.queued:
    # --force deletes the queued resource's node too.
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_scope(args), "--force",
             "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_scope(args), "--quiet"]]


COMMANDS = {"create": create, "install": install, "run": run, "logs": logs, "stop": stop, "status": status,
            "delete": delete}


def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="the TPU VM (and queued resource) name")
  common.add_argument("--zone", required=True, help="e.g. us-east5-b (v5e, v6e) or us-east5-a (v5p)")
  common.add_argument("--project", default="", help="default: gcloud's configured project")
  common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  sub = top.add_subparsers(dest="command", required=True)
  p = sub.add_parser("create", parents=[common], help="create a TPU VM or a queued resource")
  p.add_argument("--accelerator-type", required=True,
                 help="GENERATION-SIZE: v5litepod-N (or v5e-N), v5p-N, v6e-N")
  p.add_argument("--version", default="", help="TPU runtime version (default: the generation's, see RUNTIMES)")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheaper); default on-demand")
  p.add_argument("--queued", action="store_true", help="a queued resource: waits for capacity")
  sub.add_parser("install", parents=[common], help="ship the committed tree and install it on every worker")
  p = sub.add_parser("run", parents=[common], help="start python -m pixrec_jax.main on the workers",
                     epilog="Arguments after -- go to the job: -- --config.train.steps=1000 ...")
  p.add_argument("--config", required=True, help="CONFIG.py[:ARGS], relative to the repository")
  p.add_argument("--workdir", required=True,
                 help="the same path on every worker; checkpoints need one all workers share (e.g. a gcsfuse mount)")
  p.add_argument("--worker", default="all", help="all (a multi-host job needs every worker) or a worker index")
  p.add_argument("--foreground", action="store_true", help="stream the output and stop with the ssh session")
  p = sub.add_parser("logs", parents=[common], help="print (and follow) the job's output on one worker")
  p.add_argument("--worker", default="0", help="worker 0 runs process 0, which reports")
  p.add_argument("--no-follow", dest="follow", action="store_false")
  sub.add_parser("stop", parents=[common], help="SIGTERM the detached job on every worker (it checkpoints, then exits)")
  for name, what in (("status", "describe"), ("delete", "delete")):
    p = sub.add_parser(name, parents=[common], help=f"{what} the TPU VM or queued resource")
    p.add_argument("--queued", action="store_true", help="it is a queued resource")
  return top


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after -- belongs to the job (argparse would take it for this script's own positionals).
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser().parse_args(argv[:split])
  args.overrides = argv[split + 1:]
  if args.overrides and args.command != "run":
    print(f"error: only run passes arguments after -- to the job, not {args.command}", file=sys.stderr)
    return 2
  try:
    commands = COMMANDS[args.command](args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for cmd in commands:
    if args.dry_run:
      print(shlex.join(cmd))
    else:
      print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
      subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

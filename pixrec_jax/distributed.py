"""Multi-process JAX: whether to call `jax.distributed.initialize`, and with what.

A job that spans several hosts runs one process per host (a TPU VM worker, a GPU
node, or one SLURM task). The processes meet at a coordinator (process 0's
address) before any of them touches a device; from then on `jax.devices()` lists
the devices of every process and one mesh spans them all.

`distributed.enabled` in the config decides:
  "auto"  initialise when the environment says the job has several processes:
          JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, a task
          of an srun step of several tasks, or a Cloud TPU VM (jax reads the
          worker list from the TPU metadata);
  "true"  always initialise (values jax cannot find itself must then be given);
  "false" never: a single-process job.
Config fields win over environment variables, which win over SLURM's.

Only `maybe_initialize` imports jax, so the config can be read without it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import pathlib
import re
from typing import Mapping

import ml_collections

ENABLED_VALUES = ("auto", "true", "false")

# Set on GKE TPU pods and multislice jobs; a TPU VM created by gcloud keeps them in its metadata instead.
_TPU_ENV_MARKERS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v4, v5p, v5e, v6e, 7x). Google's vendor id alone also matches gVNIC network cards.
_TPU_PCI_DEVICES = ("0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def default_config() -> ml_collections.ConfigDict:
  """The `distributed` group every config gets (config_lib.job_defaults)."""
  c = ml_collections.ConfigDict()
  c.enabled = "auto"  # auto | true | false
  c.coordinator_address = ""  # process 0's host:port; empty: from the environment
  c.num_processes = 0  # 0: from the environment
  c.process_id = -1  # -1: from the environment
  c.local_device_ids = ()  # this process's devices, e.g. (0, 1); empty: every visible device
  c.initialization_timeout = 300  # seconds to wait for every process to reach the coordinator
  return c


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to pass to `jax.distributed.initialize`; None leaves a value to jax's cluster detection."""

  source: str  # what asked for several processes: config, env, slurm, cloud_tpu or enabled=true
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def complete(self) -> bool:
    return None not in (self.coordinator_address, self.num_processes, self.process_id)


def parse_enabled(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  lowered = str(value).strip().lower()
  lowered = {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(lowered, lowered)
  if lowered not in ENABLED_VALUES:
    raise ValueError(f"distributed.enabled must be one of {ENABLED_VALUES}, got {value!r}")
  return lowered


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM host list: 'gpu[003-004,7],cpu1' -> 'gpu003'."""
  match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
  prefix, ranges, suffix = match.groups()
  if not ranges:
    return prefix
  return prefix + re.split(r"[,-]", ranges)[0] + suffix


def _device_ids(raw) -> tuple[int, ...] | None:
  if isinstance(raw, str):
    raw = [x for x in raw.replace(" ", "").split(",") if x]
  ids = tuple(int(x) for x in raw)
  return ids or None


def _slurm(environ: Mapping[str, str]) -> Plan | None:
  """The job's shape from SLURM's variables, when this is one task of a multi-task srun step."""
  # The batch script itself also sees SLURM_NTASKS > 1 and SLURM_PROCID=0, but only
  # tasks that srun started have the step's variables.
  nodelist = environ.get("SLURM_STEP_NODELIST")
  num_tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
  if not nodelist or num_tasks <= 1 or "SLURM_PROCID" not in environ:
    return None
  # Every task must pick the same port without talking to the others: derive it from the
  # job id, in the ephemeral range, as jax's own SLURM detection does.
  port = environ.get("JAX_COORDINATOR_PORT") or str(61440 + int(environ.get("SLURM_JOB_ID", "0")) % 4096)
  local_ids = None
  # Several tasks on a node that all see every GPU must split them by local rank; one
  # task per node drives all of its GPUs, and a task already given one GPU
  # (--gpus-per-task=1) sees just that one.
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  num_nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or num_tasks)
  if num_tasks > num_nodes and len(visible) != 1 and "SLURM_LOCALID" in environ:
    local_ids = (int(environ["SLURM_LOCALID"]),)
  return Plan("slurm", f"{first_slurm_host(nodelist)}:{port}", num_tasks, int(environ["SLURM_PROCID"]), local_ids)


def on_cloud_tpu(environ: Mapping[str, str] = os.environ) -> bool:
  """True on a Cloud TPU VM (TPU chips on the PCI bus and libtpu installed) or in a GKE TPU pod."""
  if any(environ.get(k) for k in _TPU_ENV_MARKERS):
    return True
  if importlib.util.find_spec("libtpu") is None:
    return False
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    vendor = pathlib.Path(vendor)
    if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR and \
        (vendor.parent / "device").read_text().strip() in _TPU_PCI_DEVICES:
      return True
  return False


def plan(cfg: ml_collections.ConfigDict, environ: Mapping[str, str] = os.environ,
         cloud_tpu: bool | None = None) -> Plan | None:
  """How to initialise, or None for a single-process job. `cfg` is the `distributed` group."""
  enabled = parse_enabled(cfg.enabled)
  if enabled == "false":
    return None
  explicit = Plan(
      "config",
      cfg.coordinator_address or None,
      cfg.num_processes if cfg.num_processes > 0 else None,
      cfg.process_id if cfg.process_id >= 0 else None,
      _device_ids(cfg.local_device_ids))
  from_env = Plan(
      "env",
      environ.get("JAX_COORDINATOR_ADDRESS") or None,
      int(environ["JAX_NUM_PROCESSES"]) if environ.get("JAX_NUM_PROCESSES") else None,
      int(environ["JAX_PROCESS_ID"]) if environ.get("JAX_PROCESS_ID") else None,
      _device_ids(environ.get("JAX_LOCAL_DEVICE_IDS", "")))
  slurm = _slurm(environ)
  layers = [p for p in (explicit, from_env, slurm) if p is not None]
  merged = {f: next((getattr(p, f) for p in layers if getattr(p, f) is not None), None)
            for f in ("coordinator_address", "num_processes", "process_id", "local_device_ids")}
  source = next((p.source for p in layers
                 if any(getattr(p, f) is not None for f in ("coordinator_address", "num_processes", "process_id"))),
                None)
  if source is None and (cloud_tpu if cloud_tpu is not None else on_cloud_tpu(environ)):
    source = "cloud_tpu"
  if source is None:
    return Plan("enabled=true", **merged) if enabled == "true" else None
  if enabled == "auto" and merged["num_processes"] == 1:
    return None
  return Plan(source, **merged)


def maybe_initialize(cfg: ml_collections.ConfigDict) -> Plan | None:
  """Calls `jax.distributed.initialize` if the config or the environment asks for several
  processes; returns the plan it followed, or None for a single-process job.

  Must run before anything touches a device. `cfg` is the whole job config; one without
  a `distributed` group gets the defaults.
  """
  group = cfg.get("distributed") or default_config()
  chosen = plan(group)
  if chosen is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return chosen
  jax.distributed.initialize(
      coordinator_address=chosen.coordinator_address, num_processes=chosen.num_processes,
      process_id=chosen.process_id,
      local_device_ids=list(chosen.local_device_ids) if chosen.local_device_ids else None,
      initialization_timeout=group.initialization_timeout,
      # With every value known, jax's own detection must not second-guess them (under
      # SLURM it would restrict each process to the GPU of its local rank).
      cluster_detection_method="deactivate" if chosen.complete else None)
  return chosen

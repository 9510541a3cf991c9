"""Checkpoints of a training run, and stopping cleanly when the machine is taken away.

A checkpoint is one orbax step directory WORKDIR/checkpoints/<step> with four items:
  state     the TrainState arrays (step, trainable and frozen parameters, optimiser
            state, non-finite counters), each written from its own sharding
  data      the grain iterator state of every process (process_<i>-of-<n>.json), so
            the next batch after a resume is the one the interrupted run would
            have read
  config    the resolved config of the run (JSON)
  progress  host-side counters (step, dropped history items) and the seed

RNG state: the train step draws no random numbers, and the pipeline's draws (window
length and start) are a pure function of the seed and each element's index, so the
iterator state restores them exactly; nnx RNG variables, if a model had any, are
arrays of `frozen` and saved with it. Nothing is re-randomised on resume.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it once every
item is written, so a step is listed only when it is complete: a process killed
mid-save leaves the previous step as the latest one. The latest `keep` steps are
kept, and the one with the best validation metric besides.

Layers saved looped (`.../layers/0/...`) restore into a scanned model
(`.../layers/...`, stacked) and the other way round: `restore` and `restore_model`
notice the other layout and convert (through host memory), so `model.scan_layers`
can change between runs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import threading
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from pixrec_jax.models import scan

CHECKPOINT_DIR = "checkpoints"
NONFINITE_POLICIES = ("stop", "skip")


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model this config builds."""


class NonFiniteStateError(ValueError):
  """A state with non-finite values was about to be written."""


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  every_steps: int = 200
  keep: int = 3
  best_metric: str = ""  # e.g. "valid/recall@10": keep the step where it is highest; "" keeps latest only
  eval_every_steps: int = 0
  async_save: bool = True

  def __post_init__(self):
    if self.every_steps < 1:
      raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
    if self.keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")
    if self.eval_every_steps < 0:
      raise ValueError(f"checkpoint.eval_every_steps must be >= 0, got {self.eval_every_steps}")
    if self.eval_every_steps and self.eval_every_steps % self.every_steps:
      raise ValueError(f"checkpoint.eval_every_steps={self.eval_every_steps} must be a multiple of "
                       f"checkpoint.every_steps={self.every_steps}: validation scores a checkpoint")
    if self.best_metric and not self.best_metric.startswith("valid/"):
      raise ValueError(f"checkpoint.best_metric must name a validation metric, 'valid/<metric>' "
                       f"(e.g. 'valid/recall@10'), got {self.best_metric!r}")

  @property
  def tracks_best(self) -> bool:
    return bool(self.best_metric) and self.eval_every_steps > 0

  @classmethod
  def from_config(cls, cfg) -> "CheckpointOptions":
    """From a run's config: a ConfigDict, or the dict a checkpoint stores."""
    c = cfg["checkpoint"]
    return cls(every_steps=int(c["every_steps"]), keep=int(c["keep"]), best_metric=str(c["best_metric"]),
               eval_every_steps=int(c["eval_every_steps"]), async_save=bool(c["async"]))


def nonfinite_policy(cfg) -> str:
  policy = cfg.train.nonfinite
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
  return policy


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  progress: dict
  config: dict


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_names(tree) -> dict[str, Any]:
  """{"params/backbone/.../kernel": leaf}: the same names for a state, its abstract
  twin and orbax's metadata of it (nnx Variables' trailing `value` dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [_key_name(k) for k in path]
    if parts and parts[-1] == "value":
      parts = parts[:-1]
    out["/".join(parts)] = leaf
  return out


def flat_config(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
  """'key: saved -> current' for every leaf that differs (missing leaves shown as <absent>)."""
  a, b = flat_config(saved), flat_config(json.loads(json.dumps(current, default=str)))
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
          if a.get(k, "<absent>") != b.get(k, "<absent>")]


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True),
                      tree)


def nonfinite_leaves(tree) -> list[str]:
  """Names of the arrays holding a NaN or an infinity (one small device reduction per array)."""
  flags = leaf_names(jax.device_get(_finite_leaves(tree)))
  return [name for name, ok in flags.items() if not bool(ok)]


def _layouts(names) -> set[str]:
  """Which layer layouts the names use: "looped" (layers/<i>/...) and/or "scanned" (layers/<name>/...)."""
  out = set()
  for name in names:
    parts = name.split("/")
    for i, part in enumerate(parts[:-1]):
      if part == scan.LAYER_AXIS:
        out.add("looped" if parts[i + 1].isdigit() else "scanned")
  return out


def _path(name: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in name.split("/"))


def _restore_args(abstract):
  """Each array restored with its abstract twin's sharding and dtype."""
  return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
  """An orbax CheckpointManager for one run's directory (WORKDIR/checkpoints)."""

  def __init__(self, directory: str | pathlib.Path, options: CheckpointOptions = CheckpointOptions(), *,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.options = options
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"{self.directory} does not exist: no checkpoints to read (train first, with "
                              f"python -m pixrec_jax.main --workdir {self.directory.parent})")
    policies = [ocp.checkpoint_managers.LatestN(n=options.keep)]
    best_fn = None
    if options.tracks_best:
      metric = options.best_metric
      best_fn = lambda m: m[metric]
      policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, n=1,
                                                    keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode="max",  # orbax writes a step's metrics only when it has a best_fn
            enable_async_checkpointing=options.async_save, read_only=read_only, create=not read_only,
            save_interval_steps=0 if read_only else 1,
            # A save killed midway leaves <step>.orbax-checkpoint-tmp; it is never listed, and
            # the next run that writes here deletes it.
            cleanup_tmp_directories=not read_only))

  # -- what is there ---------------------------------------------------------

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def metrics(self, step: int) -> dict | None:
    return self._manager.metrics(step)

  def best_step(self) -> int | None:
    """The step with the highest best_metric among those validated, or None."""
    metric = self.options.best_metric
    scored = [(m[metric], s) for s in self.steps() if (m := self.metrics(s)) and metric in m]
    return max(scored)[1] if scored else None

  def resolve(self, which: str | int = "latest") -> tuple[int, str]:
    """(step, why) for "latest", "best" (the latest if none was validated) or a step number."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"{self.directory} holds no committed checkpoint")
    if which == "latest":
      return steps[-1], "latest"
    if which == "best":
      best = self.best_step()
      if best is None:
        return steps[-1], f"latest; no checkpoint has {self.options.best_metric or 'a validation metric'}"
      return best, f"best by {self.options.best_metric}"
    try:
      step = int(which)
    except ValueError:
      raise ValueError(f"a checkpoint step must be 'latest', 'best' or a number, got {which!r}") from None
    if step not in steps:
      raise ValueError(f"{self.directory} has no checkpoint of step {step}; it has {steps}")
    return step, "requested"

  def read_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  # -- writing ---------------------------------------------------------------

  def save(self, step: int, state, *, config: Mapping, progress: Mapping, data_iterator=None,
           metrics: Mapping[str, float] | None = None, wait: bool = False) -> None:
    """Starts writing `state` as `step` (in the background when async); `wait` blocks until it is
    committed. A state with non-finite values is refused, naming them."""
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteStateError(f"refusing to write checkpoint step {step}: {len(bad)} arrays are not finite, "
                                f"e.g. {bad[:5]}")
    items = {"state": ocp.args.PyTreeSave(state),
             "config": ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=str))),
             "progress": ocp.args.JsonSave(dict(progress))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None,
                       force=True)
    if wait:
      self._manager.wait_until_finished()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- reading ---------------------------------------------------------------

  def arrays(self, step: int) -> dict[str, np.ndarray]:
    """Every array of `step`'s state as host numpy, by name (no model needed: for comparing runs)."""
    meta = self._manager.item_metadata(step)["state"]
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=restore_args)))
    return leaf_names(out["state"])

  def _saved_shapes(self, step: int) -> dict[str, tuple]:
    return {k: (tuple(m.shape), str(np.dtype(m.dtype)))
            for k, m in leaf_names(self._manager.item_metadata(step)["state"]).items()}

  def _check(self, step: int, saved: Mapping[str, tuple], abstract, config: Mapping | None) -> None:
    """Fails naming every array whose presence, shape or dtype differs between the checkpoint and
    `abstract` (and, as the likely cause, the config keys that differ)."""
    want = {k: (tuple(a.shape), str(np.dtype(a.dtype))) for k, a in leaf_names(abstract).items()}
    problems = [(k, "missing from the checkpoint") for k in set(want) - set(saved)]
    problems += [(k, "in the checkpoint, not in this model") for k in set(saved) - set(want)]
    problems += [(k, f"checkpoint {saved[k][0]} {saved[k][1]}, this model {want[k][0]} {want[k][1]}")
                 for k in set(saved) & set(want) if saved[k] != want[k]]
    if not problems:
      return
    # The model's own parameters first: the optimiser's moments repeat them.
    problems = [f"{k}: {why}" for k, why in sorted(problems, key=lambda p: (p[0].startswith("opt_state/"), p[0]))]
    message = (f"{self.directory / str(step)} was written for another model: {len(problems)} arrays do not "
               "match:\n  " + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    if config is not None:
      diffs = config_differences(self.read_config(step), config)
      if diffs:
        message += "\nconfig keys that differ (checkpoint -> now):\n  " + "\n  ".join(diffs)
    raise CheckpointMismatchError(message)

  def restore(self, step: int, abstract_state, *, data_iterator=None, config: Mapping | None = None) -> Restored:
    """The full training state of `step` onto `abstract_state`'s shardings, and the data iterator's
    position (set in place on `data_iterator`). `config` (the current one) names likely causes of a
    mismatch."""
    saved = self._saved_shapes(step)
    relayout = _layouts(saved) != _layouts(leaf_names(abstract_state))
    if relayout:
      state = self._relayout(step, abstract_state, config)
      items = {"config": ocp.args.JsonRestore(), "progress": ocp.args.JsonRestore()}
    else:
      self._check(step, saved, abstract_state, config)
      items = {"state": ocp.args.PyTreeRestore(abstract_state, _restore_args(abstract_state)),
               "config": ocp.args.JsonRestore(),
               "progress": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if data_iterator is not None and "process_" in str(e):
        raise CheckpointMismatchError(f"{self.directory / str(step)}: no data-iterator state for process "
                                      f"{jax.process_index()} of {jax.process_count()}; a run resumes exactly only "
                                      f"on the topology that wrote it ({e})") from None
      raise
    return Restored(step, state if relayout else out["state"], out["progress"], out["config"])

  def _relayout(self, step: int, abstract, config: Mapping | None, prefixes: tuple[str, ...] = ()):
    """`step`'s arrays (those under `prefixes`, or all) converted to `abstract`'s layer layout
    (scanned <-> looped) and placed on its shardings."""
    source = {_path(k): v for k, v in self.arrays(step).items() if not prefixes or k.startswith(prefixes)}
    names, treedef = leaf_names(abstract), jax.tree.structure(abstract)
    values = {}
    for name, leaf in names.items():
      try:
        values[name] = scan.value_for(_path(name), source, tuple(leaf.shape))
      except ValueError as e:
        raise CheckpointMismatchError(f"{self.directory / str(step)}: cannot convert to this model's layer "
                                      f"layout: {e}") from None
    self._check(step, {k: (tuple(v.shape), str(v.dtype)) for k, v in values.items()}, abstract, config)
    arrays = [jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index, v=values[name]: v[index])
              for name, leaf in names.items()]
    return jax.tree.unflatten(treedef, arrays)

  def restore_model(self, step: int, abstract_params, abstract_frozen, config: Mapping | None = None):
    """(params, frozen) of `step`, without reading the optimiser state."""
    want = {"params": abstract_params, "frozen": abstract_frozen}
    saved = {k: v for k, v in self._saved_shapes(step).items() if k.startswith(("params/", "frozen/"))}
    if _layouts(saved) != _layouts(leaf_names(want)):
      out = self._relayout(step, want, config, prefixes=("params/", "frozen/"))
      return out["params"], out["frozen"]
    self._check(step, saved, want, config)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(want, _restore_args(want), partial_restore=True)))
    return out["state"]["params"], out["state"]["frozen"]


def open_run(workdir: str | pathlib.Path) -> Checkpointer:
  """A run's checkpoints (WORKDIR/checkpoints), read-only, with the options the run was trained with."""
  directory = pathlib.Path(workdir) / CHECKPOINT_DIR
  probe = Checkpointer(directory, read_only=True)
  latest = probe.latest_step()
  if latest is None:
    raise FileNotFoundError(f"{directory} holds no committed checkpoint (train first, with "
                            f"python -m pixrec_jax.main --workdir {workdir})")
  return Checkpointer(directory, CheckpointOptions.from_config(probe.read_config(latest)), read_only=True)


class PreemptionWatch:
  """Whether the run was told to stop (SIGTERM, as cloud preemption sends), checked at step boundaries.

  One process: a SIGTERM handler sets a flag (installed from the main thread only,
  the previous handler restored on exit). Several processes: jax.distributed's
  preemption sync point, so that every host stops at the same step.
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._installed = False
    self._multi = False

  def __enter__(self) -> "PreemptionWatch":
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def _on_sigterm(self, signum, frame) -> None:
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multi:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError as e:  # jax.distributed started without its preemption service
        print(f"pixrec_jax: no preemption checkpoints in this multi-process run: {e}", flush=True)
        self._multi = False
    return self._signalled

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

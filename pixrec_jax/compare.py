"""python -m pixrec_jax.compare --config CONFIG.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]

Trains and evaluates one config twice on the same data and splits: with images
(DIR/pixrec) and text only (DIR/text_only, pixrec.text_only=True), then writes one
report of both models and the baselines of eval.baselines: DIR/report.json,
DIR/report.md (with the image / text-only ratio of every metric) and
DIR/recall_ndcg.png; each model's own report and gallery.html stay in its folder.
With --config.eval.seeds=0,1,2 each model is trained once per seed and the report
gives the mean and standard deviation. Rerunning the same command resumes or reuses
every run (their checkpoints and cached catalogue embeddings).

`run_seeds` is what `python -m pixrec_jax.main` does when eval.seeds is set.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import jax
import ml_collections

from pixrec_jax import config_lib, distributed, host_memory
from pixrec_jax.eval import report as report_lib

MODEL = "pixrec"
TEXT_ONLY = "text_only"


class Preempted(RuntimeError):
  """A run stopped by SIGTERM (its checkpoint saved): rerun the command to resume it."""


def _shared_data(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose generated data (synthetic, or converted paper files) lives in `workdir`/data,
  so that every run of a comparison reads the same files and the same splits."""
  cfg = copy.deepcopy(cfg)
  if cfg.data.source in ("synthetic", "paper") and not cfg.data.path:
    cfg.data.path = str(workdir / "data")
  return cfg


def _train_and_report(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict | None:
  """One run's report (None on processes other than 0, which write nothing)."""
  from pixrec_jax.train import run  # pylint: disable=import-outside-toplevel

  if not cfg.eval.splits or not cfg.eval.report:
    raise ValueError("a comparison or eval.seeds needs eval.splits (e.g. 'test') and eval.report=True, got "
                     f"eval.splits={tuple(cfg.eval.splits)} and eval.report={cfg.eval.report}")
  out = run.train_and_evaluate(cfg, workdir)
  if "preempted_at_step" in out:
    raise Preempted(f"{workdir} stopped by SIGTERM after step {out['preempted_at_step']}; "
                    "run the same command again to resume")
  if jax.process_index():
    return None
  return json.loads((workdir / report_lib.REPORT_JSON).read_text())


def run_seeds(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict | None:
  """Trains and evaluates `cfg` once per seed of eval.seeds in WORKDIR/seed_N and writes the mean and
  the sample standard deviation of every metric to WORKDIR/report.json, report.md and recall_ndcg.png."""
  workdir = pathlib.Path(workdir)
  seeds = [int(s) for s in cfg.eval.seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"eval.seeds must list distinct integer seeds, got {tuple(cfg.eval.seeds)}")
  base = _shared_data(cfg, workdir)
  base.eval.seeds = ()
  reports = []
  for seed in seeds:
    sub = copy.deepcopy(base)
    sub.seed = seed
    reports.append(_train_and_report(sub, workdir / f"seed_{seed}"))
  if jax.process_index():
    return None
  out = report_lib.aggregate_seeds(reports, seeds)
  out["title"] = f"PixRec evaluation, {workdir.name}, {len(seeds)} seeds"
  out["links"] = {f"seed {s}": f"seed_{s}/{report_lib.REPORT_MD}" for s in seeds}
  if base.eval.gallery_users > 0:
    out["links"]["gallery"] = f"seed_{seeds[0]}/{report_lib.GALLERY}"
  report_lib.write(workdir, out)
  return out


def _run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict | None:
  return run_seeds(cfg, workdir) if cfg.eval.seeds else _train_and_report(cfg, workdir)


def compare(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict | None:
  """The image model and the text-only model of `cfg` on the same data, and one report of both."""
  workdir = pathlib.Path(workdir)
  base = _shared_data(cfg, workdir)
  runs = {}
  for name, text_only in ((MODEL, False), (TEXT_ONLY, True)):
    sub = copy.deepcopy(base)
    sub.pixrec.text_only = text_only
    runs[name] = _run(sub, workdir / name)
  if jax.process_index():
    return None
  images, text = runs[MODEL], runs[TEXT_ONLY]
  models = {MODEL: images["models"][MODEL], TEXT_ONLY: text["models"]["pixrec_text_only"]}
  models.update({k: v for k, v in images["models"].items() if k != MODEL})  # baselines: the image model's items
  out = {k: v for k, v in images.items() if k not in ("models", "links", "title", "text_only")}
  out["title"] = f"PixRec with images vs text only, {workdir.name}"
  out["models"] = models
  image_metrics, text_metrics = models[MODEL]["metrics"], models[TEXT_ONLY]["metrics"]
  out["ratio_images_to_text"] = {k: (image_metrics[k] / text_metrics[k] if text_metrics[k] else None)
                                 for k in image_metrics}
  out["links"] = {f"{name} report": f"{name}/{report_lib.REPORT_MD}" for name in runs}
  report_lib.write(workdir, out)
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    cfg, workdir = config_lib.parse_args(argv)
    host_memory.prepare(cfg.cpu.reuse_step_memory)  # as pixrec_jax.main, before jax makes its CPU client
    distributed.maybe_initialize(cfg)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if workdir is None:
    print("error: --workdir is required: the comparison writes two runs and a report there", file=sys.stderr)
    return 2
  from pixrec_jax.train import checkpoint, run  # pylint: disable=import-outside-toplevel

  try:
    out = compare(cfg, workdir)
  except Preempted as e:
    print(f"pixrec_jax: {e}", flush=True)
    return 0
  except (ValueError, run.NonFiniteLossError, checkpoint.CheckpointMismatchError,
          checkpoint.NonFiniteStateError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if out is not None:
    print(report_lib.markdown(out))
    print(f"wrote {pathlib.Path(workdir) / report_lib.REPORT_MD}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

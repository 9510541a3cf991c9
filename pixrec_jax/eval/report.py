"""Per-run reports: report.json, report.md (model x metric), recall_ndcg.png, gallery.html.

A report compares models on one split (test, when evaluated): the trained model, the
baselines of eval.baselines (pixrec_jax.eval.baselines) and, from
`python -m pixrec_jax.compare`, the text-only model. Each model has its metrics, its
Recall@K / NDCG@K curve and its cold-start slice (cases whose target no training
sequence holds). Several seeds (eval.seeds) aggregate into the mean and the sample
standard deviation (n - 1) of every metric.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from pixrec_jax.eval import baselines, gallery, ranking

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "recall_ndcg.png"
GALLERY = "gallery.html"


def model_entry(metrics: dict[str, float], split_report: dict) -> dict:
  """A model's block of a report, from evaluate()'s metrics and report of one split."""
  return {"metrics": metrics, "curve": split_report.get("curve"), "cold_start": split_report.get("cold_start")}


def _cell(value: Any, std: Any = None) -> str:
  if value is None:
    return "n/a"
  if std is None:
    return f"{value:.4f}"
  return f"{value:.4f} ± {std:.4f}"


def markdown(report: dict) -> str:
  """The report as Markdown: a model x metric table, then the cold-start slice."""
  models = report["models"]
  keys = list(next(iter(models.values()))["metrics"])
  seeds = report.get("seeds")
  lines = [f"# {report.get('title', 'PixRec evaluation')}", "",
           f"Split `{report['split']}`: {report['users']} users, {report['catalogue_items']} catalogue items ranked, "
           f"history {'masked' if report['mask_history'] else 'not masked'}, ties counted against the target."]
  if seeds:
    lines.append(f"Seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation (n - 1).")
  lines += ["", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, m in models.items():
    std = m.get("std") or {}
    lines.append(f"| {name} | " + " | ".join(_cell(m["metrics"].get(k), std.get(k)) for k in keys) + " |")
  ratio = report.get("ratio_images_to_text")
  if ratio:
    lines.append("| images / text only | " + " | ".join("n/a" if ratio.get(k) is None else f"{ratio[k]:.2f}x"
                                                         for k in keys) + " |")
  cold = {name: m.get("cold_start") for name, m in models.items() if m.get("cold_start") is not None}
  if cold:
    users = next(iter(cold.values()))["users"]
    lines += ["", f"Cold start, the cases whose target no training sequence holds: {users} of {report['users']}.", ""]
    lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, c in cold.items():
      metrics, std = c["metrics"] or {}, c.get("std") or {}
      lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(k), std.get(k)) for k in keys) + " |")
  for name, path in report.get("links", {}).items():
    lines.append(f"\n{name}: [{path}]({path})")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str | pathlib.Path) -> pathlib.Path:
  """Recall@K and NDCG@K against K, one line per model."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, metric in zip(axes, ("recall", "ndcg")):
    for name, m in report["models"].items():
      curve = m.get("curve")
      if curve:
        ax.plot(curve["k"], curve[metric], marker="o", label=name)
    ax.set_xscale("log")
    ks = next((m["curve"]["k"] for m in report["models"].values() if m.get("curve")), [])
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("K")
    ax.set_ylabel(f"{'Recall' if metric == 'recall' else 'NDCG'}@K")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"{report['split']}: {report['users']} users, {report['catalogue_items']} items")
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write(directory: str | pathlib.Path, report: dict) -> dict[str, pathlib.Path]:
  """report.json, report.md and recall_ndcg.png in `directory`."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / REPORT_JSON).write_text(json.dumps(report, indent=2))
  (directory / REPORT_MD).write_text(markdown(report), encoding="utf-8")
  return {"json": directory / REPORT_JSON, "md": directory / REPORT_MD, "plot": plot(report, directory / PLOT)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return float(np.mean(values)), std


def _aggregate_metrics(blocks: Sequence[dict | None]) -> tuple[dict | None, dict | None]:
  if any(b is None for b in blocks):
    return None, None
  pairs = {k: _mean_std([b[k] for b in blocks]) for k in blocks[0]}
  return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}


def aggregate_seeds(reports: Sequence[dict], seeds: Sequence[int]) -> dict:
  """One report of several seeds' reports (same split and models): per model and metric the mean
  ("metrics") and the sample standard deviation ("std"); curves averaged; the cold-start slice
  likewise (its users are the same in every seed: the split does not depend on the seed)."""
  if len(reports) != len(seeds) or not reports:
    raise ValueError(f"{len(reports)} reports for seeds {list(seeds)}")
  first = reports[0]
  out = {k: v for k, v in first.items() if k not in ("models", "links")}
  out["seeds"] = list(seeds)
  out["models"] = {}
  for name in first["models"]:
    missing = [s for s, r in zip(seeds, reports) if name not in r["models"]]
    if missing:
      raise ValueError(f"model {name!r} is missing from the report of seed(s) {missing}")
    runs = [r["models"][name] for r in reports]
    mean, std = _aggregate_metrics([m["metrics"] for m in runs])
    entry = {"metrics": mean, "std": std, "per_seed": [m["metrics"] for m in runs]}
    if all(m.get("curve") for m in runs):
      curve = runs[0]["curve"]
      entry["curve"] = {"k": curve["k"], **{key: np.mean([m["curve"][key] for m in runs], axis=0).tolist()
                                            for key in ("recall", "ndcg")}}
    if all(m.get("cold_start") is not None for m in runs):
      c_mean, c_std = _aggregate_metrics([m["cold_start"]["metrics"] for m in runs])
      entry["cold_start"] = {"users": runs[0]["cold_start"]["users"], "metrics": c_mean, "std": c_std}
    out["models"][name] = entry
  return out


def _json_safe(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x.item() if hasattr(x, "item") else x


def run_report(job, state, results: dict, reports: dict, item_emb: np.ndarray,
               settings: ranking.EvalSettings, generative: dict | None = None) -> dict | None:
  """The report of a trained run on its test split (or the last evaluated one): the model, the
  same model under the paper's generative protocol when `generative` ({split: (metrics, report)})
  has that split, the baselines of eval.baselines, the plot and the gallery of eval.gallery_users
  sampled users, written to the work directory by process 0. Every process calls it (the
  gallery's users are embedded by all). `job` is a train.run.Job."""
  cfg = job.cfg
  if not results:
    return None
  split = "test" if "test" in results else list(results)[-1]
  cases = {"valid": job.splits.valid, "test": job.splits.test}[split]
  name = "pixrec_text_only" if job.text_only else "pixrec"
  models = {name: model_entry(results[split], reports[split])}
  if generative and split in generative:  # no curve or cold-start slice: those are dense-ranking figures
    metrics, gen_report = generative[split]
    label = f"{name} (generative, {gen_report['users']} users)" if "users" in gen_report else f"{name} (generative)"
    models[label] = {"metrics": metrics, "curve": None, "cold_start": None}
  models.update(baselines.evaluate(tuple(cfg.eval.baselines), cases, job.splits, item_emb, settings.mask_history))
  split_report = reports[split]
  report = {"title": f"PixRec evaluation, {job.workdir.name}", "split": split, "users": split_report["users"],
            "catalogue_items": split_report["catalogue_items"], "mask_history": settings.mask_history,
            "step": int(jax.device_get(state.step)), "seed": cfg.seed, "text_only": job.text_only, "models": models}
  page = None
  if cfg.eval.gallery_users > 0:
    chosen = gallery.sample_cases(cases, cfg.eval.gallery_users, cfg.seed)
    sampled = [cases[i] for i in chosen]
    users = ranking.user_embeddings(job.trainer.graphdef, (state.params, state.frozen), job.builder, sampled,
                                    job.mesh, settings, "embed gallery users")
    ranked = ranking.rank_cases(users, item_emb, sampled, settings.mask_history,
                                top_k=min(cfg.eval.top_k, item_emb.shape[0]))
    user_ids = [job.dataset.users[c.user_index].user_id for c in sampled]
    page = gallery.render(job.dataset, sampled, ranked.ranks, ranked.top_ids, ranked.top_scores,
                          f"{name} on {split}: top {ranked.top_ids.shape[1]} of {item_emb.shape[0]} items",
                          user_ids)
    report["links"] = {"gallery": GALLERY}
  report = _json_safe(report)
  if job.is_main:
    write(job.workdir, report)
    if page is not None:
      gallery.write(job.workdir / GALLERY, page)
  return report

"""Top-K recommendations from a trained run, and the catalogue's embeddings for an ANN index.

  python -m pixrec_jax.recommend --workdir W --items 3,17,42 [--k 10] [--json]
  python -m pixrec_jax.recommend --workdir W --histories users.jsonl [--k 10] [--json]
  python -m pixrec_jax.recommend embed-catalog --workdir W --out DIR

A history is item ids, oldest first; a histories file has one JSON object a line,
{"user_id": "...", "items": [3, 17, 42]} ("user_id" optional). Each is read by the
user tower as evaluation reads a held-out case's history, and every catalogue item
is scored by cosine similarity with it, so the top K are the items evaluation would
rank first: ties go to the lower item id, and items of the history are left out
when the run's eval.mask_history is on (--mask-history / --no-mask-history
override it).

The catalogue is embedded once per checkpoint into WORKDIR/index/step_<N> and read
from there afterwards. `embed-catalog` writes the same files to DIR:
  embeddings.npy  (num_items, P) float32, row i = item i, unit length (inner
                  product = cosine), loadable with numpy.load(allow_pickle=False)
  items.jsonl     row order: {"row", "item_id", "title"}
  meta.json       the checkpoint step, sizes, the similarity, a fingerprint
The checkpoint step defaults to "best" (the latest if none was validated).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import shutil
import sys
import uuid
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.eval import ranking
from pixrec_jax.train import checkpoint, run

INDEX_DIR = "index"
INDEX_FORMAT = "pixrec_jax.catalog_index"


@dataclasses.dataclass(frozen=True)
class Index:
  embeddings: np.ndarray  # (num_items, P) float32 unit rows
  titles: list[str]
  meta: dict


def _settings(trained: run.Trained, progress: bool = True) -> ranking.EvalSettings:
  """The run's evaluation settings (with the feature table its training left, where restore_trained found it:
  the towers then read the frozen tower's features, not pixels, to the same embeddings)."""
  return dataclasses.replace(run.eval_settings(trained.job), progress=progress)


def _fingerprint(trained: run.Trained, workdir: pathlib.Path) -> str:
  """Changes when the weights (the step's commit record) or the catalogue (the dataset manifest) do."""
  h = hashlib.sha256()
  h.update((workdir / checkpoint.CHECKPOINT_DIR / str(trained.step) / "_CHECKPOINT_METADATA").read_bytes())
  h.update(json.dumps(trained.job.dataset.manifest, sort_keys=True).encode())
  h.update(trained.job.cfg.data.template.encode())
  return h.hexdigest()


def _title(item) -> str:
  return str(item.fields.get("title", ""))


def build_index(trained: run.Trained, workdir: pathlib.Path) -> Index:
  """Every catalogue item's item-tower embedding, as evaluation computes it."""
  job = trained.job
  emb = ranking.catalog_embeddings(job.trainer.graphdef, (trained.params, trained.frozen), job.builder,
                                   run.item_input_keys(job), job.mesh, _settings(trained))
  emb = np.asarray(emb, np.float32)
  meta = {"format": INDEX_FORMAT, "version": 1, "step": trained.step, "num_items": int(emb.shape[0]),
          "dim": int(emb.shape[1]), "similarity": "cosine (rows have unit length: inner product)",
          "fingerprint": _fingerprint(trained, workdir)}
  return Index(emb, [_title(item) for item in job.dataset.items], meta)


def write_index(index: Index, directory: pathlib.Path) -> None:
  """The index files, written beside `directory` and renamed into place (never half written)."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex}"
  tmp.mkdir()
  try:
    np.save(tmp / "embeddings.npy", index.embeddings, allow_pickle=False)
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
      for row, title in enumerate(index.titles):
        f.write(json.dumps({"row": row, "item_id": row, "title": title}) + "\n")
    (tmp / "meta.json").write_text(json.dumps(index.meta, indent=2))
    if directory.exists():
      shutil.rmtree(directory)
    tmp.rename(directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def read_index(directory: pathlib.Path) -> Index | None:
  """The index in `directory`, or None if there is none (or an incomplete one)."""
  try:
    meta = json.loads((directory / "meta.json").read_text())
    emb = np.load(directory / "embeddings.npy", allow_pickle=False)
    titles = [json.loads(line)["title"] for line in (directory / "items.jsonl").read_text().splitlines()]
  except (FileNotFoundError, json.JSONDecodeError, ValueError, KeyError):
    return None
  if meta.get("format") != INDEX_FORMAT or emb.shape != (meta.get("num_items"), meta.get("dim")):
    return None
  return Index(emb, titles, meta)


def cached_index(trained: run.Trained, workdir: pathlib.Path) -> tuple[Index, bool]:
  """(the catalogue index of trained's step, whether it came from the cache)."""
  directory = workdir / INDEX_DIR / f"step_{trained.step}"
  index = read_index(directory)
  if index is not None and index.meta.get("fingerprint") == _fingerprint(trained, workdir):
    return index, True
  index = build_index(trained, workdir)
  if trained.job.is_main:
    write_index(index, directory)
  return index, False


def check_history(items: Sequence, num_items: int, where: str) -> np.ndarray:
  if not isinstance(items, (list, tuple)) or not items:
    raise ValueError(f"{where}: a history is a non-empty list of item ids, got {items!r}")
  bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_items]
  if bad:
    raise ValueError(f"{where}: item ids must be integers in [0, {num_items}), got {bad[:5]}")
  return np.asarray(items, np.int32)


@functools.partial(jax.jit, static_argnames="k")
def _top_k(users, items, history, mask_history, k):
  # The same product and masking as ranking._ranks: the order equals evaluation's. Exact top k on
  # device (equal scores: the lower item id first), so only (users, k) comes back to the host.
  scores = users @ items.T
  rows = jnp.arange(users.shape[0])[:, None]
  masked = scores.at[rows, history].set(-jnp.inf, mode="drop")
  top_scores, top_ids = jax.lax.top_k(jnp.where(mask_history, masked, scores), k)
  return top_ids, top_scores


def recommend(trained: run.Trained, index: Index, histories: Sequence[np.ndarray], k: int,
              mask_history: bool) -> list[list[tuple[int, float]]]:
  """For each history, the top k (item id, score), best first; equal scores by item id."""
  job = trained.job
  # No target: the user tower reads the history alone, as for a held-out case.
  cases = [EvalCase(user_index=-1, history=h, target=-1) for h in histories]
  users = ranking.user_embeddings(job.trainer.graphdef, (trained.params, trained.frozen), job.builder, cases,
                                  job.mesh, _settings(trained, progress=False), "embed histories")
  n = index.embeddings.shape[0]
  width = max(len(h) for h in histories)
  padded = np.full((len(histories), width), n, np.int32)  # n: out of range, dropped by the scatter
  for i, h in enumerate(histories):
    padded[i, :len(h)] = h
  top_ids, top_scores = jax.device_get(_top_k(jnp.asarray(users, jnp.float32), jnp.asarray(index.embeddings),
                                              jnp.asarray(padded), jnp.asarray(mask_history), k=min(k, n)))
  return [[(int(i), float(s)) for i, s in zip(ids, scores) if np.isfinite(s)]
          for ids, scores in zip(top_ids.tolist(), top_scores.tolist())]


def _read_histories(path: pathlib.Path, num_items: int) -> list[tuple[str, np.ndarray]]:
  out = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
      if not isinstance(record, dict) or "items" not in record:
        raise ValueError(f"{where}: expected an object with 'items' (and optionally 'user_id')")
      out.append((str(record.get("user_id", f"line {number}")), check_history(record["items"], num_items, where)))
  if not out:
    raise ValueError(f"{path}: no histories")
  return out


def _print_text(user: str | None, history: np.ndarray, recs, titles: list[str]) -> None:
  print((f"user {user}, " if user else "") + f"history: {', '.join(map(str, history.tolist()))}")
  print(f"{'rank':>4}  {'item_id':>7}  {'score':>8}  title")
  for rank, (item, score) in enumerate(recs, start=1):
    print(f"{rank:>4}  {item:>7}  {score:>8.4f}  {titles[item]}")


def _recommend_main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixrec_jax.recommend", description=__doc__.split("\n\n")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the training run's work directory")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--items", help="one history: comma-separated item ids, oldest first")
  source.add_argument("--histories", help="a JSON lines file of {'user_id', 'items'}")
  parser.add_argument("--k", type=int, default=10, help="how many items to list (default 10)")
  parser.add_argument("--step", default="best", help="'best' (default), 'latest' or a checkpoint step")
  parser.add_argument("--json", action="store_true", help="one JSON object a line instead of a table")
  mask = parser.add_mutually_exclusive_group()
  mask.add_argument("--mask-history", dest="mask_history", action="store_true", default=None,
                    help="leave the history's items out (default: the run's eval.mask_history)")
  mask.add_argument("--no-mask-history", dest="mask_history", action="store_false")
  args = parser.parse_args(argv)
  if args.k < 1:
    parser.error("--k must be at least 1")
  workdir = pathlib.Path(args.workdir)
  trained = run.restore_trained(workdir, args.step)
  num_items = trained.job.dataset.num_items
  if args.items is not None:
    try:
      ids = [int(x) for x in args.items.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"--items must be comma-separated integers, got {args.items!r}") from None
    users = [(None, check_history(ids, num_items, "--items"))]
  else:
    users = _read_histories(pathlib.Path(args.histories), num_items)
  index, cached = cached_index(trained, workdir)
  table = trained.job.features_table
  print(f"checkpoint step {trained.step} ({trained.why}); catalogue of {num_items} items "
        f"{'from' if cached else 'embedded into'} {workdir / INDEX_DIR / f'step_{trained.step}'}"
        + (f"; image features from {table.path}" if table is not None else ""), file=sys.stderr)
  mask_history = trained.job.cfg.eval.mask_history if args.mask_history is None else args.mask_history
  results = recommend(trained, index, [h for _, h in users], args.k, mask_history)
  for (user, history), recs in zip(users, results):
    if args.json:
      print(json.dumps({"user_id": user, "history": history.tolist(), "recommendations": [
          {"rank": r, "item_id": i, "score": s, "title": index.titles[i]} for r, (i, s) in enumerate(recs, 1)]}))
    else:
      _print_text(user, history, recs, index.titles)
  return 0


def _embed_catalog_main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixrec_jax.recommend embed-catalog",
                                   description="Writes every catalogue item's embedding for an external ANN index.")
  parser.add_argument("--workdir", required=True, help="the training run's work directory")
  parser.add_argument("--out", required=True, help="the folder to write (embeddings.npy, items.jsonl, meta.json)")
  parser.add_argument("--step", default="best", help="'best' (default), 'latest' or a checkpoint step")
  args = parser.parse_args(argv)
  workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  if out.resolve() in (workdir.resolve(), *workdir.resolve().parents):
    raise ValueError(f"--out {out} would replace the run's work directory")
  trained = run.restore_trained(workdir, args.step)
  index, _ = cached_index(trained, workdir)
  write_index(index, out)
  print(f"wrote {index.meta['num_items']} x {index.meta['dim']} embeddings of checkpoint step {trained.step} "
        f"({trained.why}) to {out}")
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    if argv and argv[0] == "embed-catalog":
      return _embed_catalog_main(argv[1:])
    return _recommend_main(argv)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())

"""A self-contained HTML page that shows what the model recommends to a few test users.

For each sampled user: the history (images and titles, oldest first), the top K
recommended items with their scores, and the true next item; the true next item is
outlined wherever it appears (class "target"). Images are embedded as base64 PNG
thumbnails, so the page is one file that opens anywhere; an item without an image
shows its title only.
"""

from __future__ import annotations

import base64
import html
import io
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from pixrec_jax.data.catalog import Dataset, EvalCase

THUMBNAIL = 96  # pixels, longest edge

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
section.user { border-top: 1px solid #ccc; padding: 0.5em 0; }
.row { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
figure { width: 110px; margin: 0; padding: 3px; border: 3px solid transparent; font-size: 11px; }
figure img { width: 96px; height: 96px; object-fit: contain; background: #f4f4f4; }
figure.target { border-color: #2a9d3a; background: #e8f7ea; }
.noimage { width: 96px; height: 96px; background: #eee; display: flex; align-items: center;
           justify-content: center; text-align: center; font-size: 10px; }
h3 { margin: 0.4em 0 0.2em; font-size: 13px; }
"""


def sample_cases(cases: Sequence[EvalCase], n: int, seed: int) -> list[int]:
  """Indices of `n` cases drawn without replacement by `seed` (all of them when there are fewer)."""
  rng = np.random.default_rng(seed)
  n = min(n, len(cases))
  return sorted(rng.choice(len(cases), n, replace=False).tolist())


class _Thumbnails:
  """Each item's thumbnail as a data: URL, made once per page."""

  def __init__(self, dataset: Dataset):
    self.dataset = dataset
    self.urls: dict[int, str | None] = {}

  def __call__(self, item: int) -> str | None:
    if item not in self.urls:
      path = self.dataset.image_path(item)
      if path is None:
        self.urls[item] = None
      else:
        with Image.open(path) as image:
          image = image.convert("RGB")
          image.thumbnail((THUMBNAIL, THUMBNAIL))
          buffer = io.BytesIO()
          image.save(buffer, format="PNG")
        self.urls[item] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return self.urls[item]


def _title(dataset: Dataset, item: int) -> str:
  return str(dataset.items[item].fields.get("title", f"item {item}"))


def _figure(dataset: Dataset, thumbs: _Thumbnails, item: int, caption: str, target: bool) -> str:
  title = html.escape(_title(dataset, item))
  url = thumbs(item)
  picture = f'<img src="{url}" alt="{title}">' if url else f'<div class="noimage">{title}</div>'
  css = ' class="target"' if target else ""
  return f'<figure{css}>{picture}<figcaption>{html.escape(caption)}<br>{title}</figcaption></figure>'


def render(dataset: Dataset, cases: Sequence[EvalCase], ranks: np.ndarray, top_ids: np.ndarray,
           top_scores: np.ndarray, title: str, user_ids: Sequence[str] | None = None) -> str:
  """The page for `cases` with their target ranks and top-K (ids, scores), best first."""
  thumbs = _Thumbnails(dataset)
  parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p>{len(cases)} sampled users. Outlined in green: the true next item.</p>"]
  for i, case in enumerate(cases):
    user = user_ids[i] if user_ids is not None else str(case.user_index)
    history = "".join(_figure(dataset, thumbs, int(item), f"#{j + 1}", False)
                      for j, item in enumerate(case.history.tolist()))
    recs = "".join(_figure(dataset, thumbs, int(item), f"{rank}. score {score:.3f}", int(item) == case.target)
                   for rank, (item, score) in enumerate(zip(top_ids[i].tolist(), top_scores[i].tolist()), start=1)
                   if np.isfinite(score))
    target = _figure(dataset, thumbs, case.target, f"rank {int(ranks[i])}", True)
    parts.append(f'<section class="user"><h2>user {html.escape(user)}</h2>'
                 f'<h3>history (oldest first)</h3><div class="row">{history}</div>'
                 f'<h3>top {top_ids.shape[1]} recommended</h3><div class="row">{recs}</div>'
                 f'<h3>true next item</h3><div class="row">{target}</div></section>')
  parts.append("</body></html>")
  return "".join(parts)


def write(path: str | pathlib.Path, page: str) -> pathlib.Path:
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.partial")
  tmp.write_text(page, encoding="utf-8")
  tmp.replace(path)
  return path

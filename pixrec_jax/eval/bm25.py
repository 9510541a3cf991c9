"""BM25 from generated text to catalogue items, and the paper's fusion over beams.

The catalogue's texts (the rendered item templates the model reads and learns to
write) are indexed by bm25s (Lucene's BM25, k1 = 1.5, b = 0.75). Catalogue texts
and generations are tokenised the same way, by bm25s' own tokenizer: lower case,
words of two or more letters or digits (`\\b\\w\\w+\\b`), English stop words
dropped, no stemming. Not the backbone's tokenizer: BM25 wants words, and
sub-word pieces would make every shared prefix a match.

Scores are by item id: items that share a text get the same score and are all
candidates, so ties between them are resolved by the ranking's pessimistic rule.
"""

from __future__ import annotations

import logging
from typing import Sequence

import bm25s
import numpy as np

STOPWORDS = "en"
logging.getLogger("bm25s").setLevel(logging.WARNING)  # its index build logs at DEBUG under absl's root level


def tokenize(texts: Sequence[str]) -> list[list[str]]:
  """The words BM25 compares, for catalogue texts and generations alike."""
  return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class CatalogIndex:
  """A BM25 index over every catalogue item's text, item i = document i."""

  def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
    if not len(texts):
      raise ValueError("CatalogIndex: the catalogue has no items to index")
    self.num_items = len(texts)
    self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    self.retriever.index(bm25s.tokenize(list(texts), stopwords=STOPWORDS, show_progress=False),
                         show_progress=False)

  def scores(self, query: str) -> np.ndarray:
    """(num_items,) float32 BM25 scores of every item for one text; all zero when the text has
    no indexable word."""
    words = tokenize([query])[0]
    if not words:
      return np.zeros(self.num_items, np.float32)
    return np.asarray(self.retriever.get_scores(words), np.float32)


def min_max(scores: np.ndarray) -> np.ndarray:
  """Each row scaled to [0, 1] by its own min and max (the paper's per-query scaling); a constant
  row (no word matched anything) scales to all zero."""
  scores = np.asarray(scores, np.float32)
  low = scores.min(axis=-1, keepdims=True)
  span = scores.max(axis=-1, keepdims=True) - low
  return np.where(span > 0, (scores - low) / np.where(span > 0, span, 1), np.float32(0)).astype(np.float32)


def fuse(scores: np.ndarray, beam_scores: np.ndarray, eps: float) -> np.ndarray:
  """The paper's item score from G generations: max over g of min_max(scores[g]) * exp(eps * beam_scores[g]).

  scores: (G, num_items) BM25 scores of each generation; beam_scores: (G,) their beam-search scores.
  """
  scores = np.asarray(scores, np.float32)
  beam_scores = np.asarray(beam_scores, np.float32)
  if scores.ndim != 2 or beam_scores.shape != scores.shape[:1]:
    raise ValueError(f"fuse: scores must be (G, N) and beam_scores (G,), got {scores.shape} and {beam_scores.shape}")
  weights = np.exp(np.float32(eps) * beam_scores).astype(np.float32)
  return (min_max(scores) * weights[:, None]).max(axis=0)


def target_rank(scores: np.ndarray, target: int, history: Sequence[int] = (), mask_history: bool = True) -> int:
  """Rank (1 = first) of `target` among all items by `scores`, ties pessimistic: 1 + the items scoring
  higher + the other items scoring the same. With mask_history, the history's items score -inf
  (as dense ranking does)."""
  scores = np.asarray(scores, np.float32).copy()
  if mask_history and len(history):
    scores[np.asarray(history, np.int64)] = -np.inf
  t = scores[target]
  return int(1 + np.sum(scores > t) + np.sum(scores == t) - 1)

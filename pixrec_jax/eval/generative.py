"""The paper's generative evaluation protocol, in JAX, with the reference code's flaws fixed.

For each held-out case (the same leave-one-out cases dense ranking reads: the
target is never in the prompt), the backbone continues the history-only prompt
by beam search (pixrec_jax.eval.generate), writing the next item's text. Every
beam's text is scored against every catalogue text by BM25 (pixrec_jax.eval.bm25);
each beam's scores are min-max scaled, weighted by exp(eps * beam score), and the
item's score is the max over beams. Items are then ranked by item id, as dense
ranking ranks them: every beam counts (in beam order; none is dropped by a set),
items sharing a text are all candidates with the same score, ties count against
the target, and the history is masked when eval.mask_history is on. Recall@K,
NDCG@K and MRR come from the target's rank, as for dense ranking.

Generation runs on one process (every input is on the host); a multi-process job
evaluates the dense protocol only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from pixrec_jax.data import features
from pixrec_jax.data.catalog import EvalCase
from pixrec_jax.data.examples import PromptBuilder
from pixrec_jax.eval import bm25
from pixrec_jax.eval.generate import Beams, GenerationSettings, generate
from pixrec_jax.eval.metrics import metrics_from_ranks

PROTOCOLS = ("dense", "generative", "both")


@dataclasses.dataclass(frozen=True)
class GenerativeSettings:
  generation: GenerationSettings
  eps: float = 1 / 5000
  batch_size: int = 8
  max_users: int = 0
  mask_history: bool = True
  progress: bool = True
  # A frozen tower's feature table (data.features.FeatureTable, train.cache_image_features): the prompts'
  # image slots read its rows in place of encoding pixels.
  features: Any = dataclasses.field(default=None, compare=False)

  @classmethod
  def from_config(cls, gen: ml_collections.ConfigDict, layout_max_item_tokens: int, mask_history: bool,
                  progress: bool = True) -> "GenerativeSettings":
    for key in ("batch_size",):
      if gen[key] < 1:
        raise ValueError(f"eval.generative.{key} must be >= 1, got {gen[key]}")
    if gen.max_users < 0:
      raise ValueError(f"eval.generative.max_users must be >= 0 (0: all), got {gen.max_users}")
    generation = GenerationSettings(
        num_beams=gen.num_beams, max_new_tokens=gen.max_new_tokens or layout_max_item_tokens,
        repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
        early_stopping=gen.early_stopping, do_sample=gen.do_sample, temperature=gen.temperature, seed=gen.seed)
    return cls(generation.validate(), eps=gen.eps, batch_size=gen.batch_size, max_users=gen.max_users,
               mask_history=mask_history, progress=progress)


def check_protocol(protocol: str) -> str:
  if protocol not in PROTOCOLS:
    raise ValueError(f"eval.protocol must be one of {PROTOCOLS}, got {protocol!r}")
  return protocol


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def decode(tokenizer, beams: Beams) -> list[list[str]]:
  """Each case's beams as text, best first (special tokens, e.g. image tokens, left out)."""
  return [[tokenizer.decode(beams.tokens[i, k, :beams.lengths[i, k]].tolist(), skip_special_tokens=True)
           for k in range(beams.tokens.shape[1])] for i in range(beams.tokens.shape[0])]


def generate_for_cases(graphdef, states, builder: PromptBuilder, cases: Sequence[EvalCase],
                       settings: GenerativeSettings, mesh=None, what: str = "generate",
                       timings: dict | None = None) -> tuple[list, np.ndarray]:
  """(texts: per case its beams' texts, best first; beam scores (cases, num_beams)).

  Batches have a fixed size (the last is filled with the first case and cut), so the search
  compiles once; `timings` (when given) receives the first batch's seconds (with compilation).
  """
  tok = builder.tokenizer
  eos = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
  size = settings.batch_size
  padded = list(cases) + [cases[0]] * (-len(cases) % size)
  texts, scores = [], []
  began = time.perf_counter()
  for start in tqdm(range(0, len(padded), size), desc=what, unit="batch", disable=not settings.progress,
                    leave=False):
    batch = _stack([builder.user_example(c.history, settings.features) for c in padded[start:start + size]])
    cached = {k: v for k, v in batch.items() if k in (f"user_{f}" for f in features.TABLE_KEYS)}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      beams = generate((graphdef, states), batch["user_ids"], batch["user_mask"], settings.generation, eos,
                       builder.pad_id, batch.get("user_images"), batch.get("user_image_valid"), cached=cached)
    texts += decode(tok, beams)
    scores.append(beams.scores)
    if timings is not None and start == 0:
      timings["first_batch_seconds"] = time.perf_counter() - began
  return texts[:len(cases)], np.concatenate(scores)[:len(cases)]


def rank_generations(index: bm25.CatalogIndex, texts: Sequence[Sequence[str]], beam_scores: np.ndarray,
                     cases: Sequence[EvalCase], eps: float, mask_history: bool) -> np.ndarray:
  """Each case's target rank from its beams' texts and scores (see the module docstring)."""
  ranks = np.empty(len(cases), np.int64)
  for i, case in enumerate(cases):
    item_scores = bm25.fuse(np.stack([index.scores(t) for t in texts[i]]), beam_scores[i], eps)
    ranks[i] = bm25.target_rank(item_scores, int(case.target), case.history, mask_history)
  return ranks


def evaluate_split(graphdef, states, builder: PromptBuilder, cases: Sequence[EvalCase], index: bm25.CatalogIndex,
                   settings: GenerativeSettings, name: str, mesh=None) -> tuple[dict[str, float], dict]:
  """Metrics of the generative protocol for one split, and a report: users, users/s, settings and
  the first cases' generations."""
  if jax.process_count() > 1:
    raise ValueError("eval.protocol 'generative' runs on one process; use 'dense' in a multi-process job")
  if mesh is not None:
    shards = int(np.prod([mesh.shape.get(axis, 1) for axis in ("data", "fsdp")]))
    if settings.batch_size % shards:
      raise ValueError(f"eval.generative.batch_size={settings.batch_size} must be a multiple of the {shards} "
                       "devices a batch is split over (mesh data x fsdp)")
  if settings.max_users:
    cases = list(cases)[:settings.max_users]
  if not len(cases):
    raise ValueError(f"generative {name}: no cases to evaluate")
  start = time.perf_counter()
  timings = {}
  texts, beam_scores = generate_for_cases(graphdef, states, builder, cases, settings, mesh, f"generate {name}",
                                          timings)
  generated = time.perf_counter()
  ranks = rank_generations(index, texts, beam_scores, cases, settings.eps, settings.mask_history)
  seconds = time.perf_counter() - start
  first = min(settings.batch_size, len(cases))
  report = {
      "users": len(cases), "seconds": seconds, "generate_seconds": generated - start,
      "bm25_seconds": seconds - (generated - start), "users_per_second": len(cases) / seconds,
      # Without the first batch (compilation): the steady rate a longer evaluation approaches.
      "users_per_second_after_first_batch": ((len(cases) - first) / (seconds - timings["first_batch_seconds"])
                                             if len(cases) > first else None),
      "catalogue_items": index.num_items, "ties": "pessimistic",
      "mask_history": settings.mask_history, "eps": settings.eps,
      "generation": dataclasses.asdict(settings.generation),
      "examples": [{"target": int(c.target), "target_text": builder.item_texts[int(c.target)], "beams": texts[i][:3],
                    "rank": int(ranks[i])} for i, c in enumerate(cases[:3])],
  }
  return metrics_from_ranks(ranks), report

"""LoRA adapters (Hu et al. 2021) on the backbone's linear layers, chosen by name pattern.

`apply` attaches an adapter to every `layers.Linear` whose module path matches one
of `targets`: y = x W + (alpha / rank) * dropout(x) A B, with A (in, r) drawn like
a kaiming-uniform init and B (r, out) zero, so the adapted model starts equal to
the base. A Linear whose kernel is stacked over layers (L, in, out), as under a
scan over layers, gets stacked adapters (L, in, r) and (L, r, out), so that the
scan slices them with the kernel.

Adapter weights are `LoRAParam`, a subclass of `nnx.Param`: filters select them
by type (the trainer trains them and freezes the base). Dropout is off unless the
train step hands the model a key (`set_dropout_key`), so evaluation and export
never drop. `merge` folds the adapters into the base kernels (in float32) and
removes them, giving the plain model that export writes.

Patterns are over '/'-joined module paths ("backbone/text_model/layers/0/mlp/up_proj")
and match whole path components anywhere in the path: `*` is one component (or part
of one), `**/` any number of components, and the rest is a regular expression, so
"text_model/**/mlp/(gate|up|down)_proj" names the decoder's MLP linears with or
without a layer index.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixrec_jax.models import layers

# The PixRec paper's LoRA (its mode 2): r=8, alpha 8, dropout 0.1 on the decoder's MLP linears.
PAPER_TARGETS = ("text_model/**/mlp/(gate|up|down)_proj",)


class LoRAParam(nnx.Param):
  """An adapter weight: trains while the weights it adapts stay frozen."""


class DropoutKey(nnx.Variable):
  """A step's dropout key (raw uint32 key data), set inside the train step only."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 0  # 0: no adapters
  alpha: float = 8.0  # the update is scaled by alpha / rank
  dropout: float = 0.0  # on the adapter's input, in training only
  targets: tuple[str, ...] = PAPER_TARGETS

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def validate(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank must be >= 0 (0 turns LoRA off), got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
    if self.enabled and not self.targets:
      raise ValueError("lora.targets is empty: name the linear layers to adapt, e.g. " + repr(PAPER_TARGETS))

  @classmethod
  def from_config(cls, section) -> "LoRAConfig":
    """From a config's `lora` group (absent: LoRA off)."""
    if section is None:
      return cls()
    targets = section.get("targets", PAPER_TARGETS)
    if isinstance(targets, str):
      targets = (targets,)
    return cls(rank=int(section.get("rank", 0)), alpha=float(section.get("alpha", 8.0)),
               dropout=float(section.get("dropout", 0.0)), targets=tuple(targets))


def compile_pattern(pattern: str) -> re.Pattern:
  """A path pattern (see the module docstring) as a regex matching whole components."""
  if not isinstance(pattern, str) or not pattern.strip("/"):
    raise ValueError(f"empty path pattern {pattern!r}")
  body = pattern.strip("/").replace("**/", "\0").replace("*", "[^/]*").replace("\0", "(?:[^/]+/)*")
  try:
    return re.compile(f"(?:^|/){body}(?:/|$)")
  except re.error as e:
    raise ValueError(f"path pattern {pattern!r} is not a valid pattern: {e}") from None


def path_matcher(patterns: Sequence[str], what: str):
  """A predicate on '/'-joined paths, true where any pattern matches; `what` names the config key in errors."""
  compiled = []
  for p in patterns:
    try:
      compiled.append(compile_pattern(p))
    except ValueError as e:
      raise ValueError(f"{what}: {e}") from None
  return lambda path: any(c.search(path) for c in compiled)


def check_patterns_match(patterns: Sequence[str], paths: Iterable[str], what: str) -> None:
  """Fails naming every pattern of `what` that matches none of `paths`."""
  paths = list(paths)
  unmatched = [p for p in patterns if not any(compile_pattern(p).search(x) for x in paths)]
  if unmatched:
    examples = ", ".join(paths[:6])
    raise ValueError(f"{what}: pattern(s) {unmatched} match no parameter path (paths look like: {examples}, ...)")


def join(path: Sequence) -> str:
  return "/".join(str(p) for p in path)


class LoRA(nnx.Module):
  """The low-rank update of one Linear (or of a stack of them)."""

  def __init__(self, kernel: nnx.Variable, cfg: LoRAConfig, *, rngs: nnx.Rngs):
    *lead, d_in, d_out = kernel.shape
    axes = kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim
    lead_axes, in_axis, out_axis = tuple(axes[:-2]), axes[-2], axes[-1]
    dtype = kernel.dtype
    # kaiming-uniform(a=sqrt(5)) on A, as PEFT and torch.nn.Linear do: U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(rngs.params(), (*lead, d_in, cfg.rank), jnp.float32, -bound, bound)
    self.a = LoRAParam(a.astype(dtype), logical_axes=lead_axes + (in_axis, None))
    self.b = LoRAParam(jnp.zeros((*lead, cfg.rank, d_out), dtype), logical_axes=lead_axes + (None, out_axis))
    self.scale = cfg.scale
    self.dropout = cfg.dropout
    self.dropout_key = nnx.data(None)

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    if self.dropout > 0 and self.dropout_key is not None:
      key = jax.random.wrap_key_data(self.dropout_key[...])
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    h = jnp.dot(x.astype(dtype), self.a[...].astype(dtype))
    return jnp.dot(h, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

  def merged_kernel(self, kernel: jax.Array) -> jax.Array:
    """kernel + scale * A @ B in float32, in the kernel's dtype (leading stack dims kept)."""
    delta = jnp.matmul(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)) * self.scale
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def linears(model: nnx.Module) -> list[tuple[str, layers.Linear]]:
  return [(join(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, layers.Linear)]


def apply(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Attaches adapters to the Linear layers that `cfg.targets` name (in place; returns `model`).

  Every pattern must name at least one Linear, and a pattern naming another kind of
  module is an error: a typo would otherwise train no adapter at all.
  """
  cfg.validate()
  if not cfg.enabled:
    return model
  found = linears(model)
  check_patterns_match(cfg.targets, [p for p, _ in found], "lora.targets")
  match = path_matcher(cfg.targets, "lora.targets")
  for path, linear in found:
    if match(path):
      linear.lora = LoRA(linear.kernel, cfg, rngs=rngs)
  return model


def adapters(model: nnx.Module) -> list[LoRA]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRA)]


def set_dropout_key(model: nnx.Module, key: jax.Array) -> None:
  """Gives every adapter with dropout its own key derived from `key` (a typed key), for one forward pass.

  Stacked adapters get one key per layer. Without this call dropout is off.
  """
  for i, lora in enumerate(adapters(model)):
    if lora.dropout <= 0:
      continue
    lead = lora.a.shape[:-2]
    k = jax.random.fold_in(key, i)
    keys = jax.random.split(k, math.prod(lead)).reshape(lead) if lead else k
    lora.dropout_key = DropoutKey(jax.random.key_data(keys))


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel and removes it (in place; returns `model`)."""
  for _, linear in linears(model):
    if linear.lora is not None:
      linear.kernel.set_value(linear.lora.merged_kernel(linear.kernel[...]))
      linear.lora = None
  return model

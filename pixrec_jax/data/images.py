"""Image loading and preprocessing for the vision tower.

An image becomes a (C, H, W) float32 array at the tower's square resolution:
RGB, resized to image_size x image_size, rescaled to [0, 1] and normalised with
the SigLIP mean and standard deviation (0.5). Decoded images are cached per item,
since the same catalogue images recur in many histories.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np
from PIL import Image

# Decoding more pixels than this is refused (decompression bombs).
MAX_PIXELS = 64_000_000


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  size: int
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)

  def blank(self) -> np.ndarray:
    return np.zeros((3, self.size, self.size), np.float32)


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
  image = image.convert("RGB")
  if image.size != (spec.size, spec.size):
    image = image.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
  x = np.asarray(image, dtype=np.float32) / 255.0
  x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
  return np.ascontiguousarray(x.transpose(2, 0, 1))


def load(path: str | pathlib.Path, spec: ImageSpec) -> np.ndarray:
  with Image.open(path) as image:
    if image.width * image.height > MAX_PIXELS:
      raise ValueError(f"{path}: {image.width}x{image.height} pixels exceeds the limit of {MAX_PIXELS}")
    return preprocess(image, spec)


class ImageStore:
  """Preprocessed images by item id, decoded once per process (an LRU cache)."""

  def __init__(self, paths: list[pathlib.Path | None], spec: ImageSpec, cache_size: int = 4096):
    self.paths = paths
    self.spec = spec
    self._get = functools.lru_cache(maxsize=cache_size)(self._load)

  def _load(self, item_id: int) -> np.ndarray:
    return load(self.paths[item_id], self.spec)

  def has_image(self, item_id: int) -> bool:
    return self.paths[item_id] is not None

  def get(self, item_id: int) -> np.ndarray:
    if self.paths[item_id] is None:
      raise ValueError(f"item {item_id} has no image")
    return self._get(item_id)

  def __getstate__(self):
    # The cache is per process; workers start empty.
    return {"paths": self.paths, "spec": self.spec, "cache_size": self._get.cache_info().maxsize}

  def __setstate__(self, state):
    self.__init__(state["paths"], state["spec"], state["cache_size"])

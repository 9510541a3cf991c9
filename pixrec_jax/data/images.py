"""Image preprocessing for the vision tower, as each backbone family's Hugging Face
image processor does it: Idefics3's (SmolVLM) or SigLIP's (PaliGemma).

`preprocess` follows the processor's PIL backend step for step, so its pixels equal
the Hugging Face processor's within float32 rounding (tests/test_processors.py and
tests/test_processors_paligemma.py check 1e-5). `ImageSpec.processor` names which:

idefics3 (Idefics3ImageProcessor):
  1. RGB, transparency composited onto white, as the processor does.
  2. do_resize: the longest edge to size.longest_edge (up or down), the aspect kept,
     the other edge rounded to even; no edge above 4096 px.
  3. do_image_splitting: both edges up to multiples of the tile side M (aspect kept),
     cut into rows x cols tiles of M x M, row by row, then the whole image squashed
     to M x M (the global image). An image no larger than M x M is not split
     (rows = cols = 0). Without splitting: the image squashed to M x M, alone.
  4. rescale (x * rescale_factor) and normalise ((x - mean) / std) in float32.
siglip (SiglipImageProcessor, PaliGemma's): step 1, then the image squashed to
  size.height x size.width (one resize, the aspect not kept; both must be M, as the
  tower is square), then step 4. Never split: one tile per image.
Every resize is PIL's, on 8-bit RGB, with the processor's filter. An image becomes
`Tiles`: (rows * cols + 1, 3, M, M) float32, the global image last, which is the
order of the image blocks in the prompt (see examples.py).

Step 4 is one function of each channel's 8-bit value, so `preprocess_raw` stops before
it (uint8 tiles, a quarter of the bytes), `normalize` applies it, and `pixel_lut` is
its table (3, 256): `pixel_lut(spec)[c, raw]` equals `normalize(raw, spec)` bit for bit.
`ImageStore` caches uint8 tiles; packed training batches carry them with the table and
the train step looks the floats up on the device (pipeline.pack_images).

The synthetic demo is the Idefics3 path with splitting off and size.longest_edge = M:
its square M x M images pass both resizes unchanged.

Static shapes: `ImageSpec.tile_budget` bounds rows * cols. An image that would be
split into more tiles is processed as if size.longest_edge were the largest
multiple of M for which it fits (what the Hugging Face processor gives with that
size) instead of being rejected, since a catalogue's image sizes are not ours to
choose.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import threading
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

# Decoding more pixels than this is refused (decompression bombs).
MAX_PIXELS = 64_000_000
# transformers' Idefics3 bound on the resized image's longest edge.
MAX_IMAGE_SIZE = 4096
# Our name for each Hugging Face image processor we reproduce, by its image_processor_type.
SUPPORTED_PROCESSORS = {"Idefics3ImageProcessor": "idefics3", "SiglipImageProcessor": "siglip"}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """Image-processor settings, named as in its preprocessor_config.json (see the module docstring)."""

  size: int  # the tile side, the vision tower's image_size: max_image_size.longest_edge, or siglip's size
  do_resize: bool = True
  longest_edge: int = 0  # idefics3's size.longest_edge; 0 (with do_resize): `size`, one tile
  do_image_splitting: bool = False
  max_tiles: int = 0  # split tiles per image at most; 0: as many as the resize allows
  resample: int = int(Image.Resampling.LANCZOS)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)
  do_convert_rgb: bool = True
  processor: str = "idefics3"  # a value of SUPPORTED_PROCESSORS

  def __post_init__(self):
    idefics3 = self.processor == "idefics3"
    if idefics3 and self.do_resize and not self.longest_edge:
      object.__setattr__(self, "longest_edge", self.size)
    checks = (
        (self.processor in SUPPORTED_PROCESSORS.values(),
         f"processor must be one of {sorted(SUPPORTED_PROCESSORS.values())}"),
        (self.size >= 1, "size (max_image_size.longest_edge) must be positive"),
        (self.longest_edge >= 0, "longest_edge must be >= 0"),
        (self.max_tiles >= 0, "max_tiles must be >= 0"),
        (len(self.mean) == 3 and len(self.std) == 3, "mean and std need one value per RGB channel"),
        (all(s != 0 for s in self.std), "std must be non-zero"),
        (self.resample in {int(r) for r in Image.Resampling}, f"resample {self.resample} is no PIL filter"),
        (self.do_resize or not self.do_image_splitting or self.max_tiles > 0,
         "with do_resize off, images of any size reach the splitter: set max_tiles"),
        # Without its one resize siglip would hand the tower images of any size.
        (idefics3 or (self.do_resize and not self.do_image_splitting and not self.longest_edge),
         "siglip squashes every image to size x size: do_resize on, no splitting, no longest_edge"),
    )
    for ok, message in checks:
      if not ok:
        raise ValueError(f"ImageSpec: {message}; got {self}")

  @classmethod
  def default(cls, size: int, processor: str = "idefics3") -> "ImageSpec":
    """The processor's own defaults at one size-px tile (what a randomly initialised tower reads)."""
    if processor == "siglip":
      return cls(size, resample=int(Image.Resampling.BICUBIC), processor="siglip")
    return cls(size, processor=processor)

  @property
  def tile_budget(self) -> int:
    """The most split tiles (rows * cols, without the global image) one image gives."""
    if not self.do_image_splitting:
      return 0
    if not self.do_resize:
      return self.max_tiles
    # The resized longest edge is at most L, or L + 1 (L odd: the processor rounds the
    # other edge of a square image up to even), so each side has at most k tiles.
    edge = self.longest_edge
    k = math.ceil(min(edge + edge % 2, MAX_IMAGE_SIZE) / self.size)
    bound = 0 if k < 2 else k * k
    return min(bound, self.max_tiles) if self.max_tiles else bound

  @classmethod
  def from_hf_dict(cls, cfg: dict[str, Any], *, max_tiles: int = 0,
                   source: str = "preprocessor_config.json") -> "ImageSpec":
    """From an Idefics3 or SigLIP image processor's settings (its `to_dict()` or preprocessor_config.json)."""
    kind = str(cfg.get("image_processor_type", ""))
    processor = SUPPORTED_PROCESSORS.get(kind.removesuffix("Fast").removesuffix("Pil"))
    if processor is None:
      raise ValueError(f"{source}: image_processor_type {kind!r} is not supported; supported: "
                       f"{list(SUPPORTED_PROCESSORS)}")
    common = dict(
        do_rescale=bool(cfg.get("do_rescale", True)), rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        do_normalize=bool(cfg.get("do_normalize", True)),
        mean=tuple(float(m) for m in cfg.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(float(s) for s in cfg.get("image_std", (0.5, 0.5, 0.5))),
        # Unset (PaliGemma's Hub config has null): transformers then converts nothing and fails on any
        # non-RGB image; we convert as do_convert_rgb=True does, which leaves RGB images as they are.
        do_convert_rgb=cfg.get("do_convert_rgb") is not False)
    if processor == "siglip":
      size = cfg.get("size") or {}
      if set(size) != {"height", "width"} or size["height"] != size["width"]:
        raise ValueError(f"{source}: size must be {{'height': N, 'width': N}} (the tower's square input), "
                         f"got {size!r}")
      if not cfg.get("do_resize", True) or cfg.get("do_center_crop") or cfg.get("do_pad"):
        raise ValueError(f"{source}: only SigLIP's one resize to size is reproduced (do_resize on, "
                         f"do_center_crop and do_pad off)")
      return cls(size=int(size["height"]), resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
                 processor="siglip", **common)

    def edge(key: str) -> int:
      value = cfg.get(key) or {}
      if set(value) - {"longest_edge"} or not value.get("longest_edge"):
        raise ValueError(f"{source}: {key} must be {{'longest_edge': N}}, got {value!r}")
      return int(value["longest_edge"])

    do_resize = bool(cfg.get("do_resize", True))
    return cls(size=edge("max_image_size"), do_resize=do_resize, longest_edge=edge("size") if do_resize else 0,
               do_image_splitting=bool(cfg.get("do_image_splitting", True)), max_tiles=max_tiles,
               resample=int(cfg.get("resample", Image.Resampling.LANCZOS)), **common)


class Tiles(NamedTuple):
  """One image for the vision tower: rows x cols tiles (row by row), then the global image."""

  pixels: np.ndarray  # (rows * cols + 1, 3, size, size): float32, or uint8 from preprocess_raw
  rows: int
  cols: int


class _Plan(NamedTuple):
  resized: tuple[int, int] | None  # (height, width) after do_resize
  encoder: tuple[int, int] | None  # (height, width) cut into tiles
  rows: int
  cols: int


# -- sizes, exactly as transformers' Idefics3ImageProcessor computes them ----------


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
  aspect = width / height
  if width >= height:
    width = max_len
    height = int(width / aspect)
    height += height % 2
  else:
    height = max_len
    width = int(height * aspect)
    width += width % 2
  return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int = MAX_IMAGE_SIZE) -> tuple[int, int]:
  aspect = width / height
  if width >= height and width > max_len:
    width = max_len
    height = int(width / aspect)
  elif height > width and height > max_len:
    height = max_len
    width = int(height * aspect)
  return max(height, 1), max(width, 1)


def _encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
  """Both edges up to multiples of the tile side, the shorter one following the aspect."""
  aspect = width / height
  if width >= height:
    width = math.ceil(width / tile) * tile
    height = math.ceil(int(width / aspect) / tile) * tile
  else:
    height = math.ceil(height / tile) * tile
    width = math.ceil(int(height * aspect) / tile) * tile
  return height, width


def _plan_with_edge(height: int, width: int, spec: ImageSpec, edge: int | None) -> _Plan:
  resized = None
  if edge:
    resized = _scale_below(*_rescale_to_max_len(height, width, edge))
    height, width = resized
  if not spec.do_image_splitting:
    return _Plan(resized, None, 0, 0)
  encoder = _encoder_size(height, width, spec.size)
  if encoder[0] > spec.size or encoder[1] > spec.size:
    return _Plan(resized, encoder, encoder[0] // spec.size, encoder[1] // spec.size)
  return _Plan(resized, encoder, 0, 0)


def _plan(height: int, width: int, spec: ImageSpec) -> _Plan:
  """The resizes of a height x width image; over the tile budget, a shorter longest edge."""
  # siglip has no longest_edge (0): its one resize is the final squash to size x size.
  plan = _plan_with_edge(height, width, spec, spec.longest_edge if spec.do_resize else None)
  budget = spec.tile_budget
  if plan.rows * plan.cols <= budget:
    return plan
  for k in range(max(plan.rows, plan.cols) - 1, 0, -1):
    plan = _plan_with_edge(height, width, spec, k * spec.size)
    if plan.rows * plan.cols <= budget:
      return plan
  raise ValueError(f"a {width}x{height} image cannot be split into at most {budget} tiles of {spec.size} px")


def tile_grid(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
  """(rows, cols) of the split tiles a width x height image gives; (0, 0): the global image alone."""
  plan = _plan(height, width, spec)
  return plan.rows, plan.cols


# -- pixels --------------------------------------------------------------------------


def _to_rgb(image: Image.Image, spec: ImageSpec) -> Image.Image:
  if not spec.do_convert_rgb:
    if image.mode != "RGB":
      raise ValueError(f"do_convert_rgb is off but the image is {image.mode}; the vision tower takes RGB")
    return image
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")
  return image.convert("RGB")


def preprocess(image: Image.Image, spec: ImageSpec) -> Tiles:
  """An image as the spec's processor prepares it (see the module docstring)."""
  return normalized(preprocess_raw(image, spec), spec)


def normalize(raw: np.ndarray, spec: ImageSpec) -> np.ndarray:
  """Step 4 on (..., 3, H, W) uint8 tiles: the processor's rescale and normalisation, float32."""
  # The processor's arithmetic: rescale in float64, then float32 throughout.
  x = (raw.astype(np.float64) * spec.rescale_factor).astype(np.float32) if spec.do_rescale else raw.astype(np.float32)
  if spec.do_normalize:
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    x = (x - mean) / std
  return np.ascontiguousarray(x)


def normalized(raw: Tiles, spec: ImageSpec) -> Tiles:
  """uint8 tiles (preprocess_raw, load_raw, ImageStore.get_raw) as the processor's float32 tiles."""
  return raw._replace(pixels=normalize(raw.pixels, spec))


def pixel_lut(spec: ImageSpec) -> np.ndarray:
  """(3, 256) float32: `normalize` of every 8-bit value in each channel."""
  values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (3, 256, 1))
  return normalize(values, spec)[:, :, 0]


def preprocess_raw(image: Image.Image, spec: ImageSpec) -> Tiles:
  """`preprocess` without step 4: (rows * cols + 1, 3, M, M) uint8 tiles."""
  image = _to_rgb(image, spec)
  plan = _plan(image.height, image.width, spec)
  resample = Image.Resampling(spec.resample)

  def resize(img: Image.Image, hw: tuple[int, int]) -> Image.Image:
    return img.resize((hw[1], hw[0]), resample=resample)

  if plan.resized:
    image = resize(image, plan.resized)
  m = spec.size
  if plan.encoder:
    image = resize(image, plan.encoder)
  if plan.rows:
    arr = np.asarray(image)
    frames = [arr[r * m:(r + 1) * m, c * m:(c + 1) * m] for r in range(plan.rows) for c in range(plan.cols)]
    frames.append(np.asarray(resize(image, (m, m))))
  else:
    frames = [np.asarray(resize(image, (m, m)))]
  return Tiles(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)), plan.rows, plan.cols)


def load(path: str | pathlib.Path, spec: ImageSpec) -> Tiles:
  """A file preprocessed; its EXIF orientation applied first, as transformers' load_image does."""
  return normalized(load_raw(path, spec), spec)


def load_raw(path: str | pathlib.Path, spec: ImageSpec) -> Tiles:
  """`load` without step 4 (uint8 tiles)."""
  with Image.open(path) as image:
    if image.width * image.height > MAX_PIXELS:
      raise ValueError(f"{path}: {image.width}x{image.height} pixels exceeds the limit of {MAX_PIXELS}")
    try:
      return preprocess_raw(ImageOps.exif_transpose(image), spec)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None


class ImageStore:
  """Preprocessed images by item id, kept in a per-process LRU cache of at most `cache_bytes`.

  Catalogue images recur in many histories; with splitting one image is up to
  tile_budget + 1 tiles, so the cache is bounded in bytes, not in images. It holds
  uint8 tiles (`get_raw`), normalised on each `get`.
  """

  def __init__(self, paths: list[pathlib.Path | None], spec: ImageSpec, cache_bytes: int = 1 << 30):
    self.paths = paths
    self.spec = spec
    self.cache_bytes = cache_bytes
    self._cache: collections.OrderedDict[int, Tiles] = collections.OrderedDict()
    self._cached_bytes = 0
    self._grids: dict[int, tuple[int, int]] = {}
    self._lock = threading.Lock()

  def has_image(self, item_id: int) -> bool:
    return self.paths[item_id] is not None

  def get(self, item_id: int) -> Tiles:
    """The item's tiles as the processor gives them (float32)."""
    return normalized(self.get_raw(item_id), self.spec)

  def get_raw(self, item_id: int) -> Tiles:
    """The item's uint8 tiles, before rescaling and normalisation (read-only, shared)."""
    if self.paths[item_id] is None:
      raise ValueError(f"item {item_id} has no image")
    with self._lock:
      if item_id in self._cache:
        self._cache.move_to_end(item_id)
        return self._cache[item_id]
    tiles = load_raw(self.paths[item_id], self.spec)
    tiles.pixels.setflags(write=False)  # Shared by every example that shows the item.
    with self._lock:
      self._grids[item_id] = (tiles.rows, tiles.cols)
      if item_id not in self._cache and tiles.pixels.nbytes <= self.cache_bytes:
        self._cache[item_id] = tiles
        self._cached_bytes += tiles.pixels.nbytes
        while self._cached_bytes > self.cache_bytes:
          self._cached_bytes -= self._cache.popitem(last=False)[1].pixels.nbytes
    return tiles

  def grid(self, item_id: int) -> tuple[int, int]:
    """(rows, cols) of the item's split tiles, remembered even after its pixels leave the cache."""
    with self._lock:
      grid = self._grids.get(item_id)
    if grid is None:
      tiles = self.get_raw(item_id)
      grid = (tiles.rows, tiles.cols)
    return grid

  def tile_count(self, item_id: int) -> int:
    """The image slots the item's image fills: its split tiles and the global image (0 without an image).
    The one count behind the prompts' slots, the packed batches' tiles and the feature table's rows."""
    if not self.has_image(item_id):
      return 0
    rows, cols = self.grid(item_id)
    return rows * cols + 1

  def __getstate__(self):
    # The cache is per process; workers start empty.
    return {"paths": self.paths, "spec": self.spec, "cache_bytes": self.cache_bytes}

  def __setstate__(self, state):
    self.__init__(state["paths"], state["spec"], state["cache_bytes"])

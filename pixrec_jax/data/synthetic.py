"""The embedded default dataset: a synthetic catalogue in which images matter.

PixRec's claim is that images tell apart items whose texts are (nearly) the same.
This generator builds data where that is true by construction, so the text-only
baseline and the multimodal model can be told apart in minutes on one machine:

- Product lines ("groups") have unique titles ("Cozy Ceramic Mug"), a category, a
  brand and a price, and a picture style: a shape and a pattern.
- Most groups (1 - single_variant_fraction) come in one variant per palette colour
  (red, yellow, purple, green, blue, cyan). The variants' texts are identical; only
  the picture, the group's shape filled in the variant's colour, tells them apart.
  No colour name appears in any text. Single-variant groups have one item in a
  seeded colour.
- Each user has a preferred colour. Within a multi-variant line the user buys the
  preferred colour with probability `colour_loyalty`, else another colour
  uniformly. The preferred colour can only be seen in the pictures of past
  purchases, and only a picture says which item of the next line is the target.
- Next purchases also depend on what the last purchase looked like. The palette is
  split into `colour_families` families (two by default: red/yellow/purple and
  green/blue/cyan), and each group has one list of `successors_per_group`
  successor groups per family. A history starts at a uniform group; each step
  moves to a successor from the list of the family of the colour just bought, with
  `successor_probs`. Text alone knows the product line just bought but not its
  colour, so it can only predict a mixture of the lists; the picture says which
  list applies. With colour_families=1 the next product line depends on text alone.
- A user never buys an item twice: a step whose item was already bought is drawn
  again (group and variant) up to _MAX_DRAWS times; if all fail the user jumps to
  a uniformly drawn group they have bought nothing from, as at the start of a
  history. Every history therefore has exactly its drawn length, uniform in
  [min_history, max_history]; redraws make the realised share of preferred-colour
  purchases a little lower than colour_loyalty (0.881 with the defaults). Timestamps
  are strictly increasing.

Everything is drawn from numpy Generators seeded by `seed` (the catalogue and the
users from separate streams, so changing `num_users` keeps the catalogue), and PIL
draws without antialiasing, so a seed always gives byte-identical files.

Besides the processed-dataset files, DIR/synthetic_truth.json records each item's
group and colour and each user's preferred colour, for analysis (e.g. "right
product line, wrong colour"); models must not read it.

Usage: python -m pixrec_jax.data.synthetic --out DIR [--seed N --num_users N ...]
"""

import argparse
import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pixrec_jax.data import catalog
from pixrec_jax.data import prompts
from pixrec_jax.data import tokenizer as tokenizer_lib

SOURCE = "pixrec_jax.data.synthetic"
TRUTH_FILE = "synthetic_truth.json"

# Far apart in RGB so that even a few pixels identify the colour.
# Listed by colour family: with colour_families=2 the first three and the last three
# are the two families.
PALETTE = (
    ("red", (220, 40, 40)),
    ("yellow", (235, 200, 40)),
    ("purple", (140, 50, 190)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 220)),
    ("cyan", (40, 200, 210)),
)
_BACKGROUND = (245, 245, 245)

# Word lists avoid colour names, also as substrings, so text never leaks the variant.
_ADJECTIVES = (
    "Cozy", "Classic", "Compact", "Deluxe", "Modern", "Rustic",
    "Sleek", "Sturdy", "Elegant", "Portable", "Vintage", "Premium",
)
_MATERIALS = (
    "Ceramic", "Cotton", "Bamboo", "Steel", "Glass",
    "Leather", "Wooden", "Linen", "Copper", "Marble",
)
_NOUNS = (
    "Mug", "Lamp", "Vase", "Bottle", "Basket", "Pillow",
    "Clock", "Bowl", "Tray", "Planter", "Notebook", "Backpack",
)
_CATEGORIES = (
    "Home & Kitchen", "Sports & Outdoors", "Toys & Games",
    "Office Products", "Beauty", "Pet Supplies",
)
_BRANDS = (
    "Acme", "Northwind", "Lumen", "Havenly", "Orbitex",
    "Kestrel", "Maplewood", "Solace", "Trident", "Vantage",
)
SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")
PATTERNS = ("solid", "stripes", "dots")

_MAX_DRAWS = 50
_START_MS = 1_600_000_000_000  # September 2020.
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
  """What `generate` draws; stored in the manifest to make reruns no-ops."""

  seed: int = 0
  num_groups: int = 20
  single_variant_fraction: float = 0.2
  num_users: int = 2000
  min_history: int = 5
  max_history: int = 9  # Inclusive; the length of a user's whole sequence.
  successors_per_group: int = 4
  successor_probs: tuple[float, ...] = (0.5, 0.25, 0.15, 0.1)
  colour_loyalty: float = 0.9
  colour_families: int = 2
  image_size: int = 32

  def __post_init__(self):
    max_groups = len(_ADJECTIVES) * len(_MATERIALS) * len(_NOUNS)
    checks = (
        (2 <= self.num_groups <= max_groups, f"num_groups must be in [2, {max_groups}] (unique titles)"),
        (0.0 <= self.single_variant_fraction <= 1.0, "single_variant_fraction must be in [0, 1]"),
        (self.num_users >= 1, "num_users must be >= 1"),
        (1 <= self.min_history <= self.max_history, "need 1 <= min_history <= max_history"),
        (self.max_history <= self.num_groups,
         "max_history must be <= num_groups so a history never runs out of unbought groups"),
        (1 <= self.successors_per_group < self.num_groups,
         "successors_per_group must be in [1, num_groups - 1]"),
        (len(self.successor_probs) == self.successors_per_group,
         "successor_probs needs one probability per successor"),
        (all(p >= 0 for p in self.successor_probs) and abs(sum(self.successor_probs) - 1) < 1e-6,
         "successor_probs must be non-negative and sum to 1"),
        (0.0 <= self.colour_loyalty <= 1.0, "colour_loyalty must be in [0, 1]"),
        (self.colour_families >= 1 and len(PALETTE) % self.colour_families == 0,
         f"colour_families must divide the {len(PALETTE)} palette colours"),
        (self.image_size >= 8, "image_size must be >= 8 pixels to draw a shape"),
    )
    for ok, message in checks:
      if not ok:
        raise ValueError(f"SyntheticOptions: {message}; got {self}")

  def to_json(self) -> dict:
    """The options as the manifest stores them (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class _Catalogue:
  group_fields: list[dict[str, str]]
  group_shape: list[str]
  group_pattern: list[str]
  group_items: list[list[int]]  # Multi-variant groups list their items in palette order.
  item_group: list[int]
  item_colour: list[int]
  successors: np.ndarray  # [num_groups, colour_families, successors_per_group]


def _draw_catalogue(rng: np.random.Generator, options: SyntheticOptions) -> _Catalogue:
  num_groups = options.num_groups
  titles = rng.choice(len(_ADJECTIVES) * len(_MATERIALS) * len(_NOUNS), num_groups, replace=False)
  group_fields, group_shape, group_pattern = [], [], []
  for title in titles:
    rest, noun = divmod(int(title), len(_NOUNS))
    adjective, material = divmod(rest, len(_MATERIALS))
    price = int(rng.integers(4, 80)) + float(rng.choice([0.49, 0.99]))
    group_fields.append({
        "title": f"{_ADJECTIVES[adjective]} {_MATERIALS[material]} {_NOUNS[noun]}",
        "main_category": _CATEGORIES[rng.integers(len(_CATEGORIES))],
        "brand": _BRANDS[rng.integers(len(_BRANDS))],
        "price": f"{price:.2f}",
    })
    group_shape.append(SHAPES[rng.integers(len(SHAPES))])
    group_pattern.append(PATTERNS[rng.integers(len(PATTERNS))])

  num_single = round(options.single_variant_fraction * num_groups)
  single = set(rng.choice(num_groups, num_single, replace=False).tolist())
  group_items, item_group, item_colour = [], [], []
  for group in range(num_groups):
    colours = [int(rng.integers(len(PALETTE)))] if group in single else range(len(PALETTE))
    group_items.append([])
    for colour in colours:
      group_items[-1].append(len(item_group))
      item_group.append(group)
      item_colour.append(colour)

  successors = np.asarray([[
      rng.choice(np.delete(np.arange(num_groups), group), options.successors_per_group, replace=False)
      for _ in range(options.colour_families)] for group in range(num_groups)])
  return _Catalogue(group_fields, group_shape, group_pattern, group_items, item_group, item_colour,
                    successors)


def _shape_points(shape: str, centre: float, radius: float) -> list[tuple[float, float]]:
  """Outline of a shape centred in the image, pointing up."""
  if shape == "square":
    angles, radii = np.arange(4) * 90 + 45, [radius] * 4
  elif shape == "diamond":
    angles, radii = np.arange(4) * 90, [radius] * 4
  elif shape == "star":
    angles, radii = np.arange(10) * 36, [radius, radius * 0.45] * 5
  elif shape == "cross":
    # A plus sign: arms of half-width radius / 3.
    w = radius / 3
    corners = [(-w, -radius), (w, -radius), (w, -w), (radius, -w), (radius, w), (w, w),
               (w, radius), (-w, radius), (-w, w), (-radius, w), (-radius, -w), (-w, -w)]
    return [(centre + x, centre + y) for x, y in corners]
  else:
    sides = {"triangle": 3, "pentagon": 5, "hexagon": 6}[shape]
    angles, radii = np.arange(sides) * 360 / sides, [radius] * sides
  radians = np.deg2rad(angles)
  return [(centre + r * np.sin(a), centre - r * np.cos(a)) for a, r in zip(radians, radii)]


def draw_item_image(shape: str, pattern: str, colour: tuple[int, int, int], size: int) -> Image.Image:
  """The group's shape filled with the variant colour, patterned in a darker shade."""
  centre = (size - 1) / 2
  radius = centre - max(1, round(size * 0.08))
  mask = Image.new("L", (size, size), 0)
  if shape == "circle":
    ImageDraw.Draw(mask).ellipse(
        [centre - radius, centre - radius, centre + radius, centre + radius], fill=255)
  else:
    ImageDraw.Draw(mask).polygon(_shape_points(shape, centre, radius), fill=255)

  fill = Image.new("RGB", (size, size), colour)
  shade = tuple(int(c * 0.55) for c in colour)
  period = max(4, size // 6)
  draw = ImageDraw.Draw(fill)
  if pattern == "stripes":
    for y in range(0, size, period):
      draw.rectangle([0, y, size - 1, y + period // 2 - 1], fill=shade)
  elif pattern == "dots":
    dot = max(1, period // 4)
    for y in range(period // 2, size, period):
      for x in range(period // 2, size, period):
        draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=shade)
  return Image.composite(fill, Image.new("RGB", (size, size), _BACKGROUND), mask)


def _pick_variant(rng: np.random.Generator, items: list[int], colour: int, loyalty: float) -> int:
  if len(items) == 1:
    return items[0]
  if rng.random() < loyalty:
    return items[colour]
  other = int(rng.integers(len(items) - 1))
  return items[other if other < colour else other + 1]


def colour_family(colour: int, families: int) -> int:
  """Palette index -> family index (PALETTE is listed family by family)."""
  return colour // (len(PALETTE) // families)


def _draw_history(
    rng: np.random.Generator, cat: _Catalogue, options: SyntheticOptions, colour: int
) -> list[int]:
  """One user's item ids; see the module docstring for the walk and the redraw rule."""
  length = int(rng.integers(options.min_history, options.max_history + 1))
  cumulative = np.cumsum(options.successor_probs)
  group = int(rng.integers(options.num_groups))
  history = [_pick_variant(rng, cat.group_items[group], colour, options.colour_loyalty)]
  while len(history) < length:
    # Where the user goes next depends on the colour of what they just bought.
    family = colour_family(cat.item_colour[history[-1]], options.colour_families)
    for _ in range(_MAX_DRAWS):
      slot = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(cumulative) - 1)
      next_group = int(cat.successors[group, family, slot])
      item = _pick_variant(rng, cat.group_items[next_group], colour, options.colour_loyalty)
      if item not in history:
        break
    else:
      visited = {cat.item_group[i] for i in history}
      fresh = [g for g in range(options.num_groups) if g not in visited]
      next_group = fresh[int(rng.integers(len(fresh)))]
      item = _pick_variant(rng, cat.group_items[next_group], colour, options.colour_loyalty)
    group = next_group
    history.append(item)
  return history


def _write(root: pathlib.Path, options: SyntheticOptions) -> None:
  """Writes the whole dataset into `root`, manifest last."""
  catalogue_rng, users_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence(options.seed).spawn(2))
  cat = _draw_catalogue(catalogue_rng, options)

  (root / "images").mkdir()
  items = []
  for item_id, (group, colour) in enumerate(zip(cat.item_group, cat.item_colour)):
    image = f"images/{item_id:06d}.png"
    draw_item_image(cat.group_shape[group], cat.group_pattern[group], PALETTE[colour][1],
                    options.image_size).save(root / image, format="PNG")
    items.append(catalog.Item(item_id=item_id, fields=dict(cat.group_fields[group]), image=image))

  users, user_colours = [], []
  for index in range(options.num_users):
    colour = int(users_rng.integers(len(PALETTE)))
    history = _draw_history(users_rng, cat, options, colour)
    start = _START_MS + int(users_rng.integers(365 * _DAY_MS))
    gaps = users_rng.integers(_HOUR_MS, 30 * _DAY_MS, size=len(history) - 1)
    timestamps = start + np.concatenate([[0], np.cumsum(gaps)])
    users.append(catalog.User(user_id=f"u{index + 1:06d}", items=np.asarray(history, np.int32),
                              timestamps=timestamps.astype(np.int64)))
    user_colours.append(colour)

  truth = {
      "palette": {name: list(rgb) for name, rgb in PALETTE},
      "item_group": cat.item_group,
      "item_colour": [PALETTE[c][0] for c in cat.item_colour],
      "user_colour": [PALETTE[c][0] for c in user_colours],
      "group_shape": cat.group_shape,
      "group_pattern": cat.group_pattern,
      "colour_families": options.colour_families,
      "group_successors": cat.successors.tolist(),  # [group][family of the last colour][slot]
  }
  (root / TRUTH_FILE).write_text(json.dumps(truth) + "\n", encoding="utf-8")

  texts = [prompts.render_item_text(item.fields) for item in items]
  tokenizer_dir = tokenizer_lib.build_word_tokenizer(texts, root / catalog.TOKENIZER_DIR)
  extra_files = [TRUTH_FILE] + [
      p.relative_to(root).as_posix() for p in sorted(tokenizer_dir.rglob("*")) if p.is_file()]

  multi = sum(len(g) > 1 for g in cat.group_items)
  counts = {
      "items": len(items),
      "groups": options.num_groups,
      "multi_variant_groups": multi,
      "users": len(users),
      "interactions": sum(len(u.items) for u in users),
  }
  catalog.write_dataset(root, name="synthetic", source=SOURCE, items=items, users=users,
                        options=options.to_json(), counts=counts, extra_files=extra_files)


def _existing(out_dir: pathlib.Path, options: SyntheticOptions) -> catalog.Dataset:
  dataset = catalog.load_dataset(out_dir)
  manifest = dataset.manifest
  if manifest["source"] != SOURCE or manifest["options"] != options.to_json():
    raise catalog.DatasetError(
        f"{out_dir} already holds a dataset from {manifest['source']} with options "
        f"{manifest['options']}, not {options.to_json()}; choose another folder or delete it"
    )
  return dataset


def generate(out_dir: str | os.PathLike, options: SyntheticOptions | None = None) -> catalog.Dataset:
  """Generates the synthetic dataset into `out_dir`, or loads it if already there.

  A complete dataset with the same options is returned as is, without rewriting
  anything, so scripts can call this unconditionally. Files are written into a
  hidden sibling folder that is renamed to `out_dir` once complete, so an
  interrupted run never leaves a half-written dataset (only a `.NAME.partial-*`
  folder, safe to delete).

  Args:
    out_dir: the dataset folder; must not exist, be empty, or hold this dataset.
    options: what to generate; defaults to SyntheticOptions().

  Returns:
    The loaded dataset.

  Raises:
    catalog.DatasetError: `out_dir` holds a dataset with other options, or other files.
  """
  options = options or SyntheticOptions()
  return catalog.write_once(out_dir, lambda folder: _write(folder, options), lambda d: _existing(d, options))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, type=pathlib.Path, help="dataset folder")
  for field in dataclasses.fields(SyntheticOptions):
    if isinstance(field.default, tuple):
      parser.add_argument(f"--{field.name}", type=float, nargs="+", default=field.default)
    else:
      parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
  args = vars(parser.parse_args(argv))
  out = args.pop("out")
  options = SyntheticOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
  dataset = generate(out, options)
  print(json.dumps({"path": str(dataset.path), **dataset.manifest["counts"]}, indent=2))


if __name__ == "__main__":
  main()

"""Turns histories into fixed-shape model inputs: PixRec prompts, tokenised.

A prompt is a sequence of text runs and image blocks. Each text run is tokenised
as one string, so its ids equal what the Hugging Face processor gives for the
same text (the image tokens, being special tokens, split runs apart there too).
Where the image blocks and the BOS go is the backbone family's processor's
choice (Layout.style; prompt_style maps a model_type to it):

idefics3 (Idefics3Processor; text-only LMs too): the tokenizer's own prefix (a BOS
or nothing), then the prompt. An image block is what Idefics3Processor puts in
place of `<image>`, with F = `<fake_token_around_image>`, I = `<image>` x
image_seq_len and a grid of rows x cols split tiles (images.py):
  no split:  F `<global-img>` I F
  split:     for each row r: (F `<row_r_col_c>` I for each column c) then "\n";
             then "\n" F `<global-img>` I F
The newlines are text, tokenised by the tokenizer ("\n\n" before the global
image may be one token).

paligemma (PaliGemmaProcessor given text with `<image>` placeholders): each image
is I in place, one tile without markers. The prompt gets one BOS, right after its
last image (at its start when it shows none), and ends in "\n", tokenised with its
last run; the tokenizer's own BOS setting is ignored, as the processor turns it
off. Without placeholders the processor would put every image first (`<image>`s,
BOS, text, "\n"), apart from the item texts they belong to; PixRec interleaves
them (PIXREC.md), so we use the placeholder path. The processor refuses prompts
without images; those follow the same formula with none: BOS, text, "\n".

Image slots follow token order: each shown image's tiles row by row, then its
global image, packed from slot 0 and padded to a static count (Layout.image_slots
per image).

The user segment (history + separator) and the target segment (target text +
image) are tokenised separately, so the user segment a model sees in training is
token for token the one it sees at evaluation, where the target is unknown. For
paligemma the user segment is the processor's whole prompt for the history, and
the target segment follows it as the processor's suffix does (tokenised on its
own, no BOS), with its image in place: the processor's suffix cannot hold an
image, and on the full prompt as one text it would move the BOS behind the
target's image. An item read alone is always the processor's prompt for it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pixrec_jax.data import prompts

if TYPE_CHECKING:  # layouts and prompts need no PIL: bench/train_step.py runs where it is missing
  from pixrec_jax.data.images import ImageStore

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
# Each prompt style and the image processor (ImageSpec.processor) whose tiles its image blocks stand for.
STYLES = {"idefics3": "idefics3", "paligemma": "siglip"}


def prompt_style(model_type: str) -> str:
  """The prompt style of a backbone's model_type: PaliGemma's own, else Idefics3's (text-only LMs too)."""
  return "paligemma" if model_type == "paligemma" else "idefics3"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shapes of every batch (jit compiles once)."""

  max_history: int
  max_item_tokens: int  # text tokens kept per item
  seq_len: int  # full prompt: user + target segment
  item_len: int  # an item read alone
  image_seq_len: int  # tokens per image tile; 0 for text-only
  image_size: int  # tile side in pixels
  max_image_tiles: int = 0  # split tiles per image at most (0: no splitting); the global image is extra
  style: str = "idefics3"  # a key of STYLES: where image blocks and the BOS go

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"Layout: style {self.style!r} is not one of {sorted(STYLES)}")
    if self.style == "paligemma" and self.max_image_tiles:
      raise ValueError("Layout: paligemma images are one tile each; max_image_tiles must be 0")

  @property
  def text_only(self) -> bool:
    return self.image_seq_len == 0

  @property
  def image_slots(self) -> int:
    """Image slots one image may fill: its split tiles and its global image."""
    return 0 if self.text_only else self.max_image_tiles + 1

  @property
  def example_image_slots(self) -> int:
    """Image slots of one training example: its history's items and its target, each image_slots."""
    return (self.max_history + 1) * self.image_slots


def _round_up(n: int, multiple: int = 8) -> int:
  return int(math.ceil(n / multiple) * multiple)


class PromptBuilder:
  """Builds training windows, user prompts and item prompts as numpy dicts."""

  def __init__(self, tokenizer, item_texts: Sequence[str], images: ImageStore | None, layout: Layout):
    if layout.text_only != (images is None):
      raise ValueError("an image store is needed exactly when the layout has image tokens")
    self.tokenizer = tokenizer
    self.item_texts = list(item_texts)
    self.images = images
    self.layout = layout
    self.pad_id = _pad_id(tokenizer)
    paligemma = layout.style == "paligemma"
    # idefics3: what the tokenizer adds in front of a sequence by itself (a BOS token, or nothing).
    # paligemma places its BOS (if the tokenizer has one) after the prompt's last image instead.
    self.prefix = [] if paligemma else list(tokenizer("", add_special_tokens=True)["input_ids"])
    self.bos = [int(tokenizer.bos_token_id)] if paligemma and tokenizer.bos_token_id is not None else []
    self._suffix = [("\n", False)] if paligemma else []
    if not layout.text_only:
      if images.spec.processor != STYLES[layout.style]:
        raise ValueError(f"the image store makes {images.spec.processor} tiles, but {layout.style} prompts stand "
                         f"for {STYLES[layout.style]} tiles")
      if images.spec.size != layout.image_size or images.spec.tile_budget > layout.max_image_tiles:
        raise ValueError(f"the image store makes {images.spec.size} px tiles, up to {images.spec.tile_budget} per "
                         f"image, but the layout has {layout.image_size} px and {layout.max_image_tiles}")
      image = _special_id(tokenizer, IMAGE_TOKEN)
      self.image_token_id = image
      self._tile = [image] * layout.image_seq_len
      if not paligemma:
        fake, glob = (_special_id(tokenizer, t) for t in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN))
        self._global_block = [fake, glob] + self._tile + [fake]
        self._fake = fake
        self._row_break = _text_ids(tokenizer, "\n")
        self._global_break = _text_ids(tokenizer, "\n\n")
      self._blocks: dict[tuple[int, int], list[int]] = {}

  def image_block(self, rows: int, cols: int) -> list[int]:
    """Token ids that stand for an image split into rows x cols tiles (0 x 0: not split)."""
    if self.layout.style == "paligemma":
      if rows or cols:
        raise ValueError(f"paligemma images are one tile each, not a {rows} x {cols} grid")
      return self._tile
    block = self._blocks.get((rows, cols))
    if block is None:
      block = []
      for r in range(1, rows + 1):
        for c in range(1, cols + 1):
          block += [self._fake, _special_id(self.tokenizer, f"<row_{r}_col_{c}>")] + self._tile
        # The last row's newline and the one before the global image are one text run.
        block += self._row_break if r < rows else self._global_break
      block += self._global_block
      self._blocks[(rows, cols)] = block
    return block

  def _item_block(self, item: int) -> list[int]:
    return self.image_block(*self.images.grid(item))

  # -- sizing ------------------------------------------------------------------

  @staticmethod
  def plan(tokenizer, item_texts: Sequence[str], *, max_history: int, image_seq_len: int, image_size: int,
           max_image_tiles: int = 0, max_item_tokens: int = 0, style: str = "idefics3", sample: int = 20000,
           seed: int = 0) -> Layout:
    """A Layout of `style` large enough for max_history items, each with an image of up to
    max_image_tiles split tiles; max_item_tokens=0 measures the catalogue (up to `sample` items)
    and keeps its longest text whole."""
    if max_item_tokens <= 0:
      idx = np.arange(len(item_texts))
      if len(idx) > sample:
        idx = np.random.default_rng(seed).choice(idx, sample, replace=False)
      lengths = [len(tokenizer(item_texts[i], add_special_tokens=False)["input_ids"]) for i in idx]
      max_item_tokens = max(lengths) if lengths else 1
    phrase = {p: len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts.PROMPT_PHRASES}
    if style == "paligemma":
      frame = (tokenizer.bos_token_id is not None) + len(_text_ids(tokenizer, "\n"))  # a BOS and the final "\n"
      block = image_seq_len
    else:
      frame = len(tokenizer("", add_special_tokens=True)["input_ids"])
      block = image_seq_len + 3 if image_seq_len else 0
      if image_seq_len and max_image_tiles:
        # The longest block: every tile in its own row, so one newline run per row.
        block += max_image_tiles * (image_seq_len + 2) + (max_image_tiles - 1) * len(_text_ids(tokenizer, "\n")) \
            + len(_text_ids(tokenizer, "\n\n"))
    per_item = max_item_tokens + block + 2  # +2: a run may split one more token at its joins
    user = frame + phrase[prompts.HISTORY_INTRO] + (max_history - 1) * phrase[prompts.HISTORY_NEXT] \
        + phrase[prompts.TARGET_SEPARATOR] + max_history * per_item
    return Layout(max_history=max_history, max_item_tokens=max_item_tokens, seq_len=_round_up(user + per_item),
                  item_len=_round_up(frame + per_item), image_seq_len=image_seq_len, image_size=image_size,
                  max_image_tiles=max_image_tiles if image_seq_len else 0, style=style)

  # -- tokenisation ----------------------------------------------------------------

  def _run(self, parts: Sequence[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Tokenises the concatenated parts as one string; tokens of each item part (flag True)
    beyond max_item_tokens are dropped. Returns ids and, per id, whether it is item text."""
    text = "".join(p for p, _ in parts)
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    bounds, start = [], 0
    for p, is_item in parts:
      bounds.append((start, start + len(p), is_item))
      start += len(p)
    ids, flags, kept = [], [], [0] * len(parts)
    part = 0
    for tok, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"]):
      while part < len(bounds) - 1 and begin >= bounds[part][1]:
        part += 1
      is_item = bounds[part][2]
      if is_item:
        if kept[part] >= self.layout.max_item_tokens:
          continue
        kept[part] += 1
      ids.append(tok)
      flags.append(is_item)
    return ids, flags

  def _has_image(self, item: int) -> bool:
    return not self.layout.text_only and self.images.has_image(item)

  def _frame(self, ids: list[int], after_image: int) -> list[int]:
    """A whole prompt: the style's prefix in front, or its BOS at `after_image` (just after the
    last image block; 0 without one)."""
    return self.prefix + ids[:after_image] + self.bos + ids[after_image:]

  def user_segment(self, history: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of the user segment and the items whose images it shows, in order."""
    ids, shown, after_image = [], [], 0
    parts: list[tuple[str, bool]] = []
    for k, item in enumerate(history):
      parts += [(prompts.HISTORY_INTRO if k == 0 else prompts.HISTORY_NEXT, False), (self.item_texts[item], True)]
      if self._has_image(item):
        ids += self._run(parts)[0] + self._item_block(item)
        after_image = len(ids)
        shown.append(item)
        parts = []
    parts.append((prompts.TARGET_SEPARATOR, False))
    ids += self._run(parts + self._suffix)[0]
    return self._frame(ids, after_image), shown

  def target_segment(self, item: int) -> tuple[list[int], list[bool]]:
    """Token ids of the target segment and, per id, whether it is target text."""
    ids, is_text = self._run([(self.item_texts[item], True)])
    if self._has_image(item):
      block = self._item_block(item)
      ids, is_text = ids + block, is_text + [False] * len(block)
    return ids, is_text

  def item_prompt(self, item: int) -> list[int]:
    """Token ids of an item read alone: its text and image as a whole prompt."""
    text = [(self.item_texts[item], True)]
    if self._has_image(item):
      ids = self._run(text)[0] + self._item_block(item)
      return self._frame(ids + (self._run(self._suffix)[0] if self._suffix else []), len(ids))
    return self._frame(self._run(text + self._suffix)[0], 0)

  # -- examples ----------------------------------------------------------------

  def _pad(self, ids: list[int], length: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) > length:
      raise ValueError(f"{what} has {len(ids)} tokens, more than its static length {length}; "
                       f"raise data.max_seq_len or lower data.max_item_tokens")
    out = np.full((length,), self.pad_id, np.int32)
    out[:len(ids)] = ids
    mask = np.zeros((length,), np.int32)
    mask[:len(ids)] = 1
    return out, mask

  def _images(self, items: Sequence[int], slots: int, pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """The items' tiles in token order, packed from slot 0; the rest are zero and not valid.
    pixels=False: the validity mask only (the caller fetches the tiles itself)."""
    size = self.layout.image_size
    out = np.zeros((slots, 3, size, size), np.float32) if pixels else None
    valid = np.zeros((slots,), bool)
    used = 0
    for item in items:
      n = self.images.tile_count(item)
      if pixels:
        out[used:used + n] = self.images.get(item).pixels
      valid[used:used + n] = True
      used += n
    return out, valid

  def _slots(self, out: dict, prefix: str, items: Sequence[int], slots: int, features) -> None:
    """`prefix`_images and `prefix`_image_valid of the items' tiles; with a frozen tower's feature table
    (data.features) its rows, in `prefix`_image_features (or _vision_features), in place of the pixels."""
    pixels, out[f"{prefix}_image_valid"] = self._images(items, slots, pixels=features is None)
    if features is None:
      out[f"{prefix}_images"] = pixels
    else:
      out[f"{prefix}_{features.key}"] = features.slot_rows(items, slots)

  def item_example(self, item: int, features=None) -> dict[str, np.ndarray]:
    """An item read alone (item_prompt). features: a frozen tower's FeatureTable, read in place of pixels."""
    out = {}
    out["item_ids"], out["item_mask"] = self._pad(self.item_prompt(item), self.layout.item_len, f"item {item}")
    if not self.layout.text_only:
      self._slots(out, "item", [item] if self._has_image(item) else [], self.layout.image_slots, features)
    return out

  def user_example(self, history: Sequence[int], features=None) -> dict[str, np.ndarray]:
    """The user segment alone (evaluation: the target is unknown). features: as item_example's."""
    history = list(history)[-self.layout.max_history:]
    ids, shown = self.user_segment(history)
    out = {}
    out["user_ids"], out["user_mask"] = self._pad(ids, self.layout.seq_len, "user prompt")
    if not self.layout.text_only:
      self._slots(out, "user", shown, self.layout.max_history * self.layout.image_slots, features)
    return out

  def train_example(self, history: Sequence[int], target: int, pixels: bool = True) -> dict[str, np.ndarray]:
    """pixels=False leaves out "images" (pipeline.pack_images fetches each distinct tile once)."""
    history = list(history)[-self.layout.max_history:]
    target_ids, target_is_text = self.target_segment(target)
    dropped = 0
    user_ids, shown = self.user_segment(history)
    while len(user_ids) + len(target_ids) > self.layout.seq_len and len(history) > 1:
      history, dropped = history[1:], dropped + 1
      user_ids, shown = self.user_segment(history)
    n_user = len(user_ids)
    full, full_mask = self._pad(user_ids + target_ids, self.layout.seq_len, f"prompt for target item {target}")
    user_mask = np.zeros_like(full_mask)
    user_mask[:n_user] = 1
    target_mask = full_mask - user_mask
    k = self.layout.max_item_tokens
    text_pos = [n_user + i for i, t in enumerate(target_is_text) if t]
    nig_positions = np.zeros((k,), np.int32)
    nig_labels = np.zeros((k,), np.int32)
    nig_weights = np.zeros((k,), np.float32)
    nig_positions[:len(text_pos)] = np.asarray(text_pos, np.int32) - 1  # the position that predicts it
    nig_labels[:len(text_pos)] = full[text_pos]
    nig_weights[:len(text_pos)] = 1.0
    item_ids, item_mask = self._pad(self.item_prompt(target), self.layout.item_len, f"item {target}")
    out = {
        "full_ids": full, "full_mask": full_mask, "user_mask": user_mask, "target_mask": target_mask,
        "nig_positions": nig_positions, "nig_labels": nig_labels, "nig_weights": nig_weights,
        "item_ids": item_ids, "item_mask": item_mask,
        "target_item": np.int32(target), "dropped_history": np.int32(dropped),
    }
    if not self.layout.text_only:
      slots = self.layout.example_image_slots
      items = shown + ([target] if self._has_image(target) else [])
      out["images"], out["image_valid"] = self._images(items, slots, pixels)
      if not pixels:
        del out["images"]
      # The target's tiles are the valid slots from here on (see PixRec.train_outputs).
      out["target_slot"] = np.int32(sum(r * c + 1 for r, c in map(self.images.grid, shown)))
    return out


def _special_id(tokenizer, token: str) -> int:
  tid = tokenizer.convert_tokens_to_ids(token)
  if tid is None or tid == tokenizer.unk_token_id:
    raise ValueError(f"the tokenizer has no {token!r} token, which the image prompt layout needs")
  return int(tid)


def _text_ids(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer) -> int:
  for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if tid is not None:
      return int(tid)
  return 0

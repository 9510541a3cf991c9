"""Raw Amazon Reviews 2023 files -> the processed-dataset format (catalog.py).

Usage:
  python -m pixrec_jax.data.ingest --reviews Subscription_Boxes.jsonl.gz \\
      --meta meta_Subscription_Boxes.jsonl.gz --out data/Subscription_Boxes [--preset paper]

Inputs are JSON-lines files, plain or gzip (recognised by its magic bytes, whatever
the name), given as local paths or http(s) URLs; URLs are streamed, never held whole
in memory or on disk. The steps, each counted in manifest["counts"]["steps"]:

1. Reviews: one interaction (user_id, parent_asin, timestamp in ms) per review.
   Items are keyed by parent_asin, as in the official benchmark, so the variants of
   one product are one item. A line that is not a JSON object stops the run with
   FILE:LINE unless skip_bad_lines, which skips and counts it. A review without a
   non-empty string user_id or parent_asin, or an integer timestamp, is skipped and
   counted under the first such field. Bytes that are not UTF-8 are replaced by
   U+FFFD and the lines counted, since an odd byte in a review's text must not cost
   the interaction.
2. Sequences: each user's reviews sorted by timestamp, ties kept in file order (a
   stable sort); a repeated (user, item) pair keeps its earliest review, as the
   benchmark does. Equal timestamps are kept and counted.
3. Meta join: interactions whose item has no meta record are dropped: such an
   item has neither text nor picture.
4. Image choice (from meta, nothing fetched yet): the first `images` entry with
   variant "MAIN", its URL taken by `image_preference` (hi_res, large, thumb by
   default). Without a MAIN entry, image_fallback "first" takes the first entry
   with any URL; "none" leaves the item without an image. Under missing_image
   "drop" (the default), items without an image are dropped here.
5. k-core: users with fewer than user_core and items with fewer than item_core
   interactions are dropped, all at once, repeatedly until a round drops nothing
   (as the benchmark's kcore_filtering.py). 0 or 1 turns a side off.
6. Download (see download.py) of the survivors' images only. Under "drop", items
   whose download failed are dropped and the k-core repeated, so the dataset still
   satisfies it; under "placeholder" they get images/placeholder.png (grey); under
   "none" their image is null.
7. Write: items sorted by parent_asin get ids 0..N-1, users are sorted by user_id.
   Item.fields holds the raw fields (FIELDS), so the item template can change at
   training time; `template` is validated here and kept in the manifest.

Presets (explicit options override them). "benchmark": the official 5-core over
every reviewed item with meta, a grey placeholder where an item has no picture.
"paper": what the PixRec authors' files hold: users with at least 2 reviews, no
item core, only items with a MAIN image (no fallback), the `large` URL first
(their files name the large images). Without a preset: 5-core, items without a
picture dropped, MAIN else the first image.

Splits are made at load time from the dataset: `catalog.dataset_splits` reads
manifest["options"]["split"]: "leave_one_out" (catalog.leave_one_out) or
"timestamp" (catalog.timestamp_split at split_valid_start_ms and
split_test_start_ms, the benchmark's cuts by default, with split_cases).

Images are cached under DIR/images (or --image-cache) by the sha256 of their URL,
so an interrupted run resumes without fetching again; files there that the manifest
does not list are cached images of items that were filtered out. A rerun with the
same options and inputs finds the complete manifest and returns it untouched; a
local input is compared by sha256, a URL by its size, ETag and Last-Modified from a
HEAD request (not downloaded again). Other options or inputs need --overwrite.
"""

import argparse
import collections
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pathlib
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pixrec_jax.data import catalog
from pixrec_jax.data import download
from pixrec_jax.data import images as images_lib
from pixrec_jax.data import prompts

SOURCE = "pixrec_jax.data.ingest (Amazon Reviews 2023)"

# The benchmark's absolute cuts (benchmark_scripts/timestamp_split.py in
# hyp1231/AmazonReviews2023): 8:1:1 over all of Amazon Reviews 2023.
BENCHMARK_VALID_START_MS = 1628643414042
BENCHMARK_TEST_START_MS = 1658002729837

# What Item.fields holds; templates may name any of these.
FIELDS = ("parent_asin", "title", "main_category", "brand", "price", "store", "categories")
SPLITS = catalog.SPLITS
MISSING_IMAGE_MODES = ("drop", "placeholder", "none")
IMAGE_FALLBACKS = ("first", "none")
IMAGE_URL_KEYS = ("hi_res", "large", "thumb")
PLACEHOLDER = "images/placeholder.png"
_PLACEHOLDER_SIZE = 64
_PLACEHOLDER_GREY = (128, 128, 128)
_DATASET_ENTRIES = frozenset({catalog.ITEMS_FILE, catalog.USERS_FILE, "images", catalog.MANIFEST + ".tmp"})


PRESETS = {
    # The official 5-core over all reviewed items; pictures where they exist.
    "benchmark": {"user_core": 5, "item_core": 5, "missing_image": "placeholder"},
    "paper": {
        "user_core": 2, "item_core": 0, "missing_image": "drop", "image_fallback": "none",
        "image_preference": ("large", "hi_res", "thumb"),
    },
}


def _option(default: Any, help: str, **metadata) -> Any:
  return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class IngestOptions:
  """Everything that decides what an ingestion writes; the manifest stores it."""

  reviews: str = _option("", "reviews file: .jsonl or .jsonl.gz, local path or http(s) URL", required=True)
  meta: str = _option("", "meta file: .jsonl or .jsonl.gz, local path or http(s) URL", required=True)
  name: str = _option("", "dataset name (default: the reviews file name without extensions)")
  preset: str = _option("none", "option preset (explicit options win)", choices=("none", *PRESETS))
  user_core: int = _option(5, "keep users with at least this many interactions (iterative k-core)")
  item_core: int = _option(5, "keep items with at least this many interactions (iterative k-core)")
  template: str = _option(prompts.ITEM_TEMPLATE, f"item text template over the fields {', '.join(FIELDS)}")
  split: str = _option("leave_one_out", "the split the trainer makes at load time", choices=SPLITS)
  split_valid_start_ms: int = _option(BENCHMARK_VALID_START_MS, "timestamp split: first valid millisecond")
  split_test_start_ms: int = _option(BENCHMARK_TEST_START_MS, "timestamp split: first test millisecond")
  split_cases: str = _option("all", "timestamp split: every interaction of a period is a case (all), "
                             "or only each user's first (first)", choices=catalog.SPLIT_CASES)
  images: bool = _option(True, "skip images: nothing downloaded, every item's image null (text only)",
                         flag="--no-images", const=False)
  missing_image: str = _option("drop", "items without a usable image: drop, placeholder (grey PNG) or none (null)",
                               choices=MISSING_IMAGE_MODES)
  image_fallback: str = _option("first", "without a MAIN image: first (first image with a URL) or none",
                                choices=IMAGE_FALLBACKS)
  image_preference: tuple[str, ...] = _option(IMAGE_URL_KEYS, "URL keys to try, in order (comma-separated)")
  image_timeout_s: float = _option(10.0, "per socket operation of an image request, seconds")
  image_deadline_s: float = _option(60.0, "for one whole image request, seconds")
  retries: int = _option(3, "network retries (images, opening URL inputs) after timeouts, refused or "
                         "dropped connections and HTTP 408/429/5xx")
  backoff_s: float = _option(0.5, "first retry delay, doubled per retry, seconds")
  max_image_pixels: int = _option(images_lib.MAX_PIXELS, "refuse images with more pixels (decompression bombs)")
  max_image_bytes: int = _option(50 * 2**20, "refuse image files larger than this")
  input_timeout_s: float = _option(60.0, "per socket operation when streaming a URL input, seconds")
  skip_bad_lines: bool = _option(False, "skip and count malformed JSON lines instead of failing",
                                 flag="--skip-bad-lines", const=True)

  def __post_init__(self):
    template_fields = prompts.template_fields(self.template)
    checks = (
        (bool(self.reviews) and bool(self.meta), "reviews and meta are required"),
        (self.preset in ("none", *PRESETS), f"preset must be one of none, {', '.join(PRESETS)}"),
        (self.user_core >= 0 and self.item_core >= 0, "user_core and item_core must be >= 0"),
        (set(template_fields) <= set(FIELDS),
         f"template names {sorted(set(template_fields) - set(FIELDS))}, but items have only the fields "
         f"{', '.join(FIELDS)} (details.Brand is stored as brand)"),
        (self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}"),
        (self.split_valid_start_ms <= self.split_test_start_ms,
         "split_valid_start_ms must be <= split_test_start_ms"),
        (self.split_cases in catalog.SPLIT_CASES, f"split_cases must be one of {', '.join(catalog.SPLIT_CASES)}"),
        (self.missing_image in MISSING_IMAGE_MODES, f"missing_image must be one of {', '.join(MISSING_IMAGE_MODES)}"),
        (self.images or self.missing_image == "none", "without images, missing_image must be none"),
        (self.image_fallback in IMAGE_FALLBACKS, f"image_fallback must be one of {', '.join(IMAGE_FALLBACKS)}"),
        (len(self.image_preference) > 0 and len(set(self.image_preference)) == len(self.image_preference)
         and set(self.image_preference) <= set(IMAGE_URL_KEYS),
         f"image_preference must be distinct keys from {', '.join(IMAGE_URL_KEYS)}"),
        (self.input_timeout_s > 0, "input_timeout_s must be positive"),
    )
    for ok, message in checks:
      if not ok:
        raise ValueError(f"IngestOptions: {message}; got {self}")
    self.download_settings()  # Validates the image options.

  def download_settings(self, workers: int = 16) -> download.Settings:
    return download.Settings(
        timeout_s=self.image_timeout_s, deadline_s=self.image_deadline_s, retries=self.retries,
        backoff_s=self.backoff_s, max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes,
        workers=workers)

  def to_json(self) -> dict:
    """The options as the manifest stores them (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def make_options(reviews: str, meta: str, preset: str = "none", **overrides) -> IngestOptions:
  """Options from a preset plus explicit values; None means "not given".

  Without images, missing_image becomes "none" unless given explicitly.
  """
  names = {f.name for f in dataclasses.fields(IngestOptions)} - {"reviews", "meta", "preset"}
  unknown = set(overrides) - names
  if unknown:
    raise ValueError(f"unknown options {sorted(unknown)}; valid: {sorted(names)}")
  if preset != "none" and preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; valid: none, {', '.join(PRESETS)}")
  explicit = {k: v for k, v in overrides.items() if v is not None}
  values = {**PRESETS.get(preset, {}), **explicit}
  if values.get("images") is False and "missing_image" not in explicit:
    values["missing_image"] = "none"
  if "image_preference" in values:
    values["image_preference"] = tuple(values["image_preference"])
  if not values.get("name"):
    values["name"] = _default_name(reviews)
  return IngestOptions(reviews=reviews, meta=meta, preset=preset, **values)


def _default_name(location: str) -> str:
  name = pathlib.PurePosixPath(urllib.parse.urlsplit(location).path if _is_url(location) else location).name
  for suffix in (".gz", ".jsonl", ".json"):
    name = name.removesuffix(suffix)
  return name or "amazon2023"


def _is_url(location: str) -> bool:
  return download.is_http_url(location)


def _log(message: str) -> None:
  print(f"ingest: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


class _HashingReader(io.RawIOBase):
  """Counts and hashes the raw bytes as they are read (the file's identity)."""

  def __init__(self, raw):
    self._raw = raw
    self.sha256 = hashlib.sha256()
    self.size = 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    n = self._raw.readinto(buffer)
    if n:
      self.sha256.update(memoryview(buffer)[:n])
      self.size += n
    return n


def _open_url(url: str, timeout_s: float, retries: int, backoff_s: float, method: str = "GET"):
  """Opens `url`; timeouts, connection failures and HTTP 408/429/5xx are retried with backoff."""
  opener = download.http_opener()
  request = urllib.request.Request(url, method=method, headers={"User-Agent": download.USER_AGENT})
  for attempt in range(retries + 1):
    if attempt:
      time.sleep(backoff_s * 2 ** (attempt - 1))
    try:
      return opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
      e.close()
      if e.code not in download.RETRY_STATUSES or attempt == retries:
        raise catalog.DatasetError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      if attempt == retries:
        raise catalog.DatasetError(f"{url}: cannot open ({e})") from None


@dataclasses.dataclass
class _FileStats:
  """What reading one input found; counted in the manifest."""

  lines: int = 0
  records: int = 0
  blank_lines: int = 0
  bad_lines: int = 0
  invalid_utf8_lines: int = 0


def _read_jsonl(location: str, options: IngestOptions, stats: _FileStats, identity: dict,
                progress: bool) -> Iterator[dict]:
  """Yields the JSON object of each line; fills `stats` and, once read to the end, `identity`."""
  if _is_url(location):
    raw = _open_url(location, options.input_timeout_s, options.retries, options.backoff_s)
    headers = {"etag": raw.headers.get("ETag"), "last_modified": raw.headers.get("Last-Modified")}
  else:
    try:
      raw = open(location, "rb", buffering=0)
    except OSError as e:
      raise catalog.DatasetError(f"{location}: cannot open ({e.strerror or e})") from None
    headers = {}
  with contextlib.ExitStack() as stack:
    stack.enter_context(raw)
    hashing = _HashingReader(raw)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    line_number = 0
    try:
      is_gzip = buffered.peek(2)[:2] == b"\x1f\x8b"
      lines = stack.enter_context(gzip.GzipFile(fileobj=buffered, mode="rb")) if is_gzip else buffered
      bar = stack.enter_context(tqdm(desc=pathlib.PurePosixPath(location).name, unit=" lines",
                                     disable=not progress, leave=False))
      for line in lines:
        line_number += 1
        bar.update()
        try:
          text = line.decode("utf-8")
        except UnicodeDecodeError:
          text = line.decode("utf-8", errors="replace")
          stats.invalid_utf8_lines += 1
        if not text.strip():
          stats.blank_lines += 1
          continue
        try:
          record = json.loads(text)
          if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError.
          if not options.skip_bad_lines:
            raise catalog.DatasetError(
                f"{location}:{line_number}: malformed JSON ({e}); "
                "pass --skip-bad-lines to skip and count such lines") from None
          stats.bad_lines += 1
          continue
        stats.records += 1
        yield record
      while buffered.read(1 << 20):  # Hash the whole file, also bytes after the last gzip member.
        pass
    except (OSError, EOFError, zlib.error, http.client.HTTPException) as e:
      # Stalled or dropped streams, truncated or corrupt gzip: name where it broke.
      raise catalog.DatasetError(
          f"{location}:{line_number + 1}: reading failed ({type(e).__name__}: {e})") from None
    finally:
      stats.lines = line_number
  identity.update({"location": location, "sha256": hashing.sha256.hexdigest(), "size": hashing.size, **headers})


def _unchanged(identity: dict, options: IngestOptions) -> str | None:
  """None if the input recorded as `identity` is still the same, else why not."""
  location = identity["location"]
  if not _is_url(location):
    path = pathlib.Path(location)
    if not path.is_file():
      return f"{location} is missing"
    if path.stat().st_size != identity["size"] or catalog.file_sha256(path) != identity["sha256"]:
      return f"{location} changed (size or sha256 differs)"
    return None
  try:
    with _open_url(location, options.input_timeout_s, options.retries, options.backoff_s,
                   method="HEAD") as response:
      now = {"size": response.headers.get("Content-Length"), "etag": response.headers.get("ETag"),
             "last_modified": response.headers.get("Last-Modified")}
  except catalog.DatasetError as e:
    _log(f"cannot check {location} ({e}); assuming it is unchanged")
    return None
  if now["size"] is not None and now["size"].isdigit():
    now["size"] = int(now["size"])
  for key, value in now.items():
    if value is not None and identity.get(key) is not None and value != identity[key]:
      return f"{location} changed ({key} {identity[key]!r} -> {value!r})"
  return None


# ----------------------------------------------------------------------------- records


def _text(value: Any) -> str | None:
  """A field value as text; None for missing, empty, "None" and non-scalar values."""
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, (int, float)):
    return str(value) if math.isfinite(value) else None
  if isinstance(value, str):
    value = value.strip()
    return value if value and value.lower() not in ("none", "null") else None
  return None


def item_fields(parent_asin: str, meta: dict) -> dict[str, str]:
  """The raw fields an item keeps (FIELDS); missing ones are left out (rendered Unknown)."""
  details = meta.get("details") if isinstance(meta.get("details"), dict) else {}
  categories = meta.get("categories")
  categories = [c for c in (_text(c) for c in categories) if c] if isinstance(categories, list) else []
  values = {
      "parent_asin": parent_asin,
      "title": _text(meta.get("title")),
      "main_category": _text(meta.get("main_category")),
      "brand": _text(details.get("Brand")),
      "price": _text(meta.get("price")),
      "store": _text(meta.get("store")),
      "categories": " > ".join(categories) or None,
  }
  return {k: v for k, v in values.items() if v is not None}


def choose_image(meta_images: Any, preference: Sequence[str] = IMAGE_URL_KEYS,
                 fallback: str = "first") -> tuple[str | None, str]:
  """(URL, "main" | "fallback") of an item's picture, or (None, "none").

  The first entry with variant MAIN, its URL by `preference`; without one and with
  fallback "first", the first entry that has any preferred URL.
  """
  entries = [e for e in meta_images if isinstance(e, dict)] if isinstance(meta_images, list) else []

  def url_of(entry: dict) -> str | None:
    for key in preference:
      url = _text(entry.get(key))
      if url:
        return url
    return None

  for entry in entries:
    if str(entry.get("variant", "")).upper() == "MAIN" and (url := url_of(entry)):
      return url, "main"
  if fallback == "first":
    for entry in entries:
      if url := url_of(entry):
        return url, "fallback"
  return None, "none"


Sequences = dict[str, list[tuple[int, str]]]  # user_id -> [(timestamp ms, parent_asin)] in time order.


def _timestamp(value: Any) -> int | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  return None


def sort_and_deduplicate(raw: dict[str, list[tuple[int, str]]]) -> tuple[Sequences, int]:
  """Each user's (timestamp, item) list in time order, ties in file order, each item once.

  Args:
    raw: per user, interactions in file order.

  Returns:
    The sequences and how many repeated (user, item) pairs were removed (the
    earliest review of a pair is kept; on equal timestamps, the earlier line).
  """
  sequences, removed = {}, 0
  for user, events in raw.items():
    seen, kept = set(), []
    for timestamp, item in sorted(events, key=lambda e: e[0]):  # Stable: ties keep file order.
      if item in seen:
        removed += 1
        continue
      seen.add(item)
      kept.append((timestamp, item))
    sequences[user] = kept
  return sequences, removed


def equal_timestamps(sequences: Sequences) -> int:
  """Interactions whose timestamp equals the previous one of the same user."""
  return sum(a[0] == b[0] for seq in sequences.values() for a, b in zip(seq, seq[1:]))


def sizes(sequences: Sequences) -> dict[str, int]:
  return {
      "users": len(sequences),
      "items": len({item for seq in sequences.values() for _, item in seq}),
      "interactions": sum(len(seq) for seq in sequences.values()),
  }


def drop_items(sequences: Sequences, keep) -> Sequences:
  """Sequences without the items `keep` rejects; users left with nothing vanish."""
  out = {}
  for user, seq in sequences.items():
    kept = [e for e in seq if keep(e[1])]
    if kept:
      out[user] = kept
  return out


def k_core(sequences: Sequences, user_core: int, item_core: int) -> tuple[Sequences, list[dict[str, int]]]:
  """Iterative k-core: drops users below user_core and items below item_core until stable.

  Each round drops every user and item below its threshold at once, then counts
  again, since dropping one side lowers the other's counts.

  Returns:
    The filtered sequences and sizes() after each round that dropped something
    (an empty list if the input already satisfies both thresholds).
  """
  rounds = []
  while True:
    item_counts = collections.Counter(item for seq in sequences.values() for _, item in seq)
    bad_items = {item for item, count in item_counts.items() if count < item_core}
    bad_users = {user for user, seq in sequences.items() if len(seq) < user_core}
    if not bad_items and not bad_users:
      return sequences, rounds
    sequences = drop_items({u: s for u, s in sequences.items() if u not in bad_users},
                           lambda item: item not in bad_items)
    rounds.append(sizes(sequences))


# ----------------------------------------------------------------------------- ingestion


def _require_interactions(sequences: Sequences, after: str, hint: str) -> None:
  if not sequences:
    raise catalog.DatasetError(f"no interactions left after {after}; {hint}")


def _read_reviews(options: IngestOptions, identity: dict, progress: bool) -> tuple[dict, dict]:
  stats = _FileStats()
  skipped = {"user_id": 0, "parent_asin": 0, "timestamp": 0}
  raw: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
  for record in _read_jsonl(options.reviews, options, stats, identity, progress):
    user, item, timestamp = record.get("user_id"), record.get("parent_asin"), _timestamp(record.get("timestamp"))
    for field, ok in (("user_id", isinstance(user, str) and user.strip()),
                      ("parent_asin", isinstance(item, str) and item.strip()),
                      ("timestamp", timestamp is not None)):
      if not ok:
        skipped[field] += 1
        break
    else:
      raw[user.strip()].append((timestamp, item.strip()))
  counts = {**dataclasses.asdict(stats), "skipped_missing_or_invalid": skipped,
            "interactions": sum(len(v) for v in raw.values())}
  if not raw:
    raise catalog.DatasetError(
        f"{options.reviews}: no usable reviews ({stats.lines} lines: {stats.blank_lines} blank, "
        f"{stats.bad_lines} malformed, {sum(skipped.values())} without user_id, parent_asin or "
        f"timestamp {skipped}); is it an Amazon Reviews 2023 reviews file of a non-empty category?")
  return dict(raw), counts


def _read_meta(options: IngestOptions, needed: set[str], identity: dict, progress: bool) -> tuple[dict, dict]:
  """Meta records of the needed items, first record per parent_asin."""
  stats = _FileStats()
  missing_asin = duplicates = 0
  meta, seen = {}, set()
  for record in _read_jsonl(options.meta, options, stats, identity, progress):
    asin = record.get("parent_asin")
    if not (isinstance(asin, str) and asin.strip()):
      missing_asin += 1
      continue
    asin = asin.strip()
    if asin in seen:
      duplicates += 1
      continue
    seen.add(asin)
    if asin in needed:
      meta[asin] = {"fields": item_fields(asin, record),
                    "image": choose_image(record.get("images"), options.image_preference, options.image_fallback)}
  counts = {**dataclasses.asdict(stats), "skipped_missing_parent_asin": missing_asin,
            "duplicate_parent_asin": duplicates, "items_used": len(meta)}
  return meta, counts


def _write_placeholder(root: pathlib.Path) -> None:
  image = Image.new("RGB", (_PLACEHOLDER_SIZE, _PLACEHOLDER_SIZE), _PLACEHOLDER_GREY)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  download.write_atomically(root / PLACEHOLDER, buffer.getvalue())


def _link_or_copy(source: pathlib.Path, target: pathlib.Path) -> None:
  """Puts a cached file into the dataset; a hard link costs no space where possible."""
  if target.is_file():
    return  # Named by its URL's hash and only ever written complete: the same file.
  target.parent.mkdir(parents=True, exist_ok=True)
  temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
  try:
    try:
      os.link(source, temp)
    except OSError:
      shutil.copyfile(source, temp)
    os.replace(temp, target)
  finally:
    temp.unlink(missing_ok=True)


def _fetch_images(out: pathlib.Path, sequences: Sequences, meta: dict, options: IngestOptions,
                  image_cache: pathlib.Path | None, workers: int, progress: bool,
                  counts: dict) -> dict[str, str | None]:
  """Downloads the pictures of the items in `sequences`; returns each item's image path.

  An item whose picture could not be had gets PLACEHOLDER under missing_image
  "placeholder", else None. Adds the download outcomes to `counts`.
  """
  cache = image_cache or out / "images"
  urls = {item: meta[item]["image"][0] for seq in sequences.values() for _, item in seq}
  distinct = {url for url in urls.values() if url}
  _log(f"fetching {len(distinct)} images into {cache}")
  results = download.fetch_all(sorted(distinct), cache, options.download_settings(workers), progress)
  outcomes = collections.Counter(r.outcome for r in results.values())
  counts.update({"urls": len(results), **{o: outcomes[o] for o in download.OUTCOMES}})
  failures = sorted((r.url, r.outcome, r.detail) for r in results.values() if r.outcome not in download.OK)
  for url, outcome, detail in failures[:20]:
    _log(f"image {outcome}: {url} {detail}")
  item_image = {}
  for item, url in urls.items():
    result = results.get(url) if url else None
    if result is not None and result.outcome in download.OK:
      name = "images/" + download.cache_name(url)
      if image_cache is not None:
        _link_or_copy(result.path, out / name)
      item_image[item] = name
    else:
      item_image[item] = PLACEHOLDER if options.missing_image == "placeholder" else None
  # Among the k-core's items; under drop, these are dropped next.
  counts["items_without_image"] = sum(v is None or v == PLACEHOLDER for v in item_image.values())
  counts["placeholder"] = sum(v == PLACEHOLDER for v in item_image.values())
  if counts["placeholder"]:
    _write_placeholder(out)
  return item_image


def _build(out: pathlib.Path, options: IngestOptions, image_cache: pathlib.Path | None, workers: int,
           progress: bool) -> None:
  identities = {"reviews": {}, "meta": {}}
  steps = {}
  raw, review_counts = _read_reviews(options, identities["reviews"], progress)
  steps["reviews"] = {"users": len(raw), "items": len({i for v in raw.values() for _, i in v}),
                      "interactions": review_counts["interactions"]}

  sequences, duplicates = sort_and_deduplicate(raw)
  del raw
  steps["deduplicated"] = {**sizes(sequences), "duplicates_removed": duplicates,
                           "equal_timestamps": equal_timestamps(sequences)}

  meta, meta_counts = _read_meta(options, {i for s in sequences.values() for _, i in s},
                                 identities["meta"], progress)
  before = steps["deduplicated"]
  sequences = drop_items(sequences, meta.__contains__)
  _require_interactions(sequences, f"joining with {options.meta}",
                        "no reviewed item has a meta record: are reviews and meta of the same category?")
  steps["with_meta"] = sizes(sequences)
  steps["with_meta"]["items_without_meta"] = before["items"] - steps["with_meta"]["items"]
  steps["with_meta"]["interactions_without_meta"] = before["interactions"] - steps["with_meta"]["interactions"]

  image_counts = None
  if options.images:
    joined = {item for seq in sequences.values() for _, item in seq}
    sources = collections.Counter(meta[item]["image"][1] for item in joined)
    image_counts = {"chosen": sources["main"] + sources["fallback"], "main": sources["main"],
                    "fallback": sources["fallback"], "no_url": sources["none"]}
    if options.missing_image == "drop":
      sequences = drop_items(sequences, lambda item: meta[item]["image"][0] is not None)
      _require_interactions(sequences, "dropping items without an image URL (missing_image drop)",
                            "try --image-fallback first or --missing-image placeholder")
      steps["with_image_url"] = sizes(sequences)

  core_hint = f"lower --user-core ({options.user_core}) or --item-core ({options.item_core})"
  sequences, rounds = k_core(sequences, options.user_core, options.item_core)
  _require_interactions(sequences, f"the k-core filter (users >= {options.user_core}, items >= "
                        f"{options.item_core} interactions)", core_hint)
  steps["k_core"] = {**sizes(sequences), "rounds": len(rounds), "per_round": rounds}

  item_image: dict[str, str | None] = {}
  if options.images:
    item_image = _fetch_images(out, sequences, meta, options, image_cache, workers, progress, image_counts)
    if options.missing_image == "drop":
      sequences = drop_items(sequences, lambda item: item_image[item] is not None)
      _require_interactions(sequences, "dropping items whose image download failed (missing_image drop)",
                            "check the failures logged above")
      steps["with_image"] = sizes(sequences)
      sequences, rounds = k_core(sequences, options.user_core, options.item_core)
      _require_interactions(sequences, "the k-core filter repeated after image failures", core_hint)
      steps["k_core_after_images"] = {**sizes(sequences), "rounds": len(rounds), "per_round": rounds}

  item_ids = {asin: index for index, asin in enumerate(sorted({i for s in sequences.values() for _, i in s}))}
  items = [catalog.Item(item_id=index, fields=meta[asin]["fields"], image=item_image.get(asin))
           for asin, index in item_ids.items()]
  users = [catalog.User(user_id=user,
                        items=np.asarray([item_ids[i] for _, i in sequences[user]], np.int32),
                        timestamps=np.asarray([t for t, _ in sequences[user]], np.int64))
           for user in sorted(sequences)]
  counts = {
      **sizes(sequences),
      "equal_timestamps": equal_timestamps(sequences),
      "duplicates_removed": duplicates,
      "k_core_rounds": steps["k_core"]["rounds"] + steps.get("k_core_after_images", {}).get("rounds", 0),
      "reviews_file": review_counts,
      "meta_file": meta_counts,
      "steps": steps,
  }
  if image_counts is not None:
    counts["images"] = image_counts
  manifest_options = {**options.to_json(), "inputs": identities}
  catalog.write_dataset(out, name=options.name, source=SOURCE, items=items, users=users,
                        options=manifest_options, counts=counts)


def _difference(manifest: dict, options: IngestOptions) -> str | None:
  """None if `manifest` was written from `options` and inputs that are still the same."""
  recorded = dict(manifest.get("options", {}))
  inputs = recorded.pop("inputs", None)
  if manifest.get("source") != SOURCE or inputs is None:
    return f"from {manifest.get('source')!r}, not from this ingestion"
  wanted = options.to_json()
  changed = sorted(k for k in wanted.keys() | recorded.keys() if wanted.get(k) != recorded.get(k))
  if changed:
    return "with other options: " + ", ".join(f"{k} {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
  for identity in inputs.values():
    reason = _unchanged(identity, options)
    if reason:
      return f"from other inputs: {reason}"
  return None


def ingest(
    out_dir: str | os.PathLike,
    options: IngestOptions,
    *,
    image_cache: str | os.PathLike | None = None,
    workers: int = 16,
    progress: bool = True,
    overwrite: bool = False,
) -> catalog.Dataset:
  """Ingests raw Amazon Reviews 2023 files into `out_dir`, or returns what is there.

  Args:
    out_dir: the dataset folder: new, empty, an unfinished ingestion (resumed, its
      cached images reused) or a complete one (returned as is if built from the
      same options and inputs).
    options: what to ingest and how.
    image_cache: where downloaded images are cached (default out_dir/images);
      a separate cache is shared by datasets, its files hard-linked into them.
    workers: concurrent image downloads.
    progress: show progress bars.
    overwrite: rebuild a complete dataset made from other options or inputs.

  Returns:
    The loaded dataset.

  Raises:
    catalog.DatasetError: bad input (naming file and line), no data left after a
      filter (naming it), or an out_dir that holds something else.
  """
  out = pathlib.Path(out_dir)
  manifest_path = out / catalog.MANIFEST
  if manifest_path.is_file():
    try:
      manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise catalog.DatasetError(f"{manifest_path}: malformed JSON ({e})") from None
    difference = _difference(manifest, options)
    if difference is None:
      _log(f"{out} already holds this dataset (same options and inputs); nothing fetched or written")
      return catalog.load_dataset(out)
    if not overwrite:
      raise catalog.DatasetError(
          f"{out} holds a dataset {difference}; pass --overwrite to rebuild it (cached images are "
          "reused) or choose another folder")
    _log(f"rebuilding {out}: it holds a dataset {difference}")
    manifest_path.unlink()  # Until the new one is written the folder is incomplete.
  elif out.is_dir() and any(entry.name not in _DATASET_ENTRIES for entry in out.iterdir()):
    raise catalog.DatasetError(
        f"{out} is not empty and has no {catalog.MANIFEST}, nor is it an unfinished ingestion; "
        "choose another folder or delete it")
  out.mkdir(parents=True, exist_ok=True)
  _build(out, options, pathlib.Path(image_cache) if image_cache is not None else None, workers, progress)
  return catalog.load_dataset(out)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, type=pathlib.Path, help="dataset folder")
  parser.add_argument("--image-cache", type=pathlib.Path, default=None,
                      help="image cache shared by datasets (default: OUT/images)")
  parser.add_argument("--workers", type=int, default=16, help="concurrent image downloads")
  parser.add_argument("--overwrite", action="store_true", help="rebuild a dataset made from other options")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  for field in dataclasses.fields(IngestOptions):
    flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
    default = ",".join(field.default) if isinstance(field.default, tuple) else repr(field.default)
    shown = "" if "const" in field.metadata or field.default == "" else f" (default: {default})"
    kwargs = {"dest": field.name, "default": None, "required": field.metadata.get("required", False),
              "help": field.metadata["help"] + shown}
    if "const" in field.metadata:
      parser.add_argument(flag, action="store_const", const=field.metadata["const"], **kwargs)
    elif isinstance(field.default, tuple):
      parser.add_argument(flag, type=lambda s: tuple(p.strip() for p in s.split(",") if p.strip()), **kwargs)
    else:
      parser.add_argument(flag, type=type(field.default), choices=field.metadata.get("choices"), **kwargs)
  parser.set_defaults(preset="none")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  args = vars(_parser().parse_args(argv))
  out, cache, workers, overwrite, quiet = (args.pop(k) for k in ("out", "image_cache", "workers", "overwrite",
                                                                 "quiet"))
  try:
    options = make_options(**args)
    dataset = ingest(out, options, image_cache=cache, workers=workers, progress=not quiet, overwrite=overwrite)
  except (catalog.DatasetError, ValueError) as e:
    raise SystemExit(f"ingest: error: {e}") from None
  counts = dataset.manifest["counts"]
  summary = {"path": str(dataset.path), **{k: counts[k] for k in ("users", "items", "interactions")}}
  if "images" in counts:
    summary["images"] = counts["images"]
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()

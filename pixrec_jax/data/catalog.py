"""The processed-dataset format (version 1), its writer and reader, and the splits.

Every data source (the synthetic generator, real-data ingestion) writes the same
folder, so training and evaluation read one format:

  DIR/manifest.json  {"format": "pixrec_jax.dataset", "version": 1, "name", "source",
                      "options", "counts", "files": {relative path: sha256}}
  DIR/items.jsonl    {"item_id": 0, "fields": {"title": ...}, "image": "images/000000.png"}
  DIR/users.jsonl    {"user_id": "u000001", "items": [3, 17], "timestamps": [ms, ms]}
  DIR/images/...     the files items refer to ("image" may be null)
  DIR/tokenizer/     optional Hugging Face tokenizer folder

The manifest is written last and atomically, so a folder that has one is complete;
the reader checks every invariant the rest of the code relies on and names the file,
line and key of the first violation, because a bad record found mid-training is far
costlier than one found at load time.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import reprlib
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from pixrec_jax.data import prompts

FORMAT = "pixrec_jax.dataset"
VERSION = 1
MANIFEST = "manifest.json"
ITEMS_FILE = "items.jsonl"
USERS_FILE = "users.jsonl"
TOKENIZER_DIR = "tokenizer"

_MANIFEST_KEYS = ("format", "version", "name", "source", "options", "counts", "files")
_JSON_TYPES = {int: "an integer", str: "a string", dict: "an object", list: "a list", type(None): "null"}


class DatasetError(ValueError):
  """A processed dataset is missing, incomplete or violates the format."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One catalogue entry; `image` is relative to the dataset folder."""

  item_id: int
  fields: dict[str, str]
  image: str | None


@dataclasses.dataclass(frozen=True)
class User:
  """One user's purchases in time order; arrays are read-only so splits can share them."""

  user_id: str
  items: np.ndarray  # int32
  timestamps: np.ndarray  # int64, milliseconds


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """A loaded processed dataset; `items[i].item_id == i`."""

  path: pathlib.Path
  manifest: dict
  items: list[Item]
  users: list[User]

  @property
  def num_items(self) -> int:
    return len(self.items)

  def item_text(self, item_id: int, template: str = prompts.ITEM_TEMPLATE) -> str:
    return prompts.render_item_text(self.items[item_id].fields, template)

  def image_path(self, item_id: int) -> pathlib.Path | None:
    image = self.items[item_id].image
    return None if image is None else self.path / image

  @property
  def tokenizer_path(self) -> pathlib.Path | None:
    path = self.path / TOKENIZER_DIR
    return path if path.is_dir() else None

  def __repr__(self) -> str:
    return (
        f"Dataset(name={self.manifest['name']!r}, path={str(self.path)!r}, "
        f"items={self.num_items}, users={len(self.users)})"
    )


def file_sha256(path: str | os.PathLike) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _check_relative(path: str, where: str) -> None:
  """Rejects paths that would point outside the dataset folder."""
  pure = pathlib.PurePosixPath(path)
  if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
    raise DatasetError(f"{where}: {path!r} must be a relative POSIX path inside the dataset folder")


def _records(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
  """Yields ("path:line", object) for each line of a JSON-lines file."""
  if not path.is_file():
    raise DatasetError(f"{path}: missing")
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: malformed JSON ({e})") from None
      if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
      yield where, record


def _get(record: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
  if key not in record:
    raise DatasetError(f"{where}: missing key {key!r}")
  value = record[key]
  # bool is an int subclass; an id or timestamp of `true` is a bug, not a number.
  if isinstance(value, bool) or not isinstance(value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    expected = " or ".join(_JSON_TYPES[k] for k in kinds)
    raise DatasetError(f"{where}: key {key!r} is {reprlib.repr(value)}, expected {expected}")
  return value


def _int_list(record: dict, key: str, where: str) -> list[int]:
  values = _get(record, key, list, where)
  for position, value in enumerate(values):
    if isinstance(value, bool) or not isinstance(value, int):
      raise DatasetError(f"{where}: key {key!r}[{position}] is {value!r}, expected an integer")
  return values


def _read_items(root: pathlib.Path) -> list[Item]:
  items = []
  for where, record in _records(root / ITEMS_FILE):
    item_id = _get(record, "item_id", int, where)
    if item_id != len(items):
      raise DatasetError(
          f"{where}: key 'item_id' is {item_id}, expected {len(items)} "
          "(ids must be dense 0..N-1 in file order)"
      )
    fields = _get(record, "fields", dict, where)
    for name, value in fields.items():
      if not isinstance(value, str):
        raise DatasetError(f"{where}: key 'fields'[{name!r}] has type {type(value).__name__}, expected str")
    image = _get(record, "image", (str, type(None)), where)
    if image is not None:
      _check_relative(image, f"{where}: key 'image'")
      if not (root / image).is_file():
        raise DatasetError(f"{where}: item {item_id} refers to image {image!r}, which does not exist in {root}")
    items.append(Item(item_id=item_id, fields=fields, image=image))
  return items


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False
  return array


def _read_users(root: pathlib.Path, num_items: int) -> list[User]:
  users = []
  seen = set()
  for where, record in _records(root / USERS_FILE):
    user_id = _get(record, "user_id", str, where)
    if user_id in seen:
      raise DatasetError(f"{where}: key 'user_id' {user_id!r} appears more than once")
    seen.add(user_id)
    items = _int_list(record, "items", where)
    timestamps = _int_list(record, "timestamps", where)
    if len(items) != len(timestamps):
      raise DatasetError(
          f"{where}: key 'timestamps' has {len(timestamps)} entries but key 'items' has {len(items)}"
      )
    for position, item in enumerate(items):
      if not 0 <= item < num_items:
        raise DatasetError(
            f"{where}: key 'items'[{position}] is {item}, outside the catalogue ids 0..{num_items - 1}"
        )
    for position in range(1, len(timestamps)):
      if timestamps[position] < timestamps[position - 1]:
        raise DatasetError(
            f"{where}: key 'timestamps' decreases at position {position} "
            f"({timestamps[position - 1]} -> {timestamps[position]}); items must be in time order"
        )
    users.append(
        User(
            user_id=user_id,
            items=_read_only(np.asarray(items, dtype=np.int32)),
            timestamps=_read_only(np.asarray(timestamps, dtype=np.int64)),
        )
    )
  return users


def _read_manifest(root: pathlib.Path) -> dict:
  path = root / MANIFEST
  if not path.is_file():
    raise DatasetError(f"{path}: missing; {root} is not a complete processed dataset")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(manifest, dict):
    raise DatasetError(f"{path}: expected a JSON object")
  for key in _MANIFEST_KEYS:
    if key not in manifest:
      raise DatasetError(f"{path}: missing key {key!r}")
  if manifest["format"] != FORMAT or manifest["version"] != VERSION:
    raise DatasetError(
        f"{path}: format {manifest['format']!r} version {manifest['version']!r} is not "
        f"{FORMAT!r} version {VERSION}, the one this code reads"
    )
  return manifest


def _verify_hashes(root: pathlib.Path, files: dict[str, str]) -> None:
  for required in (ITEMS_FILE, USERS_FILE):
    if required not in files:
      raise DatasetError(f"{root / MANIFEST}: key 'files' does not list {required}")
  for name, expected in files.items():
    _check_relative(name, f"{root / MANIFEST}: key 'files'")
    path = root / name
    if not path.is_file():
      raise DatasetError(f"{path}: listed in the manifest but missing")
    if file_sha256(path) != expected:
      raise DatasetError(f"{path}: sha256 differs from the manifest; the file was modified or truncated")


def load_dataset(path: str | os.PathLike, verify_hashes: bool = False) -> Dataset:
  """Reads and validates a processed dataset; raises DatasetError on any violation.

  Args:
    path: the dataset folder.
    verify_hashes: also compare every file listed in the manifest with its sha256;
      off by default because hashing all images costs more than the checks that
      catch real mistakes (the writer hashes what it wrote).

  Returns:
    The dataset, with `path` absolute.
  """
  root = pathlib.Path(path).resolve()
  manifest = _read_manifest(root)
  if verify_hashes:
    _verify_hashes(root, manifest["files"])
  items = _read_items(root)
  users = _read_users(root, len(items))
  return Dataset(path=root, manifest=manifest, items=items, users=users)


def _write_lines(path: pathlib.Path, records: Iterable[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    name: str,
    source: str,
    items: Sequence[Item],
    users: Sequence[User],
    options: dict,
    counts: dict,
    extra_files: Iterable[str | os.PathLike] = (),
) -> dict:
  """Writes items.jsonl, users.jsonl and, last, manifest.json into `out_dir`.

  Images (and `extra_files`, e.g. a tokenizer) must already be in `out_dir`; the
  writer hashes them. What it wrote is read back with the loader's checks before
  the manifest exists, so a writer bug can never produce a dataset that looks
  complete but fails to load.

  Args:
    out_dir: the dataset folder (created if missing).
    name: short dataset name.
    source: what produced it (a module or the raw data it came from).
    items: the catalogue, `items[i].item_id == i`.
    users: purchase histories in time order.
    options: the generator or ingestion options, so a rerun can tell whether the
      folder already holds what it would write.
    counts: summary numbers for humans and logs.
    extra_files: further files inside `out_dir` to hash, relative to it.

  Returns:
    The manifest that was written.
  """
  root = pathlib.Path(out_dir)
  root.mkdir(parents=True, exist_ok=True)
  (root / MANIFEST).unlink(missing_ok=True)  # Until the new one exists the folder is incomplete.
  _write_lines(
      root / ITEMS_FILE,
      ({"item_id": item.item_id, "fields": item.fields, "image": item.image} for item in items),
  )
  _write_lines(
      root / USERS_FILE,
      (
          {"user_id": user.user_id, "items": np.asarray(user.items).tolist(),
           "timestamps": np.asarray(user.timestamps).tolist()}
          for user in users
      ),
  )
  written_items = _read_items(root)
  _read_users(root, len(written_items))

  names = [ITEMS_FILE, USERS_FILE]
  names += sorted({item.image for item in written_items if item.image is not None})
  for extra in sorted(pathlib.PurePath(p).as_posix() for p in extra_files):
    _check_relative(extra, "extra_files")
    if not (root / extra).is_file():
      raise DatasetError(f"{root / extra}: listed in extra_files but missing")
    names.append(extra)
  manifest = {
      "format": FORMAT,
      "version": VERSION,
      "name": name,
      "source": source,
      "options": options,
      "counts": counts,
      "files": {n: file_sha256(root / n) for n in names},
  }
  temp = root / (MANIFEST + ".tmp")
  with open(temp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, ensure_ascii=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(temp, root / MANIFEST)
  return manifest


def write_once(out_dir: str | os.PathLike, write: Callable[[pathlib.Path], None],
               existing: Callable[[pathlib.Path], "Dataset"]) -> "Dataset":
  """Writes a dataset into `out_dir` unless it already holds a complete one.

  `write(folder)` fills a fresh partial folder beside `out_dir`, which is then
  renamed into place, so `out_dir` never holds a half-written dataset. A folder that
  already has a manifest (also one a concurrent writer finished first) goes to
  `existing(out_dir)`, which decides whether it is the same dataset.

  Raises:
    DatasetError: `out_dir` is not empty but has no manifest.
  """
  out_dir = pathlib.Path(out_dir)
  if (out_dir / MANIFEST).exists():
    return existing(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise DatasetError(
        f"{out_dir} is not empty but has no {MANIFEST} (an unfinished or unrelated "
        "folder); choose another folder or delete it"
    )
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex}"
  partial.mkdir()
  try:
    write(partial)
    try:
      if out_dir.exists():
        out_dir.rmdir()  # Empty, checked above; rename cannot replace a folder.
      os.rename(partial, out_dir)
    except OSError:
      if not (out_dir / MANIFEST).exists():
        raise
      # A concurrent writer finished first; its dataset wins if `existing` accepts it.
      shutil.rmtree(partial)
      return existing(out_dir)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return load_dataset(out_dir)


@dataclasses.dataclass(frozen=True)
class EvalCase:
  """Predict `target` from `history`; `user_index` indexes `Dataset.users`."""

  user_index: int
  history: np.ndarray
  target: int


@dataclasses.dataclass(frozen=True)
class Splits:
  train: list[tuple[int, np.ndarray]]
  valid: list[EvalCase]
  test: list[EvalCase]
  counts: dict[str, int]


def leave_one_out(dataset: Dataset) -> Splits:
  """Leave-one-out splits that keep held-out targets out of training.

  For a user with items i_1..i_n in time order:
  - n >= 3: test predicts i_n from i_1..i_{n-1}; valid predicts i_{n-1} from
    i_1..i_{n-2}; the training sequence is i_1..i_{n-2}, kept only if it has at
    least 2 items (a window needs one history item and a target). Training windows
    are drawn only from that sequence, so neither held-out position is ever a
    training target or in a training history (the reference code trained on its
    test targets).
  - n == 2: test only, predicting i_2 from i_1; nothing to train on.
  - n < 2: skipped, there is nothing to predict from.

  Test histories include the validation target: at test time it is the past.

  Returns:
    Splits with user indices into `dataset.users`; arrays are views of the user's
    items. `counts` holds users, users_skipped_short (n < 2), users_test_only
    (n == 2), train_users, valid_cases and test_cases.
  """
  train, valid, test = [], [], []
  skipped = test_only = 0
  for index, user in enumerate(dataset.users):
    items = user.items
    n = len(items)
    if n < 2:
      skipped += 1
      continue
    test.append(EvalCase(user_index=index, history=items[:-1], target=int(items[-1])))
    if n == 2:
      test_only += 1
      continue
    valid.append(EvalCase(user_index=index, history=items[:-2], target=int(items[-2])))
    if n - 2 >= 2:
      train.append((index, items[:-2]))
  counts = {
      "users": len(dataset.users),
      "users_skipped_short": skipped,
      "users_test_only": test_only,
      "train_users": len(train),
      "valid_cases": len(valid),
      "test_cases": len(test),
  }
  return Splits(train=train, valid=valid, test=test, counts=counts)


SPLIT_CASES = ("all", "first")


def timestamp_split(
    dataset: Dataset, valid_start_ms: int, test_start_ms: int, cases: str = "all"
) -> Splits:
  """Absolute-time splits, as the Amazon Reviews 2023 benchmark defines them.

  Every interaction belongs to the period its timestamp falls in: train
  (-inf, valid_start_ms), valid [valid_start_ms, test_start_ms), test
  [test_start_ms, +inf); one cut for all users, so nothing after a cut can inform
  what is predicted before it. For a user with items i_1..i_n in time order:
  - the training sequence is the user's items before valid_start_ms, kept only if
    it has at least 2 items (a window needs one history item and a target).
    Windows are drawn only from it, so no valid or test interaction is ever a
    training target or in a training history.
  - cases="all": every valid-period interaction i_j is a valid case predicting i_j
    from i_1..i_{j-1}, and likewise every test-period interaction a test case (the
    benchmark's `timestamp_w_his` files). cases="first": only the user's first
    predictable interaction in each period, one case per user and split as in
    leave-one-out. Histories include earlier interactions of the same period and, for test, the
    valid period: at prediction time they are the past.
  - a user's very first interaction, if it falls in the valid or test period, is
    skipped and counted: there is nothing to predict it from.

  Args:
    dataset: the dataset to split.
    valid_start_ms: the first millisecond of the validation period.
    test_start_ms: the first millisecond of the test period; >= valid_start_ms.
    cases: "all" or "first", see above.

  Returns:
    Splits with user indices into `dataset.users`; arrays are views of the user's
    items. `counts` holds users, train_users, train_interactions, valid_cases,
    test_cases, valid_users, test_users, valid_skipped_no_history and
    test_skipped_no_history.
  """
  if valid_start_ms > test_start_ms:
    raise ValueError(f"valid_start_ms {valid_start_ms} is after test_start_ms {test_start_ms}")
  if cases not in SPLIT_CASES:
    raise ValueError(f"cases must be one of {SPLIT_CASES}, got {cases!r}")
  train, valid, test = [], [], []
  skipped = {"valid": 0, "test": 0}
  users_with = {"valid": 0, "test": 0}
  train_interactions = 0
  for index, user in enumerate(dataset.users):
    items = user.items
    # Timestamps are sorted, so each period is one contiguous run of positions.
    valid_from, test_from = (
        int(p) for p in np.searchsorted(user.timestamps, [valid_start_ms, test_start_ms], side="left"))
    if valid_from >= 2:
      train.append((index, items[:valid_from]))
      train_interactions += valid_from
    for name, start, stop, out in (("valid", valid_from, test_from, valid), ("test", test_from, len(items), test)):
      if start == 0 < stop:
        skipped[name] += 1  # The user's first interaction: no history to predict it from.
      positions = range(max(start, 1), stop)
      if cases == "first":
        positions = positions[:1]
      for position in positions:
        out.append(EvalCase(user_index=index, history=items[:position], target=int(items[position])))
      users_with[name] += len(positions) > 0
  counts = {
      "users": len(dataset.users),
      "train_users": len(train),
      "train_interactions": train_interactions,
      "valid_cases": len(valid),
      "test_cases": len(test),
      "valid_users": users_with["valid"],
      "test_users": users_with["test"],
      "valid_skipped_no_history": skipped["valid"],
      "test_skipped_no_history": skipped["test"],
  }
  return Splits(train=train, valid=valid, test=test, counts=counts)


SPLITS = ("leave_one_out", "timestamp")


def dataset_splits(dataset: Dataset) -> Splits:
  """The splits a dataset's manifest asks for (options["split"]); leave-one-out if it names none."""
  options = dataset.manifest.get("options", {})
  split = options.get("split", "leave_one_out")
  if split == "leave_one_out":
    return leave_one_out(dataset)
  if split == "timestamp":
    for key in ("split_valid_start_ms", "split_test_start_ms"):
      if not isinstance(options.get(key), int):
        raise DatasetError(f"{dataset.path / MANIFEST}: options name the timestamp split but key {key!r} is "
                           f"{options.get(key)!r}, expected an integer (milliseconds)")
    return timestamp_split(dataset, options["split_valid_start_ms"], options["split_test_start_ms"],
                           options.get("split_cases", "all"))
  raise DatasetError(f"{dataset.path / MANIFEST}: options name split {split!r}, not one of {SPLITS}")

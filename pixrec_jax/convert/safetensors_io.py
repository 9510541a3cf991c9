"""Reading and writing safetensors files as numpy, without torch.

The format is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte offsets) and the raw tensor bytes. bfloat16 comes from
ml_dtypes (a jax dependency), which the `safetensors` numpy backend lacks.
Only safetensors is read: never pickle.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
  """Lazy, memory-mapped access to one .safetensors file."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
      (size,) = struct.unpack("<Q", raw)
      if size > _MAX_HEADER:
        raise ValueError(f"{self.path}: safetensors header of {size} bytes is implausibly large")
      try:
        header = json.loads(f.read(size))
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.path}: corrupt safetensors header: {e.msg}") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._data_start = 8 + size
    self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return list(self._header)

  def get(self, name: str) -> np.ndarray:
    try:
      entry = self._header[name]
    except KeyError:
      raise KeyError(f"{self.path}: no tensor named {name!r}") from None
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    buf = self._mmap[self._data_start + begin:self._data_start + end]
    shape = tuple(entry["shape"])
    if buf.size != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"{self.path}: tensor {name!r} byte range does not match shape {shape} of {entry['dtype']}")
    return buf.view(dtype).reshape(shape)


class CheckpointReader:
  """All tensors of a Hugging Face checkpoint directory: one model.safetensors, or
  shards listed by model.safetensors.index.json."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    index = self.directory / "model.safetensors.index.json"
    single = self.directory / "model.safetensors"
    self._where: dict[str, SafetensorsFile] = {}
    if index.is_file():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: missing 'weight_map'")
      files = {}
      for name, shard in weight_map.items():
        shard_path = (self.directory / shard).resolve()
        if shard_path.parent != self.directory.resolve():
          raise ValueError(f"{index}: shard {shard!r} for {name!r} points outside the checkpoint directory")
        if shard not in files:
          if not shard_path.is_file():
            raise FileNotFoundError(f"{index}: shard {shard!r} (listed for {name!r}) does not exist")
          files[shard] = SafetensorsFile(shard_path)
        self._where[name] = files[shard]
    elif single.is_file():
      f = SafetensorsFile(single)
      self._where = {name: f for name in f.keys()}
    else:
      found = sorted(p.name for p in self.directory.glob("*"))
      raise FileNotFoundError(f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                              f"(weights are read from safetensors only); found {found}")

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}")
    return self._where[name].get(name)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for name in self._where:
      yield name, self.get(name)


def save_file(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path, metadata: Mapping[str, str] | None = None):
  """Writes numpy arrays (bfloat16 included) as one safetensors file."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in _NAMES:
      raise ValueError(f"cannot save tensor {name!r} of dtype {arr.dtype} as safetensors")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # align tensor data to 8 bytes, as the reference writer does
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in arrays:
      f.write(arr.tobytes())
  tmp.replace(path)

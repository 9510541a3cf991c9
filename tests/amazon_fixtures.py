"""Raw Amazon Reviews 2023 files in the official schema, and a loopback server for them.

The server answers from a table of routes and logs every request, so tests can
serve inputs and images over real HTTP, including 404s, stalls and corrupt files,
and count what an ingestion fetched.
"""

import dataclasses
import gzip
import http.server
import io
import json
import pathlib
import struct
import threading
import time
import zlib

from PIL import Image


def review(user_id, parent_asin, timestamp, **extra):
  """A review line as the raw files hold it; None leaves a field out."""
  record = {"rating": 5.0, "title": "Nice", "text": "Works.", "images": [], "asin": parent_asin,
            "parent_asin": parent_asin, "user_id": user_id, "timestamp": timestamp,
            "helpful_vote": 0, "verified_purchase": True, **extra}
  return {k: v for k, v in record.items() if v is not None}


def image_entry(hi_res=None, large=None, thumb=None, variant="MAIN"):
  return {"thumb": thumb, "large": large, "variant": variant, "hi_res": hi_res}


def meta(parent_asin, title=None, main_category=None, brand=None, price=None, images=()):
  """A meta line as the raw files hold it."""
  return {"main_category": main_category, "title": title, "average_rating": 4.5, "rating_number": 10,
          "features": [], "description": [], "price": price, "images": list(images), "videos": [],
          "store": None, "categories": [], "details": {"Brand": brand} if brand else {},
          "parent_asin": parent_asin, "bought_together": None}


def jsonl_bytes(lines, compress=False) -> bytes:
  """JSON lines; a bytes entry is written as is (for malformed or non-UTF-8 lines)."""
  data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
  # mtime=0 keeps the gzip bytes, and so the input sha256, the same across runs.
  return gzip.compress(data, mtime=0) if compress else data


def write_jsonl(path: pathlib.Path, lines, compress=False) -> pathlib.Path:
  path.write_bytes(jsonl_bytes(lines, compress))
  return path


def image_bytes(colour=(200, 30, 30), size=8, format="JPEG") -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (size, size), colour).save(buffer, format=format)
  return buffer.getvalue()


def corrupt_jpeg() -> bytes:
  """A JPEG cut in half: the header reads, the pixels do not."""
  data = image_bytes(size=64)
  return data[: len(data) // 2]


def png_bomb(width=100_000, height=100_000) -> bytes:
  """A PNG header claiming width x height pixels, with almost no data behind it."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale.
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


@dataclasses.dataclass
class Route:
  """One response: `stall_s` seconds of silence, before the headers or after `stall_after` body bytes."""

  body: bytes = b""
  status: int = 200
  stall_s: float = 0.0
  stall_after: int | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_GET(self):
    self._answer(with_body=True)

  def do_HEAD(self):
    self._answer(with_body=False)

  def _answer(self, with_body: bool):
    fixture = self.server.fixture
    fixture.record(self.command, self.path)
    route = fixture.routes.get(self.path, Route(b"no such route", status=404))
    try:
      if route.stall_s and route.stall_after is None:
        time.sleep(route.stall_s)
      self.send_response(route.status)
      self.send_header("Content-Length", str(len(route.body)))
      self.send_header("ETag", f'"{zlib.crc32(route.body):08x}"')
      self.end_headers()
      if not with_body:
        return
      if route.stall_after is not None:
        self.wfile.write(route.body[: route.stall_after])
        self.wfile.flush()
        time.sleep(route.stall_s)
        self.wfile.write(route.body[route.stall_after:])
      else:
        self.wfile.write(route.body)
    except (BrokenPipeError, ConnectionResetError):
      pass  # The client gave up on a stall, as it should.

  def log_message(self, format, *args):
    pass


class FixtureServer:
  """A ThreadingHTTPServer on 127.0.0.1 serving `routes` (path -> Route) from a thread."""

  def __init__(self):
    self.routes: dict[str, Route] = {}
    self.requests: list[tuple[str, str]] = []
    self._lock = threading.Lock()

  def record(self, method: str, path: str) -> None:
    with self._lock:
      self.requests.append((method, path))

  def count(self, path: str | None = None, method: str = "GET", prefix: str = "") -> int:
    with self._lock:
      return sum(m == method and (p == path if path is not None else p.startswith(prefix))
                 for m, p in self.requests)

  def reset(self) -> None:
    with self._lock:
      self.requests.clear()

  def url(self, path: str) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

  def __enter__(self):
    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    self._server.daemon_threads = True  # Stalled handlers must not hold up the test's exit.
    self._server.fixture = self
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()

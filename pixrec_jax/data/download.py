"""Image downloads for ingestion: concurrent, retried, time-limited, validated, cached.

A file is cached under a name derived only from the sha256 of its URL plus an
allow-listed extension (`cache_name`), so no URL can choose where it is written.
Only files that decoded completely with PIL, within a pixel limit that stops
decompression bombs, are ever renamed into the cache (written to a temporary file
first), so a cached file is a valid image and a rerun or an interrupted run never
fetches it again. Failures are not cached: a later run retries them.

Every request has a per-operation socket timeout (connect and each read) and a
deadline for the whole body, so neither a server that never answers nor one that
drips a byte at a time can hang a run. Timeouts, dropped connections and HTTP
408/429/5xx are retried with exponential backoff; 404 and other client errors,
undecodable and oversized images are not, since another try would get the same.
Only http and https URLs are fetched: a meta file must not make us read local files.
"""

import concurrent.futures
import dataclasses
import hashlib
import http.client
import io
import os
import pathlib
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable

from PIL import Image
from tqdm import tqdm

from pixrec_jax.data import images

USER_AGENT = "pixrec_jax-ingest/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")

# Outcomes of one URL; the manifest counts them under these names.
DOWNLOADED = "downloaded"
CACHED = "cached"
NOT_FOUND = "not_found"  # HTTP 404 or 410.
HTTP_ERROR = "http_error"  # Any other HTTP error status, after retries where retryable.
TIMEOUT = "timeout"  # Socket timeout or body deadline, after retries.
NETWORK_ERROR = "network_error"  # Refused, reset or truncated connections, after retries.
INVALID = "invalid"  # Not an image PIL can decode completely (corrupt, truncated, HTML).
TOO_LARGE = "too_large"  # More pixels than max_pixels, or more bytes than max_bytes.
BAD_URL = "bad_url"  # Not an http(s) URL.
OUTCOMES = (DOWNLOADED, CACHED, NOT_FOUND, HTTP_ERROR, TIMEOUT, NETWORK_ERROR, INVALID, TOO_LARGE, BAD_URL)
OK = (DOWNLOADED, CACHED)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Settings:
  """How images are fetched and what is accepted."""

  timeout_s: float = 10.0  # Per socket operation: connect, and each read.
  deadline_s: float = 60.0  # For one whole request, body included.
  retries: int = 3  # Further attempts after the first, for retryable failures.
  backoff_s: float = 0.5  # Sleep backoff_s * 2**k before retry k (k = 0, 1, ...).
  max_pixels: int = images.MAX_PIXELS
  max_bytes: int = 50 * 2**20
  workers: int = 16

  def __post_init__(self):
    if self.timeout_s <= 0 or self.deadline_s <= 0:
      raise ValueError(f"timeouts must be positive; got {self}")
    if self.retries < 0 or self.backoff_s < 0 or self.workers < 1:
      raise ValueError(f"need retries >= 0, backoff_s >= 0 and workers >= 1; got {self}")
    if self.max_pixels < 1 or self.max_bytes < 1:
      raise ValueError(f"max_pixels and max_bytes must be positive; got {self}")


@dataclasses.dataclass(frozen=True)
class Result:
  """What became of one URL; `path` is set exactly when the outcome is in OK."""

  url: str
  outcome: str
  path: pathlib.Path | None = None
  detail: str = ""
  attempts: int = 0


class Rejected(Exception):
  """A response that another attempt would not fix; args are (outcome, detail)."""


def cache_name(url: str) -> str:
  """The cache-relative file name for `url`: "ab/ab12...ef.jpg".

  Only hex digits, one "/" and an allow-listed extension, whatever the URL holds
  ("../", absolute paths, queries), so the file is always inside the cache folder.
  Two-character subfolders keep folders small for catalogues of 100k+ images.
  """
  digest = hashlib.sha256(url.encode("utf-8", errors="surrogatepass")).hexdigest()
  suffix = pathlib.PurePosixPath(urllib.parse.urlsplit(url).path).suffix.lower()
  if suffix not in IMAGE_EXTENSIONS:
    suffix = ".img"  # PIL identifies images by content, not by name.
  return f"{digest[:2]}/{digest}{suffix}"


def http_opener() -> urllib.request.OpenerDirector:
  """An opener for http(s) only: no file:, ftp: or data: URLs, also not via redirects."""
  opener = urllib.request.OpenerDirector()
  for handler in (
      urllib.request.ProxyHandler(),
      urllib.request.HTTPHandler(),
      urllib.request.HTTPSHandler(),
      urllib.request.HTTPDefaultErrorHandler(),
      urllib.request.HTTPRedirectHandler(),
      urllib.request.HTTPErrorProcessor(),
  ):
    opener.add_handler(handler)
  return opener


def is_http_url(location: str) -> bool:
  return urllib.parse.urlsplit(location).scheme.lower() in ("http", "https")


def check_image(data: bytes, max_pixels: int) -> None:
  """Raises Rejected unless `data` decodes completely into at most max_pixels pixels."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      # The header gives the size before anything is decompressed.
      if image.width * image.height > max_pixels:
        raise Rejected(TOO_LARGE, f"{image.width}x{image.height} pixels exceeds the limit of {max_pixels}")
      image.load()
  except Rejected:
    raise
  except Image.DecompressionBombError as e:
    raise Rejected(TOO_LARGE, str(e)) from None
  except Exception as e:  # PIL raises many types on corrupt data; all mean "not an image".
    raise Rejected(INVALID, f"{type(e).__name__}: {e}") from None


def _get(opener: urllib.request.OpenerDirector, url: str, settings: Settings) -> bytes:
  """One GET of the whole body within the deadline; raises on any failure."""
  start = time.monotonic()
  request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
  with opener.open(request, timeout=settings.timeout_s) as response:
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    if expected is not None and expected > settings.max_bytes:
      raise Rejected(TOO_LARGE, f"{expected} bytes exceeds the limit of {settings.max_bytes}")
    body = io.BytesIO()
    # read1 returns after one socket read, so the deadline is checked however slowly bytes drip.
    while chunk := response.read1(_CHUNK):
      body.write(chunk)
      if body.tell() > settings.max_bytes:
        raise Rejected(TOO_LARGE, f"more than {settings.max_bytes} bytes")
      if time.monotonic() - start > settings.deadline_s:
        raise TimeoutError(f"body not complete after the {settings.deadline_s} s deadline")
  # http.client returns a short body silently when the connection drops.
  if expected is not None and body.tell() != expected:
    raise http.client.IncompleteRead(body.getvalue(), expected - body.tell())
  return body.getvalue()


def write_atomically(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
  try:
    with open(temp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    temp.unlink(missing_ok=True)
    raise


def fetch(url: str, cache_dir: str | os.PathLike, settings: Settings = Settings()) -> Result:
  """Brings `url` into the cache, or says why not; never raises for network or data errors."""
  path = pathlib.Path(cache_dir) / cache_name(url)
  if path.is_file():
    return Result(url, CACHED, path)
  if not is_http_url(url):
    return Result(url, BAD_URL, detail="not an http(s) URL")
  opener = http_opener()
  outcome, detail = NETWORK_ERROR, ""
  for attempt in range(settings.retries + 1):
    if attempt:
      time.sleep(settings.backoff_s * 2 ** (attempt - 1))
    try:
      data = _get(opener, url, settings)
      check_image(data, settings.max_pixels)
    except Rejected as e:
      return Result(url, e.args[0], detail=e.args[1], attempts=attempt + 1)
    except urllib.error.HTTPError as e:
      e.close()
      outcome, detail = (NOT_FOUND if e.code in (404, 410) else HTTP_ERROR), f"HTTP {e.code}"
      if e.code not in RETRY_STATUSES:
        return Result(url, outcome, detail=detail, attempts=attempt + 1)
    except TimeoutError as e:
      outcome, detail = TIMEOUT, str(e) or "timed out"
    except urllib.error.URLError as e:
      # Connect timeouts arrive wrapped in URLError.
      outcome = TIMEOUT if isinstance(e.reason, TimeoutError) else NETWORK_ERROR
      detail = str(e.reason)
    except (http.client.HTTPException, OSError) as e:
      outcome, detail = NETWORK_ERROR, f"{type(e).__name__}: {e}"
    else:
      write_atomically(path, data)
      return Result(url, DOWNLOADED, path, attempts=attempt + 1)
  return Result(url, outcome, detail=detail, attempts=settings.retries + 1)


def fetch_all(
    urls: Iterable[str], cache_dir: str | os.PathLike, settings: Settings = Settings(), progress: bool = True
) -> dict[str, Result]:
  """Fetches distinct URLs concurrently; cached ones are answered without a thread."""
  cache_dir = pathlib.Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  results, pending = {}, []
  for url in dict.fromkeys(urls):
    path = cache_dir / cache_name(url)
    if path.is_file():
      results[url] = Result(url, CACHED, path)
    else:
      pending.append(url)
  if not pending:
    return results
  with (
      concurrent.futures.ThreadPoolExecutor(max_workers=settings.workers) as pool,
      tqdm(total=len(pending), desc="images", unit="img", disable=not progress) as bar,
  ):
    futures = [pool.submit(fetch, url, cache_dir, settings) for url in pending]
    for future in concurrent.futures.as_completed(futures):
      result = future.result()
      results[result.url] = result
      bar.update()
  return results

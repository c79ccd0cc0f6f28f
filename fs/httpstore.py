"""A chunk store behind HTTP: GET (and HEAD) of `<base>/ab/cd/<hex>` from any static web server or CDN.

Reads need nothing but a server that serves the store's directory as files (byte ranges of named files, as
every static server serves them, make a large named file readable in parts). Uploads (`put`) use HTTP PUT, which
Debian's nginx accepts with its WebDAV module (`dav_methods PUT; create_full_put_path on;`): nginx writes the body
to a temporary file and renames it into place, so a reader sees a whole object or none. A server without PUT works
as well for pushing: write the directory it serves with `LocalStore` (same layout) and read it back over HTTP.

One urllib3 connection pool per store, keep-alive, safe to share between many worker threads (the pool hands each
request its own connection; `pool_size` connections are kept open, and more requesters wait for one).
Transient failures (connection errors, timeouts, 5xx) are retried `retries` times with a short growing backoff,
then reported as StoreUnavailable naming the URL and the last cause. A 404 is ChunkMissing at once. The store
returns bytes as served; `objects.decode` verifies them.
"""

from __future__ import annotations

import io
import time

import urllib3

from .errors import ChunkMissing, StoreUnavailable
from .store import ByteStream, named_path, object_path

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0


class HttpStore:
    """The store at `base_url` (objects at `<base_url>/ab/cd/<hex>`). `timeout` bounds each connect and each read,
    `retries` the extra attempts after a transient failure; `upload=False` makes `put` refuse (a read-only CDN)."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, retries: int = 3, pool_size: int = 32,
                 upload: bool = True) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise StoreUnavailable(f"store URL {base_url!r}: expected http:// or https://")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.upload = upload
        self._path_prefix = urllib3.util.parse_url(self.base_url).path or ""
        # Retries are ours (they apply to status codes too, and end in our error); urllib3's own are off.
        self._pool = urllib3.connection_from_url(
            self.base_url, maxsize=pool_size, block=True, retries=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )

    def describe(self) -> str:
        return self.base_url

    def url_of(self, digest: bytes) -> str:
        return f"{self.base_url}/{object_path(digest)}"

    def get(self, digest: bytes) -> bytes:
        response = self._request("GET", object_path(digest))
        if response.status == 404:
            raise ChunkMissing(digest, self.base_url)
        return response.data

    def stream(self, digest: bytes) -> ByteStream:
        response = self._request("GET", object_path(digest), stream=True)
        if response.status == 404:
            response.drain_conn()
            response.release_conn()
            raise ChunkMissing(digest, self.base_url)
        return _Body(response, self.url_of(digest))

    def has(self, digest: bytes) -> bool:
        return self._request("HEAD", object_path(digest)).status == 200

    def put(self, digest: bytes, stored: bytes) -> None:
        """Upload an object by HTTP PUT unless the store has it already (objects are immutable)."""
        if not self.upload:
            raise StoreUnavailable(f"{self.base_url} is read-only here (upload=False): push to the directory "
                                   "it serves instead")
        if self.has(digest):
            return
        self._request("PUT", object_path(digest), body=stored, expect=(200, 201, 204))

    def get_named(self, name: str) -> bytes | None:
        response = self._request("GET", named_path(name))
        return None if response.status == 404 else response.data

    def read_named(self, name: str, start: int, end: int | None = None) -> ByteStream | None:
        """A stream of a byte range of a named file: one GET with a Range header, its body read as it arrives."""
        byte_range = f"bytes={start}-{'' if end is None else end - 1}"
        response = self._request("GET", named_path(name), headers={"Range": byte_range}, stream=True,
                                 expect=(200, 206, 404, 416))
        if response.status in (404, 416):  # 416: the file ends before `start`
            response.drain_conn()
            response.release_conn()
            return None if response.status == 404 else io.BytesIO()
        body = _Body(response, f"{self.base_url}/{named_path(name)}")
        if response.status == 200:  # a server that ignores ranges sends the whole file: skip, 1 MiB at a time
            left = start
            while left and (part := body.read(min(left, 1 << 20))):
                left -= len(part)
        return body

    def put_named(self, name: str, data: bytes) -> None:
        if not self.upload:
            raise StoreUnavailable(f"{self.base_url} is read-only here (upload=False)")
        self._request("PUT", named_path(name), body=data, expect=(200, 201, 204))

    def close(self) -> None:
        self._pool.close()

    def _request(self, method: str, relative: str, body: bytes | None = None, expect: tuple[int, ...] = (200, 404),
                 headers: dict[str, str] | None = None, stream: bool = False) -> urllib3.BaseHTTPResponse:
        """`method` on `relative` (a path under the base URL), with bounded retries; with `stream`, an expected
        response's body is left to read (the retries cover everything up to its first byte)."""
        url = f"{self.base_url}/{relative}"
        path = f"{self._path_prefix}/{relative}"
        headers = dict(headers or {})
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        cause = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(_BACKOFF_FIRST * 2 ** (attempt - 1), _BACKOFF_MAX))
            try:
                response = self._pool.request(method, path, body=body, headers=headers, preload_content=not stream,
                                              redirect=False)
            except urllib3.exceptions.HTTPError as error:
                cause = _describe_error(error)
                continue
            if response.status in expect:
                return response
            if stream:
                response.drain_conn()  # an error's body: small; the connection goes back to the pool
                response.release_conn()
            if response.status >= 500:
                cause = f"HTTP {response.status} {response.reason}"
                continue
            # Any other answer (403, 405 for a PUT nginx does not allow, ...) will not change on a retry.
            raise StoreUnavailable(f"{method} {url}: HTTP {response.status} {response.reason}"
                                   f"{_hint(method, response.status)}")
        attempts = self.retries + 1
        raise StoreUnavailable(f"{method} {url}: {cause} (after {attempts} attempt{'s' if attempts > 1 else ''})")


class _Body:
    """A response's body as a stream. Closing it returns the connection to the pool, closed first unless the body
    was read to its end (what is left of the body would wait in it)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, url: str) -> None:
        self._response = response
        self._url = url

    def read(self, size: int) -> bytes:
        try:
            return self._response.read(size)
        except urllib3.exceptions.HTTPError as error:  # the connection broke or timed out mid-body
            raise StoreUnavailable(f"GET {self._url}: {_describe_error(error)}") from None

    def close(self) -> None:
        if self._response.length_remaining != 0:
            self._response.close()
        self._response.release_conn()  # the pool's slot: a closed connection is opened again when next used


def _describe_error(error: urllib3.exceptions.HTTPError) -> str:
    # urllib3 wraps the OSError that says what happened (refused, reset, timed out): name that one.
    reason = getattr(error, "reason", None) or error.__cause__ or error.__context__
    return f"{type(error).__name__}: {reason}" if reason else f"{type(error).__name__}: {error}"


def _hint(method: str, status: int) -> str:
    if method == "PUT" and status == 405:
        return " (the server does not accept PUT: enable WebDAV, `dav_methods PUT`, or push to its directory)"
    if method == "PUT" and status == 413:
        return " (the server limits request bodies: raise nginx's `client_max_body_size`, or push to its directory)"
    return ""

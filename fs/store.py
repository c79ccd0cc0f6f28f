"""Chunk stores: where content-addressed objects live. One small interface, several places.

A store keeps *stored* bytes (zstd frames, see `objects`) under the hex of their digest, sharded as
`ab/cd/abcd...`: the same layout on a local disk and behind any static web server, so a directory that a
`LocalStore` wrote can be served as-is by nginx or a CDN and read with `HttpStore`.

Stores are synchronous and thread-safe: callers (the FUSE daemon, push) run them on worker threads with
bounded concurrency. Stores do not verify; `objects.decode` does, for every object, before use.
"""

from __future__ import annotations

import os
from typing import Protocol

from .errors import ChunkMissing


class ByteStream(Protocol):
    def read(self, size: int) -> bytes:
        """At most `size` bytes, b"" at the end."""

    def close(self) -> None: ...


def read_up_to(stream: ByteStream, size: int) -> bytes:
    """`size` bytes of a stream, fewer only where it ends."""
    parts = []
    while size and (part := stream.read(size)):
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


class ChunkStore(Protocol):
    def get(self, digest: bytes) -> bytes:
        """The stored bytes of an object. Raises ChunkMissing, or StoreUnavailable when the store cannot answer."""

    def stream(self, digest: bytes) -> ByteStream:
        """The stored bytes of an object as they arrive (`objects.decode_stream`); close it. Raises as `get`
        does, and its reads raise StoreUnavailable when the store fails midway."""

    def put(self, digest: bytes, stored: bytes) -> None:
        """Store an object; idempotent, and atomic: a reader sees all of it or none."""

    def has(self, digest: bytes) -> bool: ...

    def get_named(self, name: str) -> bytes | None:
        """A small mutable file beside the objects (`profiles/<reference>`), or None when there is none."""

    def put_named(self, name: str, data: bytes) -> None:
        """Write (or replace) a named file atomically."""

    def read_named(self, name: str, start: int, end: int | None = None) -> ByteStream | None:
        """A stream of a named file from `start`, or None when there is none. It holds the bytes up to `end` (or
        the file's end) and may go on past `end` (a local file, a server that ignores ranges): read no more than
        the range. `read(size)` on it gives at most `size` bytes, b"" at the end; close it. Raises
        StoreUnavailable."""

    def describe(self) -> str:
        """Where the store is, for messages (a path or a URL)."""


def object_path(digest: bytes) -> str:
    """The object's path relative to a store's root."""
    name = digest.hex()
    return f"{name[0:2]}/{name[2:4]}/{name}"


class LocalStore:
    """A directory on a local filesystem (the embedded default)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self._directories: set[str] = set()  # shard directories known to exist

    def describe(self) -> str:
        return self.root

    def get(self, digest: bytes) -> bytes:
        try:
            with open(os.path.join(self.root, object_path(digest)), "rb") as file:
                return file.read()
        except FileNotFoundError:
            raise ChunkMissing(digest, self.root) from None

    def stream(self, digest: bytes) -> ByteStream:
        try:
            return open(os.path.join(self.root, object_path(digest)), "rb")
        except FileNotFoundError:
            raise ChunkMissing(digest, self.root) from None

    def has(self, digest: bytes) -> bool:
        return os.path.exists(os.path.join(self.root, object_path(digest)))

    def put(self, digest: bytes, stored: bytes) -> None:
        path = os.path.join(self.root, object_path(digest))
        if os.path.exists(path):
            return
        directory = os.path.dirname(path)
        if directory not in self._directories:
            os.makedirs(directory, exist_ok=True)
            self._directories.add(directory)
        # A unique temporary name per writer, then rename: concurrent pushes of one object never tear it.
        temporary = f"{path}.{os.getpid()}.{id(stored):x}.tmp"
        with open(temporary, "wb") as file:
            file.write(stored)
        # nginx serves the directory as another user; objects are public by design (content-addressed).
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)


    def get_named(self, name: str) -> bytes | None:
        try:
            with open(os.path.join(self.root, named_path(name)), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def read_named(self, name: str, start: int, end: int | None = None) -> ByteStream | None:
        try:
            file = open(os.path.join(self.root, named_path(name)), "rb")
        except FileNotFoundError:
            return None
        file.seek(start)
        return file

    def put_named(self, name: str, data: bytes) -> None:
        path = os.path.join(self.root, named_path(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)


def named_path(name: str) -> str:
    """A named file's path relative to a store's root. Named files live under `named/`; a name is `kind/hex` and never climbs out of the store."""
    parts = name.split("/")
    if len(parts) != 2 or not all(part and part.replace("-", "").isalnum() for part in parts):
        raise ValueError(f"bad name for a store file: {name!r}")
    return f"named/{name}"


def open_store(location: str) -> ChunkStore:
    """A store from a location: an http(s) URL or a local directory."""
    if location.startswith(("http://", "https://")):
        from .httpstore import HttpStore

        return HttpStore(location)
    return LocalStore(location)

"""coldbrew.fs: the lazy, content-addressed image filesystem.

    from coldbrew import fs
    reference = fs.push("/path/to/tree", fs.open_store("/var/lib/coldbrew/store")).reference
    root = fs.create_root(reference, "/run/ctr1", store="http://store.example/chunks")  # writable, lazy
    ...                                                                                  # root.path of a bundle
    fs.remove_root("/run/ctr1")

Names are imported on first use (this package is imported by the `coldbrew` command line, which must stay light).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "push": "pushing", "PushResult": "pushing",
    "open_store": "store", "LocalStore": "store", "ChunkStore": "store",
    "HttpStore": "httpstore",
    "ChunkCache": "cache", "DEFAULT_CACHE_DIR": "cache", "DEFAULT_CACHE_SIZE": "cache",
    "mount": "daemon", "unmount": "daemon", "mount_stats": "daemon",
    "create_root": "rootfs", "remove_root": "rootfs",
    "Index": "index", "IndexBuilder": "index",
    "FsError": "errors", "BadIndex": "errors", "BadReference": "errors", "ChunkMissing": "errors",
    "CorruptChunk": "errors", "StoreUnavailable": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coldbrew.fs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

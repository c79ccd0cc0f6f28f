"""Checkpoint and restore of containers with CRIU: `snapshot(container, image_path) -> Snapshot` and
`restore(runtime, snapshot, container_id) -> Container` (see coldbrew.snapshot.checkpoint).

Warm points (coldbrew.snapshot.warm): `warm.run(runtime, id, bundle, key, store=...)` is `coldbrew run --snapshot`;
`warm.start(...)` runs a container with a warm point, `WarmContainer.snapshot(...)` snapshots it there into a chunk
store, `warm.restore(runtime, store.load(...), id, bundle)` brings a copy back. Snapshots in coldbrew.fs's chunk
store: coldbrew.snapshot.store. The program's side: coldbrew.snapshot.warmpoint (`warmpoint.ready()`).

The names below are the public surface; they load on first use.
"""

_EXPORTS = {
    "snapshot": "checkpoint", "restore": "checkpoint", "Snapshot": "image",
    "Criu": "criu", "find_criu": "criu",
    "CriuError": "errors", "CriuNotFound": "errors", "SnapshotError": "errors",
    "CudaError": "errors", "CudaUnavailable": "errors",
    "WarmContainer": "warm", "WarmRun": "warm",
    "SnapshotCache": "store", "StoredSnapshot": "store", "LoadedSnapshot": "store",
    "SnapshotMismatch": "store", "SnapshotCorrupt": "store", "SnapshotNotFound": "store",
}
_RENAMED = {"find_criu": "find"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), _RENAMED.get(name, name))

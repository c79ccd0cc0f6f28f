"""A container root from an image: overlayfs (upper and work on local disk) over the image's read-only layers.

`create_root(reference, directory, store=...)` makes, under `directory`:
  image/    the FUSE mount of the image (read-only, shared page cache, chunks fetched on first read)
  meta/     the image's EROFS metadata image (`coldbrew.fs.erofs`), mounted: lookups, stat and readdir stay in
            the kernel, and a regular file's data is looked up by path in the data-only layers below it
  upper/    the container's changes          work/  overlayfs's scratch space
  rootfs/   the merged, writable root: point a bundle's `root.path` at it
The lower layers are `meta::HOT::image`, HOT being the host's hot layer for the image's start-up profile
(`coldbrew.fs.hotlayer`: the files a start reads whole, on local disk), when the store has a profile. A kernel
without file-backed EROFS (6.12) or data-only overlay layers (6.5) gets `image` alone, as does a tree EROFS
cannot express. `remove_root(directory)` takes all of it down. Both are idempotent about what already is or is
not there, so a half-made root (a crash in between) is removed as well.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from typing import TYPE_CHECKING

from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from .errors import FsError
from .mounts import mount_erofs, mount_overlay, mounted, umount

if TYPE_CHECKING:
    from .index import Index
    from .store import ChunkStore

log = logging.getLogger("coldbrew.fs")

_PARTS = ("image", "meta", "upper", "work", "rootfs")
METADATA_DIRECTORY = "erofs"


def create_root(reference: str, directory: str, *, store: str, cache_dir: str = DEFAULT_CACHE_DIR,
                cache_size: int = DEFAULT_CACHE_SIZE, record_profile: bool = False, hot: bool = True,
                **mount_options: object) -> str:
    """Mount `reference` with a writable layer under `directory`; returns the root's path (`directory/rootfs`).

    `hot`: stack the hot layer of the image's start-up profile, building it first (its chunks fetched) if this
    host has none; a recording root (`record_profile`) gets none, the reads it records must reach FUSE. The cache
    options and `mount_options` (prefetch) go to `coldbrew.fs.daemon.mount`.
    """
    from .daemon import mount

    directory = os.path.abspath(directory)
    image, meta, upper, work, merged = (os.path.join(directory, part) for part in _PARTS)
    if os.path.exists(merged) and mounted(merged):
        raise FsError(f"{directory} already holds a mounted container root")
    for path in (image, meta, upper, work, merged):
        os.makedirs(path, exist_ok=True)
    try:
        metadata, hot_layer = _local_layers(reference, store, cache_dir, cache_size, hot=hot and not record_profile)
        mount(reference, image, store=store, cache_dir=cache_dir, cache_size=cache_size,
              record_profile=record_profile, **mount_options)
        error = mount_erofs(metadata, meta) if metadata is not None else errno.ENOENT
        if error not in (0, errno.ENOTBLK, errno.ENODEV, errno.ENOENT):
            # A damaged image file (a crash before it reached the disk): made again next time.
            log.warning("EROFS image %s does not mount (%s); removed", metadata, os.strerror(error))
            os.unlink(metadata)
        if error == 0:
            lower = "::".join(path for path in (meta, hot_layer, image) if path)
            error = mount_overlay(merged, lower, upper, work)
            if error:
                log.warning("overlay with data-only layers on %s: %s; the image's metadata comes from FUSE",
                            merged, os.strerror(error))
                umount(meta)
        if error:
            error = mount_overlay(merged, image, upper, work)
        if error:
            raise FsError(f"overlay mount on {merged}: {os.strerror(error)}")
    except BaseException:
        remove_root(directory)
        raise
    return merged


def _local_layers(reference: str, store_location: str, cache_dir: str, cache_size: int, *,
                  hot: bool) -> tuple[str | None, str | None]:
    """(the image's EROFS metadata image, its hot layer or None), made on this host if missing.

    The metadata image is None when the tree holds what EROFS cannot express.
    """
    from . import erofs
    from .cache import ChunkCache, load_index
    from .hotlayer import hot_layer
    from .profile import profile_name
    from .store import open_store

    store = open_store(store_location)
    try:
        with ChunkCache(cache_dir, cache_size) as cache:
            index, mapped = load_index(reference, store, cache)
            try:
                redirects = None
                metadata = os.path.join(cache.directory, METADATA_DIRECTORY, reference)
                if not os.path.exists(metadata):
                    os.makedirs(os.path.dirname(metadata), exist_ok=True)
                    if not _fetch_metadata_image(index, store, metadata):
                        redirects = erofs.redirect_paths(index)
                        try:
                            erofs.write_image(index, metadata, redirects)
                        except erofs.UnsupportedTree as error:
                            log.warning("image %s is served from FUSE alone: %s", reference, error)
                            return None, None
                profile = store.get_named(profile_name(reference)) if hot else None
                if not profile:
                    return metadata, None
                if redirects is None:
                    redirects = erofs.redirect_paths(index)
                return metadata, hot_layer(index, reference, profile, store, cache, redirects=redirects)
            finally:
                index.release()
                mapped.close()
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def _fetch_metadata_image(index: Index, store: ChunkStore, path: str) -> bool:
    """Save the EROFS image that the index names (pushed beside it) at `path`; False if there is none to use."""
    from . import erofs, objects
    from .index import MAX_INDEX_SIZE

    named = index.metadata.get(erofs.INDEX_METADATA_KEY)
    if not isinstance(named, dict) or named.get("tree") != index.body_digest().hex():
        return False
    name = str(named.get("image"))
    try:
        digest = objects.parse_reference(name)
        erofs.save_image(objects.decode(digest, store.get(digest), MAX_INDEX_SIZE), path)
    except FsError as error:  # missing or corrupt: written here instead
        log.warning("the stored EROFS image %s is not used: %s", name, error)
        return False
    return True


def remove_root(directory: str) -> None:
    """Unmount the overlay, the metadata image and the image and remove everything `create_root` made."""
    from .daemon import unmount

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FsError(f"{directory} is not a container root")
    merged = os.path.join(directory, "rootfs")
    meta = os.path.join(directory, "meta")
    image = os.path.join(directory, "image")
    if os.path.isdir(merged) and mounted(merged):
        if umount(merged):
            # Busy (a process still inside): detach, so the layers below can go too.
            umount(merged, detach=True)
    if os.path.isdir(meta) and mounted(meta) and umount(meta):
        umount(meta, detach=True)
    if os.path.isdir(image) and mounted(image):
        unmount(image)
    for part in _PARTS:
        path = os.path.join(directory, part)
        if os.path.isdir(path) and not mounted(path):
            shutil.rmtree(path)
    try:
        os.rmdir(directory)
    except OSError:
        pass  # the caller's own files are left alone

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

With `keep_mounted`, `image` and `meta` are links to the host's shared, mounted layers of the image
(`coldbrew.fs.imagestack`) instead: a root of an image whose layers are mounted is one overlay mount.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil

from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE
from .errors import FsError
from .mounts import link_target, mount_erofs, mount_overlay, mounted, umount

log = logging.getLogger("coldbrew.fs")

_PARTS = ("image", "meta", "upper", "work", "rootfs")


def create_root(reference: str, directory: str, *, store: str, cache_dir: str = DEFAULT_CACHE_DIR,
                cache_size: int = DEFAULT_CACHE_SIZE, record_profile: bool = False, hot: bool = True,
                keep_mounted: float | None = None, **mount_options: object) -> str:
    """Mount `reference` with a writable layer under `directory`; returns the root's path (`directory/rootfs`).

    `hot`: stack the hot layer of the image's start-up profile, which the image's daemon fills while the root
    runs if this host has none; a recording root (`record_profile`) gets none, the reads it records must reach
    FUSE. The cache options and `mount_options` (prefetch) go to `coldbrew.fs.daemon.mount`.
    `keep_mounted`: stack the root on the host's shared read-only layers of the image (`coldbrew.fs.imagestack`,
    mounted now if none are), which stay mounted that many seconds after their last root is removed, so that the
    next root of the image is one overlay mount; `directory/image` and `directory/meta` are then links to them.
    None: the root has layers of its own, taken down with it. A recording root always has its own.
    """
    directory = os.path.abspath(directory)
    image, meta, upper, work, merged = (os.path.join(directory, part) for part in _PARTS)
    if os.path.exists(merged) and mounted(merged):
        raise FsError(f"{directory} already holds a mounted container root")
    for path in (upper, work, merged):
        os.makedirs(path, exist_ok=True)
    options = dict(store=store, cache_dir=cache_dir, cache_size=cache_size, hot=hot and not record_profile,
                   **mount_options)
    try:
        if keep_mounted is not None and not record_profile and _mount_on_stack(reference, directory, keep_mounted,
                                                                               options):
            return merged
        for path in (image, meta):
            os.makedirs(path, exist_ok=True)
        _mount_root(merged, upper, work, _mount_layers(reference, directory, record_profile=record_profile,
                                                       **options))
    except BaseException:
        remove_root(directory)
        raise
    return merged


def _mount_on_stack(reference: str, directory: str, keep_mounted: float, options: dict) -> bool:
    """Mount the root on the image's shared stack, building the stack if it has none; False when the stack is
    outdated (a layer gone) but still in use, so that it can be neither used nor rebuilt."""
    from . import imagestack

    settings = {**options, "store": _location(options["store"]), "cache_dir": os.path.abspath(options["cache_dir"])}
    stack = imagestack.stack_directory(reference, settings)
    upper, work, merged = (os.path.join(directory, part) for part in ("upper", "work", "rootfs"))
    with imagestack.locked(stack):
        lower = imagestack.whole_lower(stack)
        if lower is None:
            if imagestack.in_use(stack):
                log.info("the shared layers of %s are outdated but in use: %s gets layers of its own", reference,
                         directory)
                return False
            imagestack.take_down(stack)
            os.makedirs(os.path.join(stack, "image"))
            os.makedirs(os.path.join(stack, "meta"))
            try:
                lower = _mount_root(merged, upper, work, _mount_layers(reference, stack, keep_mounted=keep_mounted,
                                                                       **options))
                imagestack.record_lower(stack, lower)
            except BaseException:
                if os.path.exists(merged) and mounted(merged):
                    umount(merged, detach=True)
                imagestack.take_down(stack)
                raise
        else:
            error = mount_overlay(merged, lower, upper, work)
            if error:
                raise FsError(f"overlay mount on {merged}: {os.strerror(error)}")
    for part in ("image", "meta"):
        os.symlink(os.path.join(stack, part), os.path.join(directory, part))
    return True


def _location(store: str) -> str:
    return store if store.startswith(("http://", "https://")) else os.path.abspath(store)


def _mount_layers(reference: str, base: str, *, store: str, cache_dir: str, cache_size: int, hot: bool,
                  record_profile: bool = False, **mount_options: object) -> tuple[str | None, str | None, str]:
    """Mount the image at `base/image` and its metadata image at `base/meta`: (meta or None, hot layer or None,
    image), the read-only layers of a root, top first.

    The image's daemon brings the other layers here as well (`coldbrew.fs.daemon.mount`): the metadata image,
    fetched while it validates the index, and the hot layer, which it fills while the root runs.
    """
    from .daemon import mount
    from .erofs import cached_image_path

    image, meta = os.path.join(base, "image"), os.path.join(base, "meta")
    hot_layer = mount(reference, image, store=store, cache_dir=cache_dir, cache_size=cache_size,
                      record_profile=record_profile, hot_layer=hot, metadata_image=True, **mount_options)
    metadata = cached_image_path(os.path.abspath(cache_dir), reference)
    if not os.path.exists(metadata):  # the store keeps none the daemon could use, or an earlier one did not mount
        metadata = _write_metadata_image(reference, store, cache_dir, cache_size)
    error = mount_erofs(metadata, meta) if metadata is not None else errno.ENOENT
    if error not in (0, errno.ENOTBLK, errno.ENODEV, errno.ENOENT):
        # A damaged image file (a crash before it reached the disk): made again next time.
        log.warning("EROFS image %s does not mount (%s); removed", metadata, os.strerror(error))
        os.unlink(metadata)
    return (meta if error == 0 else None), hot_layer, image


def _mount_root(merged: str, upper: str, work: str, layers: tuple[str | None, str | None, str]) -> str:
    """Mount the root's overlay on `layers` (`_mount_layers`); returns the lowerdir it has."""
    meta, hot_layer, image = layers
    if meta is not None:
        lower = "::".join(path for path in layers if path)
        error = mount_overlay(merged, lower, upper, work)
        if not error:
            return lower
        log.warning("overlay with data-only layers on %s: %s; the image's metadata comes from FUSE", merged,
                    os.strerror(error))
        umount(meta)
    error = mount_overlay(merged, image, upper, work)
    if error:
        raise FsError(f"overlay mount on {merged}: {os.strerror(error)}")
    return image


def _write_metadata_image(reference: str, store: str, cache_dir: str, cache_size: int) -> str | None:
    """Write the image's EROFS metadata image from the index (the daemon fetched the stored one, if it could);
    None when the tree holds what EROFS cannot express."""
    from . import erofs
    from .cache import ChunkCache, load_index
    from .store import open_store

    chunk_store = open_store(store)
    try:
        with ChunkCache(cache_dir, cache_size) as cache:
            index, mapped = load_index(reference, chunk_store, cache)  # validated by the daemon: from the cache
            try:
                path = erofs.cached_image_path(cache.directory, reference)
                erofs.write_image(index, path, erofs.redirect_paths(index))
                return path
            except erofs.UnsupportedTree as error:
                log.warning("image %s is served from FUSE alone: %s", reference, error)
                return None
            finally:
                index.release()
                mapped.close()
    finally:
        close = getattr(chunk_store, "close", None)
        if close is not None:
            close()


def remove_root(directory: str) -> None:
    """Unmount the overlay, the metadata image and the image and remove everything `create_root` made.

    Shared layers (links) are left to their stack, which takes itself down once no root uses it.
    """
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
    for path in (image, meta):
        if link_target(path) is not None:
            os.unlink(path)
    if mounted(meta) and umount(meta):
        umount(meta, detach=True)
    if mounted(image):  # not os.path.isdir first: a dead FUSE mount answers ENOTCONN
        unmount(image)
    for part in _PARTS:
        path = os.path.join(directory, part)
        if os.path.isdir(path) and not mounted(path):
            shutil.rmtree(path)
    try:
        os.rmdir(directory)
    except OSError:
        pass  # the caller's own files are left alone


def image_mount(directory: str) -> str:
    """The FUSE mount serving a root's image (for `coldbrew.fs.mount_stats`): its own, or its stack's."""
    path = os.path.join(os.path.abspath(directory), "image")
    return link_target(path) or path

"""A container root from an image: overlayfs (upper and work on local disk) over the read-only lazy mount.

`create_root(reference, directory, store=...)` makes, under `directory`:
  image/    the FUSE mount of the image (read-only, shared page cache, chunks fetched on first read)
  upper/    the container's changes          work/  overlayfs's scratch space
  rootfs/   the merged, writable root: point a bundle's `root.path` at it
and `remove_root(directory)` takes all of it down again. Both are idempotent about what already is or is not there,
so a half-made root (a crash in between) is removed as well.
"""

from __future__ import annotations

import os
import shutil

from .errors import FsError
from .mounts import mount_overlay, mounted, umount

_PARTS = ("image", "upper", "work", "rootfs")


def create_root(reference: str, directory: str, *, store: str, **mount_options: object) -> str:
    """Mount `reference` with a writable layer under `directory`; returns the root's path (`directory/rootfs`).

    `mount_options` go to `coldbrew.fs.daemon.mount` (cache_dir, cache_size, record_profile, prefetch).
    """
    from .daemon import mount

    directory = os.path.abspath(directory)
    image, upper, work, merged = (os.path.join(directory, part) for part in _PARTS)
    if os.path.exists(merged) and mounted(merged):
        raise FsError(f"{directory} already holds a mounted container root")
    for path in (image, upper, work, merged):
        os.makedirs(path, exist_ok=True)
    try:
        mount(reference, image, store=store, **mount_options)
        error = mount_overlay(merged, image, upper, work)
        if error:
            raise FsError(f"overlay mount on {merged}: {os.strerror(error)}")
    except BaseException:
        remove_root(directory)
        raise
    return merged


def remove_root(directory: str) -> None:
    """Unmount the overlay and the image and remove everything `create_root` made."""
    from .daemon import unmount

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FsError(f"{directory} is not a container root")
    merged = os.path.join(directory, "rootfs")
    image = os.path.join(directory, "image")
    if os.path.isdir(merged) and mounted(merged):
        if umount(merged):
            # Busy (a process still inside): detach, so the image below can go too.
            umount(merged, detach=True)
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

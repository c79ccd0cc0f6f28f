"""A container root from an image: overlayfs (upper and work on local disk) over the read-only lazy mount.

`create_root(reference, directory, store=...)` makes, under `directory`:
  image/    the FUSE mount of the image (read-only, shared page cache, chunks fetched on first read)
  upper/    the container's changes          work/  overlayfs's scratch space
  rootfs/   the merged, writable root: point a bundle's `root.path` at it
and `remove_root(directory)` takes all of it down again. Both are idempotent about what already is or is not there,
so a half-made root (a crash in between) is removed as well.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil

from .errors import FsError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_MNT_DETACH = 2
_PARTS = ("image", "upper", "work", "rootfs")


def _mounted(path: str) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        # Field 5 is the mount point, with spaces and the like octal-escaped (\040).
        return any(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), line.split()[4]) == target
                   for line in mountinfo)


def create_root(reference: str, directory: str, *, store: str, **mount_options: object) -> str:
    """Mount `reference` with a writable layer under `directory`; returns the root's path (`directory/rootfs`).

    `mount_options` go to `coldbrew.fs.daemon.mount` (cache_dir, cache_size, record_profile, prefetch).
    """
    from .daemon import mount

    directory = os.path.abspath(directory)
    image, upper, work, merged = (os.path.join(directory, part) for part in _PARTS)
    if os.path.exists(merged) and _mounted(merged):
        raise FsError(f"{directory} already holds a mounted container root")
    for path in (image, upper, work, merged):
        os.makedirs(path, exist_ok=True)
    try:
        mount(reference, image, store=store, **mount_options)
        options = f"lowerdir={image},upperdir={upper},workdir={work}".encode()
        if _libc.mount(b"overlay", merged.encode(), b"overlay", 0, options) != 0:
            error = ctypes.get_errno()
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
    if os.path.isdir(merged) and _mounted(merged):
        if _libc.umount2(merged.encode(), 0) != 0:
            # Busy (a process still inside): detach, so the image below can go too.
            _libc.umount2(merged.encode(), _MNT_DETACH)
    if os.path.isdir(image) and _mounted(image):
        unmount(image)
    for part in _PARTS:
        path = os.path.join(directory, part)
        if os.path.isdir(path) and not _mounted(path):
            shutil.rmtree(path)
    try:
        os.rmdir(directory)
    except OSError:
        pass  # the caller's own files are left alone

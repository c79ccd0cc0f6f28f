"""An image's read-only layers, mounted once on a host and shared by the container roots made from it.

A root's overlay sits on three read-only layers (`coldbrew.fs.rootfs`): the image's FUSE mount, its EROFS
metadata image and its hot layer. Mounting them costs a FUSE daemon, an index and cache to open and a profile to
fetch: most of a warm start. A root made with `keep_mounted` uses the host's stack for its image instead:

  /run/coldbrew/fs/stacks/KEY/image   the FUSE mount          KEY/meta   the EROFS image, mounted
  /run/coldbrew/fs/stacks/KEY/lower   the overlay lowerdir option of its roots, written last: the stack is whole
  /run/coldbrew/fs/stacks/KEY.lock    flock: whoever builds, stacks a root on or takes down KEY holds it

KEY names the image and all that shapes its mounts (store, cache, prefetch, hot layer), so a root gets the same
stack as a root made with the same settings. Once no overlay has stacked a stack for `keep_mounted` seconds, its
FUSE daemon takes the whole stack down (`release_when_unused`); unmounting its image (`coldbrew fs umount
KEY/image`) takes it down at once. Only overlays in the daemon's mount namespace count as users.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import FsError
from .mounts import mount_table, mounted, umount

STACKS_DIR = "/run/coldbrew/fs/stacks"
LOWER_FILE = "lower"
# How often a stack's daemon looks for roots stacked on it.
POLL_SECONDS = 1.0

log = logging.getLogger("coldbrew.fs")


def stack_directory(reference: str, settings: dict[str, object]) -> str:
    """The stack of `reference` mounted with `settings` (store, cache, mount options: JSON values)."""
    key = hashlib.sha256(json.dumps([reference, settings], sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(STACKS_DIR, key)


@contextmanager
def locked(stack: str) -> Iterator[None]:
    """Hold the stack's lock (waiting for it).

    The holder that takes a stack down also removes the lock file, so after the lock is granted it must still be
    the file at the path; otherwise it is taken again on the new one.
    """
    os.makedirs(STACKS_DIR, mode=0o700, exist_ok=True)
    path = stack + ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def in_use(stack: str) -> bool:
    """Whether an overlay mount (a container root) has one of the stack's layers below it."""
    prefix = stack + "/"
    return any(prefix in entry.options for entry in mount_table() if entry.fstype == "overlay")


def whole_lower(stack: str) -> str | None:
    """The stack's overlay lowerdir when every layer it names is in place and served; None otherwise."""
    from .daemon import serving

    try:
        with open(os.path.join(stack, LOWER_FILE)) as file:
            lower = file.read()
    except FileNotFoundError:
        return None
    image, meta = os.path.join(stack, "image"), os.path.join(stack, "meta")
    for layer in lower.split("::"):
        if layer == image:
            if not serving(image):
                return None
        elif layer == meta:
            if not mounted(meta):
                return None
        elif os.path.isdir(layer):  # a hot layer
            os.utime(layer)  # its last use, for the eviction of hot layers
        else:  # evicted from the cache while no root stacked on it
            return None
    return lower


def record_lower(stack: str, lower: str) -> None:
    """Mark the stack whole: roots stack on `lower` from now on."""
    path = os.path.join(stack, LOWER_FILE)
    with open(path + ".tmp", "w") as file:
        file.write(lower)
    os.rename(path + ".tmp", path)


def take_down(stack: str, *, stop_daemon: bool = True) -> None:
    """Unmount what is left of a stack; the caller holds its lock and no root stacks on it.

    `stop_daemon`: also stop the image's FUSE daemon (not when the daemon itself is the caller) and empty the
    stack's directory, so that the caller can build it again.
    """
    from .daemon import unmount

    try:
        os.unlink(os.path.join(stack, LOWER_FILE))
    except FileNotFoundError:
        pass
    meta, image = os.path.join(stack, "meta"), os.path.join(stack, "image")
    if mounted(meta) and umount(meta):
        umount(meta, detach=True)
    if stop_daemon:
        if mounted(image):  # not os.path.isdir first: a dead FUSE mount answers ENOTCONN
            unmount(image)
        shutil.rmtree(stack, ignore_errors=True)


def remove(stack: str) -> None:
    """In the stack's daemon, holding the lock, after its own mount is gone: the directory, then the lock file.

    In that order: a root maker that finds the lock file gone makes a new one and finds no directory to reuse.
    """
    for name in ("meta", "image"):
        path = os.path.join(stack, name)
        if mounted(path):
            raise FsError(f"{path} is still mounted")
    shutil.rmtree(stack, ignore_errors=True)
    try:
        os.unlink(stack + ".lock")
    except FileNotFoundError:
        pass


async def release_when_unused(stack: str, keep_mounted: float, terminate: Callable[[], None]) -> int:
    """In a stack's FUSE daemon: once no root has stacked on it for `keep_mounted` seconds, end its FUSE loop.

    Returns the lock's descriptor, held, after calling `terminate`: the daemon takes the stack down (`take_down`,
    `remove`) once its own mount is gone, then closes it.
    """
    import time

    import trio

    idle_since = time.monotonic()
    while True:
        await trio.sleep(min(POLL_SECONDS, max(keep_mounted, 0.1)))
        if in_use(stack):
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since < keep_mounted:
            continue
        fd = try_lock(stack)
        if fd is None:
            continue  # a root is being made on it: look again later
        if in_use(stack):
            os.close(fd)
            idle_since = time.monotonic()
            continue
        log.info("no container root has used %s for %.0f s: taking it down", stack, keep_mounted)
        terminate()
        return fd


def try_lock(stack: str) -> int | None:
    """The stack's lock without waiting (its descriptor: closing it lets go), or None when another holds it."""
    path = stack + ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


"""The few mount-table calls the image filesystem makes (the daemon and container roots share them).

Mount points are never touched to find out about them: a stat of a dead or hung FUSE mount fails or blocks, so
paths are canonicalised through their parent and looked up in /proc/self/mountinfo.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_MNT_DETACH = 2
_MS_RDONLY = 1


def canonical(mountpoint: str) -> str:
    """An absolute mount point path with its parent's symlinks resolved, without touching the mount point itself."""
    path = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def link_target(path: str) -> str | None:
    """The target of the symlink at `path`, or None. Unlike lstat, readlink of a mount point asks its filesystem
    nothing (a dead or stopped FUSE daemon would make lstat fail or hang)."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def unescape(field: str) -> str:
    """A mountinfo field without its octal escapes (space, tab, newline and backslash are escaped)."""
    raw = os.fsencode(field)
    out = bytearray()
    k = 0
    while k < len(raw):
        if raw[k] == 0x5C and raw[k + 1: k + 4].isdigit():
            out.append(int(raw[k + 1: k + 4], 8))
            k += 4
        else:
            out.append(raw[k])
            k += 1
    return os.fsdecode(bytes(out))


class MountInfo(NamedTuple):
    point: str  # unescaped
    device: str  # major:minor
    fstype: str
    source: str  # unescaped
    options: str  # the superblock's options, as mountinfo writes them (escaped)


def mount_table() -> list[MountInfo]:
    """/proc/self/mountinfo, in mount order (a later entry on the same point is on top)."""
    table = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            table.append(MountInfo(unescape(fields[4]), fields[2], fields[separator + 1],
                                   unescape(fields[separator + 2]),
                                   fields[separator + 3] if len(fields) > separator + 3 else ""))
    return table


def mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """(major:minor, filesystem type) of the topmost mount at `mountpoint` (a canonical path), or None."""
    found = None
    for entry in mount_table():
        if entry.point == mountpoint:
            found = (entry.device, entry.fstype)
    return found


def mounts_below(directory: str) -> list[str]:
    """The mount points strictly below `directory` (a real path), deepest first: the order to unmount them in."""
    prefix = directory.rstrip("/") + "/"
    return sorted((entry.point for entry in mount_table() if entry.point.startswith(prefix)), key=len, reverse=True)


def mounted(path: str) -> bool:
    return mount_entry(canonical(path)) is not None


def mount_overlay(target: str, lower: str, upper: str, work: str) -> int:
    """Mount overlayfs at `target` (`lower`: its lowerdir option); returns 0 or the errno."""
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options) != 0:
        return ctypes.get_errno()
    return 0


def mount_erofs(image: str, target: str) -> int:
    """Mount an EROFS image file read-only at `target` (file-backed: Linux 6.12 and later); 0 or the errno."""
    if _libc.mount(os.fsencode(image), os.fsencode(target), b"erofs", _MS_RDONLY, None) != 0:
        return ctypes.get_errno()
    return 0


def umount(path: str, *, detach: bool = False) -> int:
    """umount2 (lazily with `detach`); returns 0 or the errno (EINVAL: not mounted)."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH if detach else 0) != 0:
        return ctypes.get_errno()
    return 0

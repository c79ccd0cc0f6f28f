"""The few mount-table calls the image filesystem makes (the daemon and container roots share them).

Mount points are never touched to find out about them: a stat of a dead or hung FUSE mount fails or blocks, so
paths are canonicalised through their parent and looked up in /proc/self/mountinfo.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_MNT_DETACH = 2


def canonical(mountpoint: str) -> str:
    """An absolute mount point path with its parent's symlinks resolved, without touching the mount point itself."""
    path = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _unescape(field: bytes) -> bytes:
    # mountinfo octal-escapes space, tab, newline and backslash.
    out = bytearray()
    k = 0
    while k < len(field):
        if field[k] == 0x5C and field[k + 1: k + 4].isdigit():
            out.append(int(field[k + 1: k + 4], 8))
            k += 4
        else:
            out.append(field[k])
            k += 1
    return bytes(out)


def mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """(major:minor, filesystem type) of the topmost mount at `mountpoint` (a canonical path), or None."""
    target = os.fsencode(mountpoint)
    found = None
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if _unescape(fields[4]) == target:
                separator = fields.index(b"-")
                found = (fields[2].decode(), fields[separator + 1].decode())
    return found


def mounted(path: str) -> bool:
    return mount_entry(canonical(path)) is not None


def mount_overlay(target: str, lower: str, upper: str, work: str) -> int:
    """Mount overlayfs at `target`; returns 0 or the errno."""
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options) != 0:
        return ctypes.get_errno()
    return 0


def umount(path: str, *, detach: bool = False) -> int:
    """umount2 (lazily with `detach`); returns 0 or the errno (EINVAL: not mounted)."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH if detach else 0) != 0:
        return ctypes.get_errno()
    return 0

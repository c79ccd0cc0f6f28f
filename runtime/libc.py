"""The narrow seam between the runtime and the kernel: the system calls the standard library lacks.

Everything here is a thin foreign call that raises :class:`SyscallError` naming the call on failure.
It is imported in the container's init after fork, so it stays small and imports nothing heavy.

The calls go through `_ctypes`, the C core of ctypes, with the few C types they need defined here: importing the
`ctypes` package costs every start ~6 ms (it defines dozens of types and loaders nobody here uses). The types below
are ctypes' own definitions, so values of either kind can be passed where the other is expected.
"""

from __future__ import annotations

import _ctypes
import os
import struct

from .errors import SyscallError


def _simple_type(name: str, code: str) -> type:
    """A C scalar type, as ctypes defines c_int and its kin (`code` is the struct-module letter)."""
    return type(name, (_ctypes._SimpleCData,), {"_type_": code})


c_int, c_uint, c_long, c_ulong = (_simple_type(n, c) for n, c in (("c_int", "i"), ("c_uint", "I"), ("c_long", "l"),
                                                                  ("c_ulong", "L")))
c_ushort, c_char, c_void_p = (_simple_type(n, c) for n, c in (("c_ushort", "H"), ("c_char", "c"), ("c_void_p", "P")))
c_uint32, c_uint64, c_size_t = c_uint, c_ulong, c_ulong  # Linux on 64-bit machines (LP64)
Structure = _ctypes.Structure
byref = _ctypes.byref
addressof = _ctypes.addressof


def string_buffer(init: bytes | int) -> _ctypes.Array:
    """A mutable char array holding exactly the bytes `init` (unlike ctypes.create_string_buffer, no NUL is
    added), or `init` zero bytes."""
    if isinstance(init, int):
        return (c_char * init)()
    buffer = (c_char * len(init))()
    buffer.raw = init
    return buffer


class _Function(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = c_int


class _CLibrary:
    """The C library's functions by attribute, as ctypes.CDLL(None, use_errno=True) gives them: int results, errno
    saved for :func:`errno`."""

    def __init__(self) -> None:
        self._handle = _ctypes.dlopen(None, 0)

    def __getattr__(self, name: str) -> _Function:
        if name.startswith("__"):
            raise AttributeError(name)
        function = _Function((name, self))
        setattr(self, name, function)
        return function


_libc = _CLibrary()
_syscall = _libc.syscall
_syscall.restype = c_long

# Syscall numbers the C library has no wrapper for, per architecture.
_NR = {
    "x86_64": {"pivot_root": 155, "seccomp": 317, "bpf": 321, "openat2": 437, "close_range": 436,
               "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "seccomp": 277, "bpf": 280, "openat2": 437, "close_range": 436,
                "mount_setattr": 442},
}[os.uname().machine]

# clone(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2

# prctl(2) options
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# openat2(2) resolve flags
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
O_PATH = 0o10000000


def _check(result: int, call: str) -> int:
    if result < 0:
        raise SyscallError(_ctypes.get_errno(), call)
    return result


def _cstr(value: str | bytes | None) -> bytes | None:
    if value is None:
        return None
    return os.fsencode(value)


def unshare(flags: int) -> None:
    _check(_libc.unshare(c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(c_int(fd), c_int(nstype)), f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    result = _libc.mount(_cstr(source), _cstr(target), _cstr(fstype), c_ulong(flags), _cstr(data))
    _check(result, f"mount {source!r} on {target!r} ({fstype}, flags {flags:#x}, {data!r})")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_cstr(target), c_int(flags)), f"umount {target!r}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(c_long(_NR["pivot_root"]), _cstr(new_root), _cstr(put_old)), "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(c_int(option), *args), f"prctl({option})")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, c_size_t(len(raw))), "setdomainname")


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to `dirfd` under the given RESOLVE_* restrictions."""
    how = struct.pack("QQQ", flags, mode, resolve)
    return _check(_syscall(c_long(_NR["openat2"]), c_int(dirfd), _cstr(path), how,
                           c_size_t(len(how))), f"openat2({path!r})")


AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000


def mount_setattr(fd: int, attr_set: int, *, recursive: bool = True) -> None:
    """Set mount attributes (MOUNT_ATTR_RDONLY 1, NOSUID 2, NODEV 4, NOEXEC 8: the MS_* values) on the mount `fd`
    names, and every mount below it: one call for a whole tree."""
    attr = struct.pack("QQQQ", attr_set, 0, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_syscall(c_long(_NR["mount_setattr"]), c_int(fd), b"", c_uint(flags), attr,
                    c_size_t(len(attr))), "mount_setattr")


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    _check(_syscall(c_long(_NR["close_range"]), c_uint(first), c_uint(last),
                    c_uint(flags)), "close_range")


def syscall(name: str, *args: object) -> int:
    """Call a syscall by name from the table above, for the modules that own a kernel concern."""
    return _check(_syscall(c_long(_NR[name]), *args), name)


def errno() -> int:
    return _ctypes.get_errno()


libc = _libc

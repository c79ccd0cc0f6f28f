"""Terminals: a pty made inside the container, its master handed over a unix socket (runc's --console-socket)."""

from __future__ import annotations

import array
import fcntl
import os
import struct
import termios

import _socket  # the C core: the `socket` wrapper module costs ~3 ms of every start to import

from . import libc
from .errors import RuntimeFailure

_TIOCSPTLCK = 0x40045431
_TIOCGPTN = 0x80045430


def connect(path: str) -> int:
    """Connect to the console socket now, in the host's view, so the container's init can use it later."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise RuntimeFailure(f"--console-socket {path}: {e.strerror}") from None
    return sock.detach()


def open_pty(size: tuple[int, int] | None) -> tuple[int, str]:
    """Open a pty pair's master from /dev/ptmx (the container's devpts); return it and the slave's path."""
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise RuntimeFailure(f"process.terminal: cannot open /dev/ptmx in the container: {e.strerror}") from None
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
    number = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, b"\0" * 4))[0]
    if size is not None:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    return master, f"/dev/pts/{number}"


def bind_console(slave_path: str) -> None:
    """/dev/console is the container's terminal, as in runc."""
    try:
        os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError:
        return  # /dev is read-only or not ours: the container simply has no /dev/console
    libc.mount(slave_path, "/dev/console", None, libc.MS_BIND)


def make_controlling(fd: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


def send_fd(sock_fd: int, fd: int, name: str = "coldbrew-console") -> None:
    """One SCM_RIGHTS message carrying exactly the pty master; the data part is a short name (as runc sends)."""
    sock = _socket.socket(fileno=sock_fd)
    try:
        sock.sendmsg([name.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [fd]))])
    finally:
        sock.detach()


def recv_fd(sock: _socket.socket) -> int:
    """The receiving side of :func:`send_fd`, for clients of the in-process API and tests."""
    _, ancillary, _, _ = sock.recvmsg(256, _socket.CMSG_SPACE(struct.calcsize("i")))
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            return struct.unpack("i", data[: struct.calcsize("i")])[0]
    raise RuntimeFailure("console socket: no file descriptor received")

"""The last exec of every container process goes through a tiny sealed in-memory program.

Why (CVE-2019-5736): the process that calls execve() inside the container is the host's Python interpreter. If the
container's program is `#!/proc/self/exe` (or a symlink to it, or an ELF whose interpreter is it), the kernel runs
the host interpreter inside the container, which can then open the host binary through /proc and overwrite it.
So the runtime first execs into this shim from a sealed memfd: from then on /proc/self/exe is the memfd, which cannot
be written, and the shim execs the real program. The shim runs only when its argv[0] is "\\x01" (the runtime's
mark), so a `#!/proc/self/exe` script that reaches it exits with 127 instead of looping.

The shim, x86-64, 49 bytes (`as` + `objcopy -O binary` of this source):
    mov  rax, [rsp+8]          ; argv[0]
    cmp  word ptr [rax], 1     ; "\\x01": started by the runtime?
    jne  fail
    mov  rcx, [rsp]            ; argc
    mov  rdi, [rsp+16]         ; path = argv[1]
    lea  rsi, [rsp+24]         ; argv = &argv[2]
    lea  rdx, [rsp+rcx*8+16]   ; envp = &argv[argc + 1]
    mov  eax, 59               ; execve
    syscall
fail:
    mov  edi, 127
    mov  eax, 60               ; exit
    syscall
"""

from __future__ import annotations

import fcntl
import os
import struct

_CODE_X86_64 = bytes.fromhex(
    "488b44240866833801751a488b0c24488b7c2410488d742418488d54cc10"
    "b83b0000000f05bf7f000000b83c0000000f05"
)
_BASE = 0x400000
_EHDR_SIZE = 64
_PHDR_SIZE = 56
_MFD_EXEC = 0x10  # Linux 6.3+: ask for an executable memfd explicitly (vm.memfd_noexec)

_MARK = "\x01"
_shim_fd: int | None = None


def _elf(code: bytes) -> bytes:
    """A minimal static ELF64 executable: one header, one read+execute segment, the code."""
    entry = _BASE + _EHDR_SIZE + _PHDR_SIZE
    size = _EHDR_SIZE + _PHDR_SIZE + len(code)
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0,
                       2, 0x3E, 1, entry, _EHDR_SIZE, 0, 0, _EHDR_SIZE, _PHDR_SIZE, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)
    return ehdr + phdr + code


def shim_fd() -> int | None:
    """A sealed memfd holding the shim, made once per process; None where no shim exists for this CPU."""
    global _shim_fd
    if _shim_fd is None and os.uname().machine == "x86_64":
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        try:
            fd = os.memfd_create("coldbrew-exec", flags | _MFD_EXEC)
        except OSError:  # kernels before 6.3 do not know MFD_EXEC
            fd = os.memfd_create("coldbrew-exec", flags)
        os.write(fd, _elf(_CODE_X86_64))
        os.fchmod(fd, 0o555)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        _shim_fd = fd
    return _shim_fd


def execve(path: str, args: list[str], env: list[str], fd: int | None) -> None:
    """Replace this process with `path` (already resolved inside the container), through the shim when there is one."""
    environ = dict(e.split("=", 1) for e in env)
    if fd is None:
        os.execve(path, args, environ)
    os.execve(fd, [_MARK, path, *args], environ)

"""Seccomp: validate `linux.seccomp`, compile it to classic BPF in the runtime, load it in the container's init.

The work is split across the fork on purpose. :meth:`SeccompProfile.compile` runs in the runtime (parent) process and
is the only code that touches libseccomp (loaded lazily through ctypes). The container's init receives the finished
``struct sock_filter[]`` bytes and installs them with a single seccomp(2) call in :func:`load_filter`, so the child
never maps the library and does no work between its last set-up step and execve.

Semantics follow runc: a rule whose action equals the default is skipped, syscall names libseccomp does not know are
skipped, conditions on the same argument are added as separate rules (OR), and a non-permissive default gets an
-ENOSYS stub for syscalls newer than any the profile names (so glibc falls back from, e.g., clone3).
"""

from __future__ import annotations

import errno
import os
import struct

from . import libc
from .errors import RuntimeFailure, SpecError, SyscallError, Unsupported
from . import jsonfields

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

# Seconds the forked libseccomp may take to compile one filter (a Docker-style profile takes ~8 ms).
COMPILE_TIMEOUT = 10.0
# Action values from libseccomp's seccomp.h (the kernel's SECCOMP_RET_* with the data bits clear).
_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
    "SCMP_ACT_NOTIFY": 0x7FC00000,
}
_WITH_ERRNO = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")
# Defaults under which runc adds no -ENOSYS stub: a tracer or a permissive default already copes with new syscalls.
_PERMISSIVE = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE")

_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

# Spec architecture names -> libseccomp's names (seccomp_arch_resolve_name).
_ARCHES = {
    "SCMP_ARCH_X86": "x86",
    "SCMP_ARCH_X86_64": "x86_64",
    "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm",
    "SCMP_ARCH_AARCH64": "aarch64",
    "SCMP_ARCH_MIPS": "mips",
    "SCMP_ARCH_MIPS64": "mips64",
    "SCMP_ARCH_MIPS64N32": "mips64n32",
    "SCMP_ARCH_MIPSEL": "mipsel",
    "SCMP_ARCH_MIPSEL64": "mipsel64",
    "SCMP_ARCH_MIPSEL64N32": "mipsel64n32",
    "SCMP_ARCH_PPC": "ppc",
    "SCMP_ARCH_PPC64": "ppc64",
    "SCMP_ARCH_PPC64LE": "ppc64le",
    "SCMP_ARCH_S390": "s390",
    "SCMP_ARCH_S390X": "s390x",
    "SCMP_ARCH_PARISC": "parisc",
    "SCMP_ARCH_PARISC64": "parisc64",
    "SCMP_ARCH_RISCV64": "riscv64",
    "SCMP_ARCH_LOONGARCH64": "loongarch64",
    "SCMP_ARCH_M68K": "m68k",
    "SCMP_ARCH_SH": "sh",
    "SCMP_ARCH_SHEB": "sheb",
}

# What `coldbrew features` reports.
ACTIONS = tuple(name for name in _ACTIONS if name != "SCMP_ACT_NOTIFY")
OPERATORS = tuple(_OPS)
ARCHITECTURES = tuple(_ARCHES)

SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4
_FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": SECCOMP_FILTER_FLAG_TSYNC,
    "SECCOMP_FILTER_FLAG_LOG": SECCOMP_FILTER_FLAG_LOG,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": SECCOMP_FILTER_FLAG_SPEC_ALLOW,
    # Only means something together with NEW_LISTENER (SCMP_ACT_NOTIFY), which coldbrew never installs; the kernel
    # rejects it alone with EINVAL, so it is accepted and not passed on.
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 0,
}

_SECCOMP_SET_MODE_FILTER = 1
_BPF_MAXINSNS = 4096
_MAX_ARGS = 6
_MAX_ERRNO = 4094  # libseccomp takes values below the kernel's MAX_ERRNO (4095)
_UINT64_MAX = (1 << 64) - 1

# libseccomp attributes and markers (seccomp.h).
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_FLTATR_CTL_OPTIMIZE = 8
_NR_SCMP_ERROR = -1
_SCMP_ARCH_X32 = 0x4000003E
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes used by the -ENOSYS stub.
_BPF_LD_W_ABS = 0x20
_BPF_JA = 0x05
_BPF_JEQ_K = 0x15
_BPF_JGT_K = 0x25
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
_RET_ENOSYS = _ACTIONS["SCMP_ACT_ERRNO"] | errno.ENOSYS


class _Rule:
    # No dataclasses here: importing them costs ~14 ms on every container start.
    __slots__ = ("index", "names", "action", "args")

    def __init__(self, index: int, names: tuple[str, ...], action: int,
                 args: tuple[tuple[int, int, int, int], ...]) -> None:
        self.index = index  # position in linux.seccomp.syscalls, for error messages
        self.names = names
        self.action = action
        self.args = args  # (argument index, SCMP_CMP_*, datum_a, datum_b)


class SeccompProfile:
    """A validated `linux.seccomp` object. Build it with :meth:`from_spec`."""

    __slots__ = ("default_action", "architectures", "rules", "_flags", "enosys_stub", "path")

    def __init__(self, default_action: int, architectures: tuple[str, ...], rules: tuple[_Rule, ...], flags: int,
                 enosys_stub: bool, path: str = "linux.seccomp") -> None:
        self.default_action = default_action
        self.architectures = architectures  # spec names, SCMP_ARCH_*
        self.rules = rules
        self._flags = flags
        self.enosys_stub = enosys_stub
        self.path = path

    @property
    def flags(self) -> int:
        """The SECCOMP_FILTER_FLAG_* bits to pass to seccomp(2) at load time."""
        return self._flags

    @classmethod
    def from_spec(cls, data: dict, path: str = "linux.seccomp") -> SeccompProfile:
        if not isinstance(data, dict):
            raise SpecError(path, "must be an object")
        default_name = data.get("defaultAction")
        if default_name is None:
            raise SpecError(f"{path}.defaultAction", "is required")
        default_action = _action(default_name, data.get("defaultErrnoRet"), f"{path}.defaultAction",
                                 f"{path}.defaultErrnoRet")

        arches = jsonfields.array(data.get("architectures"), f"{path}.architectures")
        architectures = tuple(_choice(name, _ARCHES, f"{path}.architectures[{i}]", "architecture")
                              for i, name in enumerate(arches))
        flags = 0
        for i, name in enumerate(jsonfields.array(data.get("flags"), f"{path}.flags")):
            flags |= _FLAGS[_choice(name, _FLAGS, f"{path}.flags[{i}]", "flag")]

        # listenerPath only matters with SCMP_ACT_NOTIFY (refused below); the spec says it is ignored otherwise.
        listener = data.get("listenerPath")
        if listener is not None and not isinstance(listener, str):
            raise SpecError(f"{path}.listenerPath", "must be a string")
        metadata = data.get("listenerMetadata")
        if metadata is not None:
            if not isinstance(metadata, str):
                raise SpecError(f"{path}.listenerMetadata", "must be a string")
            if not listener:
                raise SpecError(f"{path}.listenerMetadata", "must not be set without listenerPath")

        rules = tuple(_rule(entry, i, f"{path}.syscalls[{i}]")
                      for i, entry in enumerate(jsonfields.array(data.get("syscalls"), f"{path}.syscalls")))
        enosys_stub = (default_name not in _PERMISSIVE
                       and default_action != _ACTIONS["SCMP_ACT_ERRNO"] | errno.ENOSYS)
        return cls(default_action, architectures, rules, flags, enosys_stub, path)

    def compile(self) -> bytes:
        """Compile to raw ``struct sock_filter[]`` bytes with libseccomp (call in the runtime, not the child).

        libseccomp runs in a forked process with a time limit: libseccomp 2.5 never returns from
        seccomp_rule_add for some sets of rules on one syscall (two rules that share their first argument
        comparison and differ in a later one), and a bundle must not hang the runtime.
        """
        import json
        import select
        import signal
        import time

        _libseccomp()  # loaded once here, not in every forked compiler
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os._exit(_write_all(write_end, self._compile_answer()))
        os.close(write_end)
        answer = b""
        try:
            deadline = time.monotonic() + COMPILE_TIMEOUT
            while (left := deadline - time.monotonic()) > 0 and select.select([read_end], [], [], left)[0]:
                part = os.read(read_end, 1 << 20)
                if not part:
                    break
                answer += part
            else:
                os.kill(pid, signal.SIGKILL)
                raise SpecError(self.path, f"libseccomp did not finish compiling this filter in {COMPILE_TIMEOUT:g} "
                                           "s (libseccomp 2.5 loops forever on some rules that compare the same "
                                           "syscall's arguments; merge or simplify them)")
        finally:
            os.close(read_end)
            os.waitpid(pid, 0)
        kind, _, rest = answer.partition(b"\n")
        if kind == b"program":
            return rest
        error = json.loads(rest)
        if kind == b"SpecError":
            raise SpecError(error["path"], error["message"])
        raise (Unsupported if kind == b"Unsupported" else RuntimeFailure)(error["message"])

    def _compile_answer(self) -> bytes:
        """In the forked compiler: the program, or the error, as `compile` reads it."""
        import json

        try:
            return b"program\n" + self._compile()
        except SpecError as error:
            return b"SpecError\n" + json.dumps({"path": error.path, "message": error.message}).encode()
        except Exception as error:
            kind = "Unsupported" if isinstance(error, Unsupported) else "RuntimeFailure"
            message = str(error) if isinstance(error, RuntimeFailure) else f"compiling the filter failed: {error}"
            return f"{kind}\n".encode() + json.dumps({"message": message}).encode()

    def _compile(self) -> bytes:
        lib = _libseccomp()
        ctx = lib.seccomp_init(self.default_action)
        if not ctx:
            raise RuntimeFailure(f"{self.path}: libseccomp refused default action {self.default_action:#x}")
        try:
            # The init sets no_new_privs itself when the spec asks for it; libseccomp must not force it.
            _lsc(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_NNP, 0), "seccomp_attr_set(CTL_NNP, 0)")
            tokens = [lib.seccomp_arch_native()]
            for i, name in enumerate(self.architectures):
                token = lib.seccomp_arch_resolve_name(_ARCHES[name].encode())
                if not token:
                    raise Unsupported(f"{self.path}.architectures[{i}]: {name} is not known to the installed "
                                      "libseccomp; a newer libseccomp is needed")
                rc = lib.seccomp_arch_add(ctx, token)
                if rc == -errno.EDOM:
                    raise SpecError(f"{self.path}.architectures[{i}]", f"{name} cannot share a filter with this "
                                    "host's architecture (libseccomp needs one byte order in a filter)")
                if rc != -errno.EEXIST:
                    _lsc(rc, f"seccomp_arch_add({name})")
                tokens.append(token)
            added = sum(self._add_rule(lib, ctx, rule) for rule in self.rules)
            if added > 32:
                # Binary search over syscall numbers keeps long allow lists fast per syscall; libseccomp <= 2.5.4
                # misbehaves with this on an empty filter, hence the threshold (as runc does).
                _lsc(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_OPTIMIZE, 2), "seccomp_attr_set(CTL_OPTIMIZE, 2)")
            program = _export(lib, ctx)
        finally:
            lib.seccomp_release(ctx)
        if self.enosys_stub:
            program = self._stub(lib, tokens) + program
        count = len(program) // 8
        if count > _BPF_MAXINSNS:
            raise SpecError(self.path, f"the compiled filter has {count} instructions; the kernel takes at most "
                                       f"{_BPF_MAXINSNS}")
        return program

    def _add_rule(self, lib: ctypes.CDLL, ctx: int, rule: _Rule) -> int:
        if rule.action == self.default_action:
            return 0  # libseccomp refuses (EACCES) a rule that repeats the default; it changes nothing anyway
        indexes = [arg[0] for arg in rule.args]
        # libseccomp takes one comparison per argument in a rule; repeated arguments become separate rules (OR).
        groups = [rule.args] if len(set(indexes)) == len(indexes) else [(arg,) for arg in rule.args]
        added = 0
        for name in rule.names:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                continue  # unknown to libseccomp, so to this host too (runc skips these as well)
            for group in groups:
                array = (_ArgCmp * len(group))(*(_ArgCmp(*arg) for arg in group))
                rc = lib.seccomp_rule_add_array(ctx, rule.action, nr, len(group), array)
                if rc == -errno.EEXIST:
                    raise SpecError(f"{self.path}.syscalls[{rule.index}]", f"the rule for {name} conflicts with an "
                                    "earlier one for the same syscall and arguments with another action")
                if rc < 0:
                    raise SpecError(f"{self.path}.syscalls[{rule.index}]",
                                    f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")
                added += 1
        return added

    def _stub(self, lib: ctypes.CDLL, tokens: list[int]) -> bytes:
        """An -ENOSYS prologue: per architecture, syscall numbers above the profile's highest one return ENOSYS.

        The kernel answers ENOSYS for syscalls it lacks, but a deny-by-default filter would answer EPERM for syscalls
        newer than the profile, and callers such as glibc only fall back to older syscalls on ENOSYS.
        """
        names = {name for rule in self.rules for name in rule.names}
        highest: dict[int, int] = {}
        for token in dict.fromkeys(tokens):
            numbers = [lib.seccomp_syscall_resolve_name_arch(token, name.encode()) for name in names]
            numbers = [nr for nr in numbers if nr >= 0]
            if numbers:
                highest[token] = max(numbers)
        x32 = highest.pop(_SCMP_ARCH_X32, None)  # shares AUDIT_ARCH_X86_64, told apart by the x32 syscall bit
        if not highest:
            return b""
        # Instructions as [code, jt, jf, k, label]; a label makes it a long jump (ja) resolved below.
        code: list[list] = [[_BPF_LD_W_ABS, 0, 0, 4, None]]  # seccomp_data.arch
        for arch in highest:
            code += [[_BPF_JEQ_K, 0, 1, arch, None], [_BPF_JA, 0, 0, 0, ("arch", arch)]]
        code.append([_BPF_JA, 0, 0, 0, "filter"])
        labels: dict[object, int] = {}
        for arch, top in highest.items():
            labels[("arch", arch)] = len(code)
            code.append([_BPF_LD_W_ABS, 0, 0, 0, None])  # seccomp_data.nr
            if arch == _AUDIT_ARCH_X86_64:
                code.append([_BPF_JSET_K, 3, 0, _X32_SYSCALL_BIT, None])
            code += [[_BPF_JGT_K, 0, 1, top, None], [_BPF_JA, 0, 0, 0, "enosys"], [_BPF_JA, 0, 0, 0, "filter"]]
            if arch == _AUDIT_ARCH_X86_64:
                if x32 is not None:
                    code += [[_BPF_JGT_K, 0, 1, x32, None], [_BPF_JA, 0, 0, 0, "enosys"]]
                code.append([_BPF_JA, 0, 0, 0, "filter"])
        labels["enosys"] = len(code)
        code.append([_BPF_RET_K, 0, 0, _RET_ENOSYS, None])
        labels["filter"] = len(code)
        out = bytearray()
        for i, (op, jt, jf, k, label) in enumerate(code):
            if label is not None:
                k = labels[label] - (i + 1)
            out += struct.pack("=HBBI", op, jt, jf, k)
        return bytes(out)


class _ArgCmp(libc.Structure):
    _fields_ = [("arg", libc.c_uint), ("op", libc.c_int), ("datum_a", libc.c_uint64), ("datum_b", libc.c_uint64)]


class _SockFprog(libc.Structure):
    _fields_ = [("len", libc.c_ushort), ("filter", libc.c_void_p)]


def load_filter(program: bytes, flags: int = 0) -> None:
    """Install a compiled filter on the calling process (the container's init, just before execve).

    The caller must have set no_new_privs or still hold CAP_SYS_ADMIN; the kernel answers EACCES otherwise. So a
    spec without noNewPrivileges needs the filter loaded before capabilities are dropped (runc's order then), and
    the filter must then allow the init's remaining set-up calls.
    """
    if not program or len(program) % 8 or len(program) // 8 > _BPF_MAXINSNS:
        raise ValueError(f"not a compiled seccomp filter ({len(program)} bytes)")
    buffer = libc.string_buffer(program)
    fprog = _SockFprog(len(program) // 8, libc.addressof(buffer))
    call = f"seccomp(SECCOMP_SET_MODE_FILTER, {flags:#x}, {len(program) // 8} instructions)"
    try:
        result = libc.syscall("seccomp", libc.c_uint(_SECCOMP_SET_MODE_FILTER), libc.c_uint(flags),
                              libc.byref(fprog))
    except SyscallError as error:
        raise SyscallError(error.errno, call) from None
    if result > 0:
        # With TSYNC a positive answer is the id of a thread that could not be synchronised.
        raise SyscallError(errno.ESRCH, f"{call}: thread {result} could not be synchronised")


def _action(name: object, errno_ret: object, path: str, errno_path: str) -> int:
    name = _choice(name, _ACTIONS, path, "action")
    if name == "SCMP_ACT_NOTIFY":
        raise Unsupported(f"{path}: SCMP_ACT_NOTIFY (seccomp user notification to a listenerPath agent) "
                          "is not supported by coldbrew")
    if errno_ret is None:
        data = errno.EPERM if name in _WITH_ERRNO else 0
    elif name in _WITH_ERRNO:
        # An errno must be a real errno value; a tracer gets the full 16 data bits.
        data = _uint(errno_ret, errno_path, _MAX_ERRNO if name == "SCMP_ACT_ERRNO" else 0xFFFF)
    else:
        raise SpecError(errno_path, f"{name} takes no errno; only SCMP_ACT_ERRNO and SCMP_ACT_TRACE do")
    return _ACTIONS[name] | data


def _rule(entry: object, index: int, path: str) -> _Rule:
    if not isinstance(entry, dict):
        raise SpecError(path, "must be an object")
    names = jsonfields.array(entry.get("names"), f"{path}.names")
    if not names:
        raise SpecError(f"{path}.names", "must list at least one syscall")
    for i, name in enumerate(names):
        # Syscall names are plain identifiers; anything else cannot be passed to libseccomp as a C string.
        if not isinstance(name, str) or not name or not name.isascii() or not name.isprintable():
            raise SpecError(f"{path}.names[{i}]", f"{name!r} is not a syscall name")
    if entry.get("action") is None:
        raise SpecError(f"{path}.action", "is required")
    action = _action(entry["action"], entry.get("errnoRet"), f"{path}.action", f"{path}.errnoRet")
    args = []
    for i, arg in enumerate(jsonfields.array(entry.get("args"), f"{path}.args")):
        where = f"{path}.args[{i}]"
        if not isinstance(arg, dict):
            raise SpecError(where, "must be an object")
        for key in ("index", "value", "op"):
            if arg.get(key) is None:
                raise SpecError(f"{where}.{key}", "is required")
        op = _OPS[_choice(arg["op"], _OPS, f"{where}.op", "operator")]
        value_two = arg.get("valueTwo")
        args.append((_uint(arg["index"], f"{where}.index", _MAX_ARGS - 1), op,
                     _uint(arg["value"], f"{where}.value", _UINT64_MAX),
                     0 if value_two is None else _uint(value_two, f"{where}.valueTwo", _UINT64_MAX)))
    return _Rule(index, tuple(names), action, tuple(args))


def _choice(value: object, known: dict[str, int] | dict[str, str], path: str, what: str) -> str:
    if not isinstance(value, str) or value not in known:
        raise SpecError(path, f"unknown {what} {value!r}; expected one of {', '.join(known)}")
    return value


def _uint(value: object, path: str, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise SpecError(path, f"must be an integer from 0 to {limit}, not {value!r}")
    return value


def _lsc(rc: int, call: str) -> None:
    if rc < 0:
        raise SyscallError(-rc, f"libseccomp {call}")


def _write_all(fd: int, data: bytes) -> int:
    """Write all of `data` to the pipe; the forked compiler's exit status (0, or 1 if the reader went away)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return 1
    return 0


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    # libseccomp 2.5 exports only to a file descriptor; a memfd avoids both temporary files and pipe-size limits.
    fd = os.memfd_create("coldbrew-seccomp", os.MFD_CLOEXEC)
    try:
        _lsc(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


_lib: ctypes.CDLL | None = None


def _libseccomp() -> ctypes.CDLL:
    """Load libseccomp on first use, so that importing this module (as the init does) never maps it."""
    global _lib
    if _lib is None:
        import ctypes  # the whole package only here: compiling runs in the runtime, once per profile

        try:
            lib = ctypes.CDLL("libseccomp.so.2")
        except OSError as error:
            raise Unsupported(f"linux.seccomp needs libseccomp (libseccomp.so.2, Debian package libseccomp2): "
                              f"{error}") from None
        signatures = {
            "seccomp_init": ([ctypes.c_uint32], ctypes.c_void_p),
            "seccomp_release": ([ctypes.c_void_p], None),
            "seccomp_attr_set": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32], ctypes.c_int),
            "seccomp_arch_native": ([], ctypes.c_uint32),
            "seccomp_arch_resolve_name": ([ctypes.c_char_p], ctypes.c_uint32),
            "seccomp_arch_add": ([ctypes.c_void_p, ctypes.c_uint32], ctypes.c_int),
            "seccomp_syscall_resolve_name": ([ctypes.c_char_p], ctypes.c_int),
            "seccomp_syscall_resolve_name_arch": ([ctypes.c_uint32, ctypes.c_char_p], ctypes.c_int),
            "seccomp_rule_add_array": ([ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                        ctypes.POINTER(_ArgCmp)], ctypes.c_int),
            "seccomp_export_bpf": ([ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = restype
        _lib = lib
    return _lib

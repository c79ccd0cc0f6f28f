"""Device access control on cgroup v2: an eBPF program of type BPF_PROG_TYPE_CGROUP_DEVICE, assembled by hand.

cgroup v2 has no devices.allow: the kernel runs the programs attached to a task's cgroup (and its ancestors) on
every device open and mknod, with a `struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor;}`; the
low 16 bits of access_type are the device type (block 1, char 2), the high 16 bits the access (mknod 1, read 2,
write 4). The program returns 1 to allow and 0 to deny. Like runc's devicefilter, rules are checked from the last
to the first and the first match decides, so the last rule in the spec that matches wins.

Loading and attaching go through bpf(2) directly; an attached program lives as long as the cgroup, so nothing
needs closing or detaching when the cgroup is removed.
"""

from __future__ import annotations

import _ctypes
import errno
import os
import struct

from .. import libc
from ..errors import SyscallError
from .resources import DeviceRule, effective_device_rules

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

_ATTR_SIZE = 128  # larger than the parts of union bpf_attr used here; the kernel wants the tail zeroed
_TYPES = {"b": 1, "c": 2}
_ACCESS = {"m": 1, "r": 2, "w": 4}

# eBPF opcodes (linux/bpf.h, linux/bpf_common.h)
_LDX_MEM_W = 0x61     # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_ALU32_AND_K = 0x54   # BPF_ALU | BPF_AND | BPF_K
_ALU32_RSH_K = 0x74   # BPF_ALU | BPF_RSH | BPF_K
_ALU32_MOV_X = 0xBC   # BPF_ALU | BPF_MOV | BPF_X
_ALU64_MOV_K = 0xB7   # BPF_ALU64 | BPF_MOV | BPF_K
_JMP32_JNE_K = 0x56   # BPF_JMP32 | BPF_JNE | BPF_K: 32-bit compare, so majors and minors above 2^31 work
_JMP32_JNE_X = 0x5E   # BPF_JMP32 | BPF_JNE | BPF_X
_EXIT = 0x95          # BPF_JMP | BPF_EXIT
_JUMPS = (_JMP32_JNE_K, _JMP32_JNE_X)


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    if imm >= 1 << 31:
        imm -= 1 << 32  # the immediate is a signed 32-bit field
    # struct bpf_insn {u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm;} (little-endian bit fields)
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)


def program(rules: tuple[DeviceRule, ...]) -> bytes | None:
    """The program's instructions for these rules, or None when they allow every device (nothing to attach)."""
    default_allow, kept = effective_device_rules(rules)
    if default_allow and not kept:
        return None
    code = [
        _insn(_LDX_MEM_W, dst=2, src=1, off=0),    # r2 = access_type
        _insn(_ALU32_AND_K, dst=2, imm=0xFFFF),    # r2 = device type
        _insn(_LDX_MEM_W, dst=3, src=1, off=0),
        _insn(_ALU32_RSH_K, dst=3, imm=16),        # r3 = access requested
        _insn(_LDX_MEM_W, dst=4, src=1, off=4),    # r4 = major
        _insn(_LDX_MEM_W, dst=5, src=1, off=8),    # r5 = minor
    ]
    for rule in reversed(kept):
        block: list[tuple[int, int, int, int]] = []  # (op, dst, src, imm); jumps go to the next block
        if rule.type != "a":
            block.append((_JMP32_JNE_K, 2, 0, _TYPES[rule.type]))
        if rule.access != "rwm":
            mask = sum(_ACCESS[c] for c in rule.access)
            # The rule matches when every access requested is one it names: (r3 & mask) == r3.
            block += [(_ALU32_MOV_X, 1, 3, 0), (_ALU32_AND_K, 1, 0, mask), (_JMP32_JNE_X, 1, 3, 0)]
        if rule.major is not None:
            block.append((_JMP32_JNE_K, 4, 0, rule.major))
        if rule.minor is not None:
            block.append((_JMP32_JNE_K, 5, 0, rule.minor))
        block += [(_ALU64_MOV_K, 0, 0, int(rule.allow)), (_EXIT, 0, 0, 0)]
        for k, (op, dst, src, imm) in enumerate(block):
            code.append(_insn(op, dst, src, len(block) - k - 1 if op in _JUMPS else 0, imm))
    code += [_insn(_ALU64_MOV_K, dst=0, imm=int(default_allow)), _insn(_EXIT)]
    return b"".join(code)


def _bpf(cmd: int, attr: _ctypes.Array, what: str) -> int:
    try:
        return libc.syscall("bpf", libc.c_int(cmd), attr, libc.c_uint(len(attr)))
    except SyscallError as e:
        raise SyscallError(e.errno or errno.EIO, what) from None


def load(insns: bytes) -> int:
    """BPF_PROG_LOAD: the program's fd. On a verifier refusal the error carries the verifier's log."""
    code = libc.string_buffer(insns)
    license_ = libc.string_buffer(b"GPL\0")

    def attempt(log: _ctypes.Array | None) -> int:
        attr = libc.string_buffer(_ATTR_SIZE)
        struct.pack_into("=IIQQIIQII", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // 8,
                         libc.addressof(code), libc.addressof(license_), 1 if log is not None else 0,
                         len(log) if log is not None else 0, libc.addressof(log) if log is not None else 0, 0, 0)
        struct.pack_into("16s", attr, 48, b"coldbrew_dev")  # prog_name, for bpftool listings
        return _bpf(BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD) of the cgroup device program")

    try:
        return attempt(None)
    except SyscallError as e:
        if e.errno == errno.EPERM:
            # Kernels before 5.11 charge BPF programs to RLIMIT_MEMLOCK.
            import resource

            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            return attempt(None)
        if e.errno not in (errno.EINVAL, errno.EACCES):
            raise
        log = libc.string_buffer(65536)
        try:
            return attempt(log)
        except SyscallError as again:
            message = log.value.decode(errors="replace").strip().splitlines()
            raise SyscallError(again.errno or errno.EIO, "bpf(BPF_PROG_LOAD) of the cgroup device program, verifier: "
                                            + " | ".join(message[-5:])) from None


def attached(cgroup_fd: int) -> list[int]:
    """Ids of the device programs attached directly to the cgroup (BPF_PROG_QUERY)."""
    ids = (libc.c_uint32 * 64)()
    attr = libc.string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIIIQI", attr, 0, cgroup_fd, BPF_CGROUP_DEVICE, 0, 0, libc.addressof(ids), len(ids))
    _bpf(BPF_PROG_QUERY, attr, "bpf(BPF_PROG_QUERY) of the cgroup's device programs")
    count = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[:count])


def attach(cgroup_fd: int, prog_fd: int) -> None:
    attr = libc.string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
    _bpf(BPF_PROG_ATTACH, attr, "bpf(BPF_PROG_ATTACH) of the device program to the cgroup")


def detach(cgroup_fd: int, prog_id: int) -> None:
    """Detach one program by id; a program already gone is not an error."""
    attr = libc.string_buffer(_ATTR_SIZE)
    struct.pack_into("=I", attr, 0, prog_id)
    try:
        prog_fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"bpf(BPF_PROG_GET_FD_BY_ID, {prog_id})")
    except SyscallError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        attr = libc.string_buffer(_ATTR_SIZE)
        struct.pack_into("=III", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE)
        try:
            _bpf(BPF_PROG_DETACH, attr, f"bpf(BPF_PROG_DETACH) of device program {prog_id}")
        except SyscallError as e:
            if e.errno != errno.ENOENT:
                raise
    finally:
        os.close(prog_fd)


def apply(cgroup_dir: str, rules: tuple[DeviceRule, ...], fresh: bool) -> None:
    """Make `rules` the cgroup's device policy: attach the new program, then detach the ones it replaces.

    Between the two steps both programs apply and either may deny, so a running container never gets
    more access than the old or the new rules give it.
    """
    insns = program(rules)
    cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        old = [] if fresh else attached(cgroup_fd)
        if insns is not None:
            prog_fd = load(insns)
            try:
                attach(cgroup_fd, prog_fd)
            finally:
                os.close(prog_fd)
        for prog_id in old:
            detach(cgroup_fd, prog_id)
    finally:
        os.close(cgroup_fd)

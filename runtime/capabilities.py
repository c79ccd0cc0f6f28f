"""Process capabilities: validate `process.capabilities` and apply the five sets in the container's init.

The init's order is fixed by the kernel's rules: drop_bounding() while still holding CAP_SETPCAP, then
PR_SET_KEEPCAPS and the switch to the container's user (which keeps the permitted set but clears the effective and
ambient ones), then apply() to set exactly the spec's effective, permitted and inheritable sets and raise the ambient
ones. A missing `process.capabilities` means empty sets, as in runc.
"""

from __future__ import annotations


from . import libc
from .errors import SpecError, SyscallError

# Capability numbers are the positions in this tuple (linux/capability.h).
_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)

SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

_PR_CAPBSET_READ = 23
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_STATUS_FIELDS = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective", "CapBnd": "bounding",
                  "CapAmb": "ambient"}


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as file:
            return int(file.read())
    except (OSError, ValueError):
        # Without /proc, probe the bounding set: PR_CAPBSET_READ fails past the last capability the kernel knows.
        last = 0
        while last < 63:
            try:
                libc.prctl(_PR_CAPBSET_READ, last + 1)
            except SyscallError:
                break
            last += 1
        return last


LAST_CAP = _last_cap()
ALL: tuple[str, ...] = _NAMES[:LAST_CAP + 1]
_NUMBER = {name: number for number, name in enumerate(ALL)}


class _Header(libc.Structure):
    _fields_ = [("version", libc.c_uint32), ("pid", libc.c_int)]


class _Data(libc.Structure):
    _fields_ = [("effective", libc.c_uint32), ("permitted", libc.c_uint32), ("inheritable", libc.c_uint32)]


class Capabilities:
    """The five capability sets of `process.capabilities`, limited to capabilities this kernel knows."""

    # No dataclasses here: importing them costs ~14 ms on every container start.
    __slots__ = SETS + ("ignored",)

    def __init__(self, bounding: frozenset[str] = frozenset(), effective: frozenset[str] = frozenset(),
                 inheritable: frozenset[str] = frozenset(), permitted: frozenset[str] = frozenset(),
                 ambient: frozenset[str] = frozenset(), ignored: tuple[str, ...] = ()) -> None:
        self.bounding = bounding
        self.effective = effective
        self.inheritable = inheritable
        self.permitted = permitted
        self.ambient = ambient
        # Well-formed names this kernel does not know, left out of the sets (runc warns about them and goes on).
        self.ignored = ignored

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={sorted(getattr(self, key))}" for key in SETS)
        return f"Capabilities({fields}, ignored={list(self.ignored)})"

    @classmethod
    def from_spec(cls, data: dict | None, path: str = "process.capabilities") -> Capabilities:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise SpecError(path, "must be an object")
        sets: dict[str, frozenset[str]] = {}
        ignored: dict[str, None] = {}
        for key in SETS:
            names = data.get(key)
            if names is None:
                names = []
            elif not isinstance(names, list):
                raise SpecError(f"{path}.{key}", "must be an array of capability names")
            for i, name in enumerate(names):
                if not isinstance(name, str) or not _well_formed(name):
                    raise SpecError(f"{path}.{key}[{i}]", f"{name!r} is not a capability name (like CAP_CHOWN)")
                if name not in _NUMBER:
                    ignored[name] = None
            sets[key] = frozenset(name for name in names if name in _NUMBER)
        return cls(**sets, ignored=tuple(ignored))

    def drop_bounding(self) -> None:
        """Drop every capability outside the bounding set; needs CAP_SETPCAP, so call it before apply()."""
        keep = _mask(self.bounding)
        for number in range(LAST_CAP + 1):
            if not keep >> number & 1:
                try:
                    libc.prctl(libc.PR_CAPBSET_DROP, number)
                except SyscallError as error:
                    raise SyscallError(error.errno, f"prctl(PR_CAPBSET_DROP, {_name(number)})") from None

    def apply(self) -> None:
        """Set exactly the effective, permitted and inheritable sets, then exactly the ambient set."""
        header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_Data * 2)()
        effective, permitted, inheritable = _mask(self.effective), _mask(self.permitted), _mask(self.inheritable)
        for word in range(2):
            shift = 32 * word
            data[word] = _Data(effective >> shift & 0xFFFFFFFF, permitted >> shift & 0xFFFFFFFF,
                               inheritable >> shift & 0xFFFFFFFF)
        if libc.libc.capset(libc.byref(header), data) != 0:
            error = libc.errno()
            raise SyscallError(error, f"capset({self._describe_capset_failure()})")
        libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
        for name in sorted(self.ambient, key=_NUMBER.__getitem__):
            try:
                libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_RAISE, _NUMBER[name])
            except SyscallError as error:
                raise SyscallError(error.errno, f"raising ambient {name} (it must also be permitted and "
                                                "inheritable)") from None

    def _describe_capset_failure(self) -> str:
        # Name what the kernel refused: permitted beyond what we hold, effective beyond permitted, or inheritable
        # beyond the bounding set.
        try:
            held = current()
        except OSError:  # no /proc to compare with
            return "effective, permitted and inheritable sets"
        problems = []
        if extra := self.permitted - held["permitted"]:
            problems.append(f"permitted {sorted(extra)} not held by this process")
        if extra := self.effective - self.permitted:
            problems.append(f"effective {sorted(extra)} not in permitted")
        if extra := self.inheritable - held["bounding"] - held["inheritable"]:
            problems.append(f"inheritable {sorted(extra)} outside the bounding set")
        return "; ".join(problems) or "effective, permitted and inheritable sets"


def _well_formed(name: str) -> bool:
    return name.startswith("CAP_") and len(name) > 4 and _NAME_CHARS.issuperset(name)


def _mask(names: frozenset[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << _NUMBER[name]
    return mask


def _name(number: int) -> str:
    return _NAMES[number] if number < len(_NAMES) else f"capability {number}"


def permitted_now() -> frozenset[str]:
    """The permitted set this process holds, from capget(2) (no /proc needed). Not always all capabilities: a host's
    root may lack some (CAP_SYS_RESOURCE in some VMs), and capset refuses to add to the permitted set."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.libc.capget(libc.byref(header), data) != 0:
        raise SyscallError(libc.errno(), "capget")
    mask = data[0].permitted | data[1].permitted << 32
    return frozenset(name for number, name in enumerate(ALL) if mask >> number & 1)


def current() -> dict[str, set[str]]:
    """This process's five sets from /proc/self/status (bits without a known name are left out)."""
    result: dict[str, set[str]] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in _STATUS_FIELDS:
                mask = int(value, 16)
                result[_STATUS_FIELDS[key]] = {name for number, name in enumerate(_NAMES) if mask >> number & 1}
    return result

"""The OCI `linux.resources` object (runtime-spec config-linux.md), parsed into typed, validated values.

Parsing happens once, before anything is created, so that a bad field fails with a SpecError naming its JSON path
instead of a kernel EINVAL halfway through a container start. Values are kept in the spec's units; the v1 and v2
back ends do their own conversions. Following runc, a zero in a field whose unit is "bytes", "shares" or
"microseconds" means "not set" (the Go zero value), and unknown keys are ignored (spec extensions).
"""

from __future__ import annotations

from ..errors import SpecError
from .. import jsonfields

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1

# Plain pattern strings, compiled (and cached) by `re` only where a spec uses these fields
_CPU_LIST = r"^\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*$"
_PAGE_SIZE = r"^[1-9]\d*[KMG]B$"


class _Record:
    """An immutable record: annotated fields, defaults as class attributes.

    Not dataclasses: importing that module and exec()ing generated code for each class costs ~10 ms, and this
    module is imported on every container start.
    """

    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls) -> None:
        cls._fields = tuple(cls.__dict__.get("__annotations__", ()))

    def __init__(self, *args: object, **kwargs: object) -> None:
        name = type(self).__name__
        if len(args) > len(self._fields):
            raise TypeError(f"{name} takes at most {len(self._fields)} fields")
        values = dict(zip(self._fields, args, strict=False))
        for key, value in kwargs.items():
            if key not in self._fields or key in values:
                raise TypeError(f"{name}: unexpected or repeated field {key!r}")
            values[key] = value
        for key in self._fields:
            if key in values:
                object.__setattr__(self, key, values[key])
            elif not hasattr(type(self), key):
                raise TypeError(f"{name}: missing field {key!r}")

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, key) == getattr(other, key) for key in self._fields)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, key) for key in self._fields))

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={getattr(self, key)!r}" for key in self._fields)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: object) -> "_Record":
        """A copy with some fields changed."""
        values = {key: getattr(self, key) for key in self._fields}
        values.update(changes)  # an unknown field is refused by __init__
        return type(self)(**values)


class Memory(_Record):
    """linux.resources.memory."""

    limit: int | None = None        # bytes, -1 = unlimited
    reservation: int | None = None  # soft limit (v1) / memory.low (v2)
    swap: int | None = None         # memory + swap, as cgroup v1 counts it; -1 = unlimited
    kernel_tcp: int | None = None   # v1 only; cgroup v2 has no separate TCP limit and it is ignored there
    swappiness: int | None = None   # 0..100, v1 only
    disable_oom_killer: bool | None = None
    check_before_update: bool = False
    # `kernel` is accepted and ignored, as runc does: kernel memory limits are deprecated in the runtime spec,
    # the v1 knob no longer takes writes on current kernels, and v2 counts kernel memory in memory.max anyway.


class Cpu(_Record):
    """linux.resources.cpu."""

    shares: int | None = None
    quota: int | None = None          # microseconds per period, -1 = unlimited
    burst: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str | None = None
    mems: str | None = None
    idle: int | None = None           # 0 or 1


class DeviceRule(_Record):
    """One entry of linux.resources.devices."""

    allow: bool
    type: str = "a"            # "a" (all), "b" (block) or "c" (char)
    major: int | None = None   # None = any
    minor: int | None = None
    access: str = "rwm"        # a subsequence of "rwm"

    @property
    def wildcard(self) -> bool:
        """True for a rule about every device and every access: it resets the list instead of adding to it."""
        return self.type == "a" and self.major is None and self.minor is None and self.access == "rwm"

    def v1_line(self, type_: str | None = None) -> str:
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{type_ or self.type} {major}:{minor} {self.access}"


class WeightDevice(_Record):
    """One entry of linux.resources.blockIO.weightDevice."""

    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None


class ThrottleDevice(_Record):
    """One entry of a linux.resources.blockIO.throttle*Device list."""

    major: int
    minor: int
    rate: int


class BlockIO(_Record):
    """linux.resources.blockIO."""

    weight: int | None = None
    leaf_weight: int | None = None
    weight_device: tuple[WeightDevice, ...] = ()
    throttle_read_bps: tuple[ThrottleDevice, ...] = ()
    throttle_write_bps: tuple[ThrottleDevice, ...] = ()
    throttle_read_iops: tuple[ThrottleDevice, ...] = ()
    throttle_write_iops: tuple[ThrottleDevice, ...] = ()


class HugepageLimit(_Record):
    """One entry of linux.resources.hugepageLimits."""

    page_size: str   # "2MB", "1GB": the name the kernel uses in hugetlb.<size>.*
    limit: int


class Network(_Record):
    """linux.resources.network (net_cls / net_prio, cgroup v1 only)."""

    class_id: int | None = None
    priorities: tuple[tuple[str, int], ...] = ()


class RdmaLimit(_Record):
    """One entry of linux.resources.rdma, keyed by device."""

    device: str
    hca_handles: int | None = None
    hca_objects: int | None = None

    def line(self) -> str:
        parts = [self.device]
        if self.hca_handles is not None:
            parts.append(f"hca_handle={self.hca_handles}")
        if self.hca_objects is not None:
            parts.append(f"hca_object={self.hca_objects}")
        return " ".join(parts)


class Resources(_Record):
    """linux.resources, validated."""

    memory: Memory | None = None
    cpu: Cpu | None = None
    pids_limit: int | None = None                 # <= -1 means unlimited ("max")
    devices: tuple[DeviceRule, ...] | None = None  # None: leave device access alone; a list: deny all, then these
    block_io: BlockIO | None = None
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    network: Network | None = None
    rdma: tuple[RdmaLimit, ...] = ()
    unified: tuple[tuple[str, str], ...] = ()     # (file name, value) pairs for cgroup v2, in the spec's order

    @classmethod
    def from_spec(cls, data: object, path: str = "linux.resources") -> Resources:
        if data is None:
            return cls()
        obj = jsonfields.obj(data, path)
        memory = _memory(obj.get("memory"), f"{path}.memory")
        cpu = _cpu(obj.get("cpu"), f"{path}.cpu")
        pids_limit = None
        pids = obj.get("pids")
        if pids is not None:
            pids = jsonfields.obj(pids, f"{path}.pids")
            limit = _int(pids.get("limit"), f"{path}.pids.limit", -INT64_MAX - 1, INT64_MAX)
            # runc: 0 leaves the limit alone, any negative value means unlimited.
            pids_limit = None if not limit else max(limit, -1)
        devices = None
        if obj.get("devices") is not None:
            devices = tuple(_device(d, f"{path}.devices[{i}]")
                            for i, d in enumerate(jsonfields.array(obj["devices"], f"{path}.devices")))
        hugepages = tuple(_hugepage(h, f"{path}.hugepageLimits[{i}]")
                          for i, h in enumerate(jsonfields.array(obj.get("hugepageLimits"), f"{path}.hugepageLimits")))
        unified: dict[str, str] = {}
        if obj.get("unified") is not None:
            for key, value in jsonfields.obj(obj["unified"], f"{path}.unified").items():
                where = f"{path}.unified.{key}"
                # The key names a file in the container's cgroup directory: nothing that walks out of it.
                if not isinstance(key, str) or not key or "/" in key or key in (".", "..") or "\0" in key:
                    raise SpecError(where, "must be the name of a file in the cgroup directory")
                if not isinstance(value, str) or "\0" in value:
                    raise SpecError(where, "must be a string")
                unified[key] = value
        rdma: tuple[RdmaLimit, ...] = ()
        if obj.get("rdma") is not None:
            rdma = tuple(_rdma(name, value, f"{path}.rdma.{name}")
                         for name, value in jsonfields.obj(obj["rdma"], f"{path}.rdma").items())
        return cls(memory=memory, cpu=cpu, pids_limit=pids_limit, devices=devices,
                   block_io=_block_io(obj.get("blockIO"), f"{path}.blockIO"), hugepage_limits=hugepages,
                   network=_network(obj.get("network"), f"{path}.network"), rdma=rdma,
                   unified=tuple(unified.items()))


def effective_device_rules(rules: tuple[DeviceRule, ...]) -> tuple[bool, list[DeviceRule]]:
    """(default allow?, the rules that still matter), with rules applied in order and the last match winning.

    A wildcard rule ("a *:* rwm") decides the default and makes every rule before it irrelevant, as in runc's
    device emulator. With no wildcard rule the default is deny: a `devices` list is an allowlist.
    """
    default_allow = False
    kept: list[DeviceRule] = []
    for rule in rules:
        if rule.wildcard:
            default_allow = rule.allow
            kept.clear()
        else:
            kept.append(rule)
    return default_allow, kept


# --- field parsers -------------------------------------------------------------------------------------------

def _int(value: object, path: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    # bool is an int in Python but not a number in JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(path, "must be an integer")
    if not lo <= value <= hi:
        raise SpecError(path, f"must be between {lo} and {hi}, not {value}")
    return value


def _bool(value: object, path: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise SpecError(path, "must be true or false")
    return value


def _bytes(value: object, path: str) -> int | None:
    """A byte count where -1 means unlimited and 0 means unset."""
    n = _int(value, path, -1, INT64_MAX)
    return None if n == 0 else n


def _memory(value: object, path: str) -> Memory | None:
    if value is None:
        return None
    obj = jsonfields.obj(value, path)
    _bytes(obj.get("kernel"), f"{path}.kernel")  # validated, then ignored (see Memory)
    _bool(obj.get("useHierarchy"), f"{path}.useHierarchy")  # always on in current kernels
    limit = _bytes(obj.get("limit"), f"{path}.limit")
    swap = _bytes(obj.get("swap"), f"{path}.swap")
    if limit is not None and limit > 0 and swap is not None and 0 < swap < limit:
        raise SpecError(f"{path}.swap", f"is memory+swap and must not be below memory.limit ({limit}), not {swap}")
    return Memory(limit=limit, reservation=_bytes(obj.get("reservation"), f"{path}.reservation"), swap=swap,
                  kernel_tcp=_bytes(obj.get("kernelTCP"), f"{path}.kernelTCP"),
                  swappiness=_int(obj.get("swappiness"), f"{path}.swappiness", 0, 100),
                  disable_oom_killer=_bool(obj.get("disableOOMKiller"), f"{path}.disableOOMKiller"),
                  check_before_update=bool(_bool(obj.get("checkBeforeUpdate"), f"{path}.checkBeforeUpdate")))


def _cpu_list(value: object, path: str) -> str | None:
    if value is None or value == "":
        return None
    import re  # here, not at the top: few specs set cpusets, and `re` costs every start ~5 ms

    if not isinstance(value, str) or not re.match(_CPU_LIST, value):
        raise SpecError(path, f"must be a list like \"0-3,7\", not {value!r}")
    return value.replace(" ", "").strip()


def _cpu(value: object, path: str) -> Cpu | None:
    if value is None:
        return None
    obj = jsonfields.obj(value, path)
    shares = _int(obj.get("shares"), f"{path}.shares", 0, UINT64_MAX) or None
    if shares is not None and not 2 <= shares <= 262144:
        raise SpecError(f"{path}.shares", f"must be between 2 and 262144, not {shares}")
    period = _int(obj.get("period"), f"{path}.period", 0, UINT64_MAX) or None
    if period is not None and not 1000 <= period <= 1000000:  # the kernel's bounds, 1 ms to 1 s
        raise SpecError(f"{path}.period", f"must be between 1000 and 1000000 microseconds, not {period}")
    quota = _int(obj.get("quota"), f"{path}.quota", -1, INT64_MAX) or None
    if quota is not None and 0 < quota < 1000:
        raise SpecError(f"{path}.quota", f"must be -1 (unlimited) or at least 1000 microseconds, not {quota}")
    idle = _int(obj.get("idle"), f"{path}.idle", 0, 1)
    return Cpu(shares=shares, quota=quota, period=period,
               burst=_int(obj.get("burst"), f"{path}.burst", 0, UINT64_MAX),
               realtime_runtime=_int(obj.get("realtimeRuntime"), f"{path}.realtimeRuntime", -1, INT64_MAX) or None,
               realtime_period=_int(obj.get("realtimePeriod"), f"{path}.realtimePeriod", 0, UINT64_MAX) or None,
               cpus=_cpu_list(obj.get("cpus"), f"{path}.cpus"), mems=_cpu_list(obj.get("mems"), f"{path}.mems"),
               idle=idle)


def _device_number(value: object, path: str) -> int | None:
    n = _int(value, path, -1, UINT32_MAX)
    return None if n == -1 else n


def _device(value: object, path: str) -> DeviceRule:
    obj = jsonfields.obj(value, path)
    allow = _bool(obj.get("allow"), f"{path}.allow")
    if allow is None:
        raise SpecError(f"{path}.allow", "is required")
    type_ = obj.get("type", "a")
    if type_ not in ("a", "b", "c"):
        raise SpecError(f"{path}.type", f"must be \"a\", \"b\" or \"c\", not {type_!r}")
    access = obj.get("access", "rwm")
    if not isinstance(access, str) or not access or set(access) - set("rwm"):
        raise SpecError(f"{path}.access", f"must be made of the letters r, w and m, not {access!r}")
    return DeviceRule(allow=allow, type=type_, major=_device_number(obj.get("major"), f"{path}.major"),
                      minor=_device_number(obj.get("minor"), f"{path}.minor"),
                      access="".join(c for c in "rwm" if c in access))


def _major_minor(obj: dict, path: str) -> tuple[int, int]:
    major = _int(obj.get("major"), f"{path}.major", 0, UINT32_MAX)
    minor = _int(obj.get("minor"), f"{path}.minor", 0, UINT32_MAX)
    if major is None or minor is None:
        raise SpecError(path, "needs both major and minor")
    return major, minor


def _throttle(value: object, path: str) -> tuple[ThrottleDevice, ...]:
    result = []
    for i, item in enumerate(jsonfields.array(value, path)):
        where = f"{path}[{i}]"
        major, minor = _major_minor(jsonfields.obj(item, where), where)
        rate = _int(item.get("rate"), f"{where}.rate", 0, UINT64_MAX)
        if rate is None:
            raise SpecError(f"{where}.rate", "is required")
        result.append(ThrottleDevice(major, minor, rate))
    return tuple(result)


def _weight(value: object, path: str) -> int | None:
    n = _int(value, path, 0, 1000) or None
    if n is not None and n < 10:
        raise SpecError(path, f"must be between 10 and 1000, not {n}")
    return n


def _block_io(value: object, path: str) -> BlockIO | None:
    if value is None:
        return None
    obj = jsonfields.obj(value, path)
    weight_devices = []
    for i, item in enumerate(jsonfields.array(obj.get("weightDevice"), f"{path}.weightDevice")):
        where = f"{path}.weightDevice[{i}]"
        major, minor = _major_minor(jsonfields.obj(item, where), where)
        weight_devices.append(WeightDevice(major, minor, _weight(item.get("weight"), f"{where}.weight"),
                                           _weight(item.get("leafWeight"), f"{where}.leafWeight")))
    return BlockIO(weight=_weight(obj.get("weight"), f"{path}.weight"),
                   leaf_weight=_weight(obj.get("leafWeight"), f"{path}.leafWeight"),
                   weight_device=tuple(weight_devices),
                   throttle_read_bps=_throttle(obj.get("throttleReadBpsDevice"), f"{path}.throttleReadBpsDevice"),
                   throttle_write_bps=_throttle(obj.get("throttleWriteBpsDevice"), f"{path}.throttleWriteBpsDevice"),
                   throttle_read_iops=_throttle(obj.get("throttleReadIOPSDevice"), f"{path}.throttleReadIOPSDevice"),
                   throttle_write_iops=_throttle(obj.get("throttleWriteIOPSDevice"),
                                                 f"{path}.throttleWriteIOPSDevice"))


def _hugepage(value: object, path: str) -> HugepageLimit:
    obj = jsonfields.obj(value, path)
    size = obj.get("pageSize")
    import re  # here, not at the top: few specs set hugepage limits, and `re` costs every start ~5 ms

    if not isinstance(size, str) or not re.match(_PAGE_SIZE, size):
        raise SpecError(f"{path}.pageSize", f"must be a size like \"2MB\" or \"1GB\", not {size!r}")
    limit = _int(obj.get("limit"), f"{path}.limit", 0, UINT64_MAX)
    if limit is None:
        raise SpecError(f"{path}.limit", "is required")
    return HugepageLimit(size, limit)


def _network(value: object, path: str) -> Network | None:
    if value is None:
        return None
    obj = jsonfields.obj(value, path)
    priorities = []
    for i, item in enumerate(jsonfields.array(obj.get("priorities"), f"{path}.priorities")):
        where = f"{path}.priorities[{i}]"
        item = jsonfields.obj(item, where)
        name = item.get("name")
        if not isinstance(name, str) or not name or any(c.isspace() or c in "/\0" for c in name):
            raise SpecError(f"{where}.name", "must be a network interface name")
        prio = _int(item.get("priority"), f"{where}.priority", 0, UINT32_MAX)
        if prio is None:
            raise SpecError(f"{where}.priority", "is required")
        priorities.append((name, prio))
    return Network(class_id=_int(obj.get("classID"), f"{path}.classID", 0, UINT32_MAX),
                   priorities=tuple(priorities))


def _rdma(name: str, value: object, path: str) -> RdmaLimit:
    if not isinstance(name, str) or not name or any(c.isspace() or c == "\0" for c in name):
        raise SpecError(path, "must be keyed by an RDMA device name")
    obj = jsonfields.obj(value, path)
    return RdmaLimit(name, _int(obj.get("hcaHandles"), f"{path}.hcaHandles", 0, UINT32_MAX),
                     _int(obj.get("hcaObjects"), f"{path}.hcaObjects", 0, UINT32_MAX))

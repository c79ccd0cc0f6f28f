"""cgroup v2: one directory in the unified hierarchy (runc's libcontainer/cgroups/fs2)."""

from __future__ import annotations

import errno
import math
import os
import _signal as signals  # the C core: `signal` imports `enum`
import time

from ..errors import RuntimeFailure, SyscallError, Unsupported
from . import (
    Cgroup,
    make_dirs,
    mounts,
    pids_below,
    read_file,
    read_keyed,
    read_optional,
    remove_made,
    remove_tree,
    write_file,
    write_lines,
)
from .resources import BlockIO, Cpu, Memory, Resources

FREEZE_TIMEOUT = 10.0
UINT64_MAX = (1 << 64) - 1

_controllers_cache: dict[str, str] = {}


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144, default 1024) to cpu.weight (1..10000, default 100).

    The quadratic fit of runc >= 1.3.2 and crun >= 1.23, which maps minimum, default and maximum onto each other
    (the older linear formula turned the default 1024 into 39).
    """
    if shares <= 2:
        return 1
    if shares >= 262144:
        return 10000
    exp = math.log2(shares)
    return math.ceil(10 ** ((exp * exp + 125 * exp) / 612.0 - 7.0 / 34.0))


def blkio_weight_to_io_weight(weight: int) -> int:
    """blkio.weight (10..1000) to io.weight (1..10000), runc's linear mapping."""
    return 1 + (weight - 10) * 9999 // 990


def swap_max(swap: int | None, limit: int | None) -> int | None:
    """memory.swap.max from the OCI swap value, which counts memory+swap as cgroup v1 does (runc's conversion).

    Returns None for "leave alone" and -1 for "max".
    """
    if limit == -1 and swap is None:
        return -1  # unlimited memory without a word on swap: unlimited swap too
    if swap is None or swap == -1:
        return swap
    if limit is None or limit == -1:
        raise Unsupported("linux.resources.memory.swap needs memory.limit on cgroup v2: memory.swap.max is "
                          "derived as swap - limit")
    return swap - limit


class V2Cgroup(Cgroup):
    def __init__(self, path: str, root: str | None = None) -> None:
        self.path = os.path.normpath(path)
        # The hierarchy's mount point: controllers are enabled from there down to the parent.
        self.root = root
        self.paths = {"unified": self.path}

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def create(self, resources: Resources | None) -> None:
        if resources is not None:
            _check(resources)
        made: list[str] = []
        try:
            make_dirs(self.path, made)
            self._enable_controllers()
            if resources is not None:
                self._apply(resources, fresh=self.path in made)
        except BaseException:
            remove_made(made)
            raise

    def _enable_controllers(self) -> None:
        """Enable every available controller in each ancestor's cgroup.subtree_control, as runc does."""
        root = self.root or self._find_root()
        available = _controllers_cache.get(root)
        if available is None:
            available = _controllers_cache[root] = read_file(os.path.join(root, "cgroup.controllers")).strip()
        if not available:
            return
        names = available.split()
        request = " ".join("+" + name for name in names)
        rel = os.path.relpath(os.path.dirname(self.path), root)
        current = root
        for part in [""] + ([] if rel == "." else rel.split("/")):
            current = os.path.join(current, part) if part else current
            target = os.path.join(current, "cgroup.subtree_control")
            try:
                write_file(target, request)
            except SyscallError:
                # One controller may be unavailable at this level: enable the others one at a time, and let a
                # limit that needs a missing one fail by name when it is written.
                for name in names:
                    try:
                        write_file(target, "+" + name)
                    except SyscallError:
                        pass

    def _find_root(self) -> str:
        _, v2 = mounts()
        if v2 is not None and (self.path + "/").startswith(v2[0].rstrip("/") + "/"):
            return v2[0]
        return os.path.dirname(self.path)

    def add_process(self, pid: int) -> None:
        write_file(self._file("cgroup.procs"), str(pid))

    def update(self, resources: Resources) -> None:
        _check(resources)
        memory = resources.memory
        if memory is not None and memory.check_before_update and memory.limit is not None and memory.limit > 0:
            usage = int(read_file(self._file("memory.current")))
            if memory.limit < usage:
                raise RuntimeFailure(f"memory limit {memory.limit} is below the container's usage ({usage} bytes)")
        self._apply(resources, fresh=False)

    def _write(self, name: str, value: str) -> None:
        try:
            write_file(self._file(name), value)
        except SyscallError as e:
            if e.errno == errno.ENOENT and os.path.isdir(self.path):
                controller = name.split(".")[0]
                raise Unsupported(f"{name}: the {controller} controller is not enabled for cgroup {self.path}") \
                    from None
            raise

    def _apply(self, r: Resources, fresh: bool) -> None:
        if r.cpu is not None:
            self._set_cpu(r.cpu)
        if r.memory is not None:
            self._set_memory(r.memory)
        if r.pids_limit is not None:
            self._write("pids.max", "max" if r.pids_limit < 0 else str(r.pids_limit))
        if r.block_io is not None:
            self._set_io(r.block_io)
        for hp in r.hugepage_limits:
            self._write(f"hugetlb.{hp.page_size}.max", str(hp.limit))
        if r.rdma:
            write_lines(self._file("rdma.max"), [limit.line() for limit in r.rdma])
        if r.devices is not None:
            from . import devices_bpf

            devices_bpf.apply(self.path, r.devices, fresh)
        # Last, so that a raw value in `unified` wins over the same knob set from the typed fields.
        for name, value in r.unified:
            self._write(name, value)

    def _set_cpu(self, c: Cpu) -> None:
        if c.cpus:
            self._write("cpuset.cpus", c.cpus)
        if c.mems:
            self._write("cpuset.mems", c.mems)
        if c.shares is not None:
            self._write("cpu.weight", str(shares_to_weight(c.shares)))
        if c.quota is not None or c.period is not None:
            # cpu.max is "QUOTA [PERIOD]": without a period the kernel keeps the current one; a new period alone
            # (an update) keeps the current quota.
            if c.quota is None:
                quota = read_file(self._file("cpu.max")).split()[0]
            else:
                quota = str(c.quota) if c.quota > 0 else "max"
            self._write("cpu.max", quota if c.period is None else f"{quota} {c.period}")
        if c.burst is not None:
            self._write("cpu.max.burst", str(c.burst))
        if c.idle is not None:
            self._write("cpu.idle", str(c.idle))

    def _set_memory(self, m: Memory) -> None:
        swap = swap_max(m.swap, m.limit)
        # Swap first, as runc: memory.max alone would let the old swap allowance stand in between.
        if swap is not None:
            value = "max" if swap == -1 else str(swap)
            try:
                write_file(self._file("memory.swap.max"), value)
            except SyscallError as e:
                # No swap accounting on this kernel: "unlimited" and "none" mean nothing to do.
                if not (e.errno == errno.ENOENT and value in ("max", "0")):
                    raise
        if m.limit is not None:
            self._write("memory.max", "max" if m.limit == -1 else str(m.limit))
        if m.reservation is not None:
            self._write("memory.low", "max" if m.reservation == -1 else str(m.reservation))

    def _set_io(self, b: BlockIO) -> None:
        if b.weight is not None or b.weight_device:
            # BFQ takes blkio's scale (and per-device weights) as is; io.weight has its own.
            bfq = os.path.exists(self._file("io.bfq.weight"))
            if b.weight is not None:
                if bfq:
                    self._write("io.bfq.weight", str(b.weight))
                else:
                    self._write("io.weight", f"default {blkio_weight_to_io_weight(b.weight)}")
            for wd in b.weight_device:
                if wd.weight is None:
                    continue
                if bfq:
                    self._write("io.bfq.weight", f"{wd.major}:{wd.minor} {wd.weight}")
                else:
                    self._write("io.weight", f"{wd.major}:{wd.minor} {blkio_weight_to_io_weight(wd.weight)}")
        lines = []
        for key, devices in (("rbps", b.throttle_read_bps), ("wbps", b.throttle_write_bps),
                             ("riops", b.throttle_read_iops), ("wiops", b.throttle_write_iops)):
            for d in devices:
                lines.append(f"{d.major}:{d.minor} {key}={d.rate or 'max'}")
        if lines:
            write_lines(self._file("io.max"), lines)

    def can_freeze(self) -> bool:
        return os.path.exists(self._file("cgroup.freeze"))

    def _set_frozen(self, frozen: bool) -> None:
        path = self._file("cgroup.freeze")
        if not os.path.exists(path):
            raise Unsupported(f"cgroup {self.path} has no cgroup.freeze (kernel older than 5.2?)")
        write_file(path, "1" if frozen else "0")
        # The kernel sets "frozen 1" in cgroup.events once every task has stopped; poll it, backing off.
        want = "frozen 1" if frozen else "frozen 0"
        deadline = time.monotonic() + FREEZE_TIMEOUT
        delay = 0.0005
        events = self._file("cgroup.events")
        while want not in read_file(events).splitlines():
            if time.monotonic() >= deadline:
                if frozen:
                    write_file(path, "0")
                raise RuntimeFailure(f"cgroup {self.path} did not {'freeze' if frozen else 'thaw'} "
                                     f"in {FREEZE_TIMEOUT:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def frozen(self) -> bool:
        events = read_optional(self._file("cgroup.events"))
        return events is not None and "frozen 1" in events.splitlines()

    def kill_all(self, signal: int) -> None:
        # cgroup.kill (5.14+) kills the whole subtree in the kernel, with no race against forks.
        if signal == signals.SIGKILL and os.path.exists(self._file("cgroup.kill")):
            try:
                write_file(self._file("cgroup.kill"), "1")
            except SyscallError as e:
                if e.errno != errno.ENOENT:
                    raise
            return
        super().kill_all(signal)

    def pids(self) -> list[int]:
        return pids_below(self.path)

    def stats(self) -> dict:
        stats: dict = {}
        cpu = read_keyed(self._file("cpu.stat"))
        if cpu:
            stats["cpu"] = {
                "usage": {"total": cpu.get("usage_usec", 0) * 1000, "user": cpu.get("user_usec", 0) * 1000,
                          "kernel": cpu.get("system_usec", 0) * 1000},
                "throttling": {"periods": cpu.get("nr_periods", 0), "throttledPeriods": cpu.get("nr_throttled", 0),
                               "throttledTime": cpu.get("throttled_usec", 0) * 1000}}
        current = read_optional(self._file("memory.current"))
        if current is not None:
            stats["memory"] = self._memory_stats(int(current))
        pids = read_optional(self._file("pids.current"))
        if pids is not None:
            limit = (read_optional(self._file("pids.max")) or "max").strip()
            stats["pids"] = {"current": int(pids), "limit": 0 if limit == "max" else int(limit)}
        io = read_optional(self._file("io.stat"))
        if io is not None:
            stats["blkio"] = _io_stats(io)
        hugetlb = self._hugetlb_stats()
        if hugetlb:
            stats["hugetlb"] = hugetlb
        return stats

    def _limit(self, name: str) -> int:
        text = (read_optional(self._file(name)) or "max").strip()
        return UINT64_MAX if text == "max" else int(text)

    def _memory_stats(self, usage: int) -> dict:
        raw = read_keyed(self._file("memory.stat"))
        events = read_keyed(self._file("memory.events"))
        peak = read_optional(self._file("memory.peak"))
        memory_limit = self._limit("memory.max")
        result: dict = {"cache": raw.get("file", 0), "raw": raw,
                        "usage": {"limit": memory_limit, "usage": usage, "max": int(peak or 0),
                                  "failcnt": events.get("max", 0)}}
        swap = read_optional(self._file("memory.swap.current"))
        if swap is not None:
            # Reported as memory+swap, the way cgroup v1 and runc's v2 stats count it.
            limit = self._limit("memory.swap.max")
            result["swap"] = {"usage": int(swap) + usage,
                              "limit": UINT64_MAX if UINT64_MAX in (limit, memory_limit) else limit + memory_limit,
                              "max": 0, "failcnt": read_keyed(self._file("memory.swap.events")).get("max", 0)}
        return result

    def _hugetlb_stats(self) -> dict:
        result = {}
        for name in sorted(os.listdir(self.path)):
            if name.startswith("hugetlb.") and name.endswith(".current") and name.count(".") == 2:
                size = name.split(".")[1]
                events = read_keyed(self._file(f"hugetlb.{size}.events"))
                result[size] = {"usage": int(read_file(self._file(name))), "failcnt": events.get("max", 0)}
        return result

    def destroy(self) -> None:
        remove_tree(self.path)


def _check(r: Resources) -> None:
    """Refuse, before anything is written, what cgroup v2 has no knob for."""
    if r.network is not None and (r.network.class_id is not None or r.network.priorities):
        raise Unsupported("linux.resources.network (net_cls/net_prio) does not exist on cgroup v2")
    m = r.memory
    if m is not None and m.swappiness is not None:
        raise Unsupported("linux.resources.memory.swappiness does not exist on cgroup v2")
    if m is not None and m.disable_oom_killer:
        raise Unsupported("linux.resources.memory.disableOOMKiller does not exist on cgroup v2")
    if r.cpu is not None and (r.cpu.realtime_period is not None or r.cpu.realtime_runtime is not None):
        raise Unsupported("linux.resources.cpu.realtimeRuntime/realtimePeriod need cgroup v1 (cgroup v2 has no "
                          "realtime group scheduling)")
    b = r.block_io
    if b is not None and (b.leaf_weight is not None or any(wd.leaf_weight is not None for wd in b.weight_device)):
        raise Unsupported("linux.resources.blockIO leafWeight does not exist on cgroup v2")
    if m is not None and m.swap is not None:
        swap_max(m.swap, m.limit)  # raises for a swap limit without a memory limit


def _io_stats(text: str) -> dict:
    service_bytes: list[dict] = []
    serviced: list[dict] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or ":" not in fields[0]:
            continue
        major, _, minor = fields[0].partition(":")
        values = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        for key, op, into in (("rbytes", "Read", service_bytes), ("wbytes", "Write", service_bytes),
                              ("rios", "Read", serviced), ("wios", "Write", serviced)):
            if key in values:
                into.append({"major": int(major), "minor": int(minor), "op": op, "value": int(values[key])})
    return {"ioServiceBytesRecursive": service_bytes, "ioServicedRecursive": serviced}

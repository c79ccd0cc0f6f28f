"""cgroup v1: one directory per controller hierarchy (runc's libcontainer/cgroups/fs)."""

from __future__ import annotations

import errno
import os
import time

from ..errors import RuntimeFailure, SyscallError, Unsupported
from . import (
    Cgroup,
    make_dirs,
    pids_below,
    read_file,
    read_keyed,
    read_optional,
    remove_made,
    remove_tree,
    write_file,
    write_lines,
)
from .resources import BlockIO, Cpu, DeviceRule, Memory, Resources, effective_device_rules

FREEZE_TIMEOUT = 10.0


class V1Cgroup(Cgroup):
    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)

    def _dirs(self) -> list[str]:
        # Co-mounted controllers (cpu,cpuacct on most distributions) share one directory.
        return list(dict.fromkeys(self.paths.values()))

    def _dir(self, subsystem: str, what: str) -> str:
        path = self.paths.get(subsystem)
        if path is None:
            raise Unsupported(f"{what} needs the v1 {subsystem} cgroup controller, which this host has not mounted")
        return path

    def create(self, resources: Resources | None) -> None:
        if resources is not None:
            self._check(resources)
        made: list[str] = []
        try:
            for path in self._dirs():
                make_dirs(path, made)
            cpuset = self.paths.get("cpuset")
            if cpuset is not None and cpuset in made:
                cpu = resources.cpu if resources is not None else None
                _cpuset_inherit(cpuset, skip_cpus=bool(cpu and cpu.cpus), skip_mems=bool(cpu and cpu.mems))
            if resources is not None:
                self._apply(resources, fresh=True)
        except BaseException:
            remove_made(made)
            raise

    def add_process(self, pid: int) -> None:
        for path in self._dirs():
            write_file(os.path.join(path, "cgroup.procs"), str(pid))

    def self_join_files(self) -> tuple[str, ...]:
        # A pid written to cgroup.procs takes cgroup_threadgroup_rwsem for writing, which after an idle moment waits
        # for an RCU grace period (7.8 ms on this VM, paid by runc too); a thread moving itself ("0" into tasks) is
        # exempt from that lock (Linux 5.5's "Optimize single thread migration"): 0.1 ms.
        return tuple(os.path.join(path, "tasks") for path in self._dirs())

    def update(self, resources: Resources) -> None:
        self._check(resources)
        memory = resources.memory
        if memory is not None and memory.check_before_update and memory.limit is not None and memory.limit > 0:
            usage = int(read_file(os.path.join(self._dir("memory", "memory"), "memory.usage_in_bytes")))
            if memory.limit < usage:
                raise RuntimeFailure(f"memory limit {memory.limit} is below the container's usage ({usage} bytes)")
        self._apply(resources, fresh=False)

    def _check(self, r: Resources) -> None:
        """Refuse what cannot be applied before anything is written."""
        if r.unified:
            raise Unsupported("linux.resources.unified needs cgroup v2; this host runs its controllers on cgroup v1")
        if r.hugepage_limits:
            self._dir("hugetlb", "linux.resources.hugepageLimits")
        if r.network is not None and r.network.class_id is not None:
            self._dir("net_cls", "linux.resources.network.classID")
        if r.network is not None and r.network.priorities:
            self._dir("net_prio", "linux.resources.network.priorities")
        if r.rdma:
            self._dir("rdma", "linux.resources.rdma")
        if r.pids_limit is not None:
            self._dir("pids", "linux.resources.pids")
        if r.block_io is not None:
            self._dir("blkio", "linux.resources.blockIO")
        if r.memory is not None:
            self._dir("memory", "linux.resources.memory")
        if r.cpu is not None:
            if _uses_cpu_controller(r.cpu):
                self._dir("cpu", "linux.resources.cpu")
            if r.cpu.cpus or r.cpu.mems:
                self._dir("cpuset", "linux.resources.cpu.cpus/mems")

    def _apply(self, r: Resources, fresh: bool) -> None:
        cpu = r.cpu
        if cpu is not None and (cpu.cpus or cpu.mems):
            path = self.paths["cpuset"]
            if cpu.cpus:
                write_file(os.path.join(path, "cpuset.cpus"), cpu.cpus)
            if cpu.mems:
                write_file(os.path.join(path, "cpuset.mems"), cpu.mems)
        if r.devices is not None:
            _set_devices(self.paths["devices"], r.devices, fresh)
        if r.memory is not None:
            _set_memory(self.paths["memory"], r.memory, fresh)
        if cpu is not None and _uses_cpu_controller(cpu):
            _set_cpu(self.paths["cpu"], cpu)
        if r.pids_limit is not None:
            write_file(os.path.join(self.paths["pids"], "pids.max"),
                       "max" if r.pids_limit < 0 else str(r.pids_limit))
        if r.block_io is not None:
            _set_blkio(self.paths["blkio"], r.block_io)
        for hp in r.hugepage_limits:
            write_file(os.path.join(self.paths["hugetlb"], f"hugetlb.{hp.page_size}.limit_in_bytes"), str(hp.limit))
        if r.network is not None:
            if r.network.class_id is not None:
                write_file(os.path.join(self.paths["net_cls"], "net_cls.classid"), str(r.network.class_id))
            if r.network.priorities:
                write_lines(os.path.join(self.paths["net_prio"], "net_prio.ifpriomap"),
                            [f"{name} {prio}" for name, prio in r.network.priorities])
        if r.rdma:
            write_lines(os.path.join(self.paths["rdma"], "rdma.max"), [limit.line() for limit in r.rdma])

    def can_freeze(self) -> bool:
        return "freezer" in self.paths

    def freeze(self) -> None:
        state = os.path.join(self._dir("freezer", "pausing"), "freezer.state")
        # As runc found, a v1 cgroup whose tasks keep forking can sit in FREEZING: keep writing FROZEN, and now
        # and then thaw briefly so that the stragglers get caught on the next pass.
        deadline = time.monotonic() + FREEZE_TIMEOUT
        attempt = 0
        while True:
            write_file(state, "FROZEN")
            current = read_file(state).strip()
            if current == "FROZEN":
                return
            attempt += 1
            if time.monotonic() >= deadline:
                write_file(state, "THAWED")
                raise RuntimeFailure(f"cgroup {os.path.dirname(state)} did not freeze in {FREEZE_TIMEOUT:.0f} s "
                                     f"(it stayed {current})")
            if attempt % 50 == 49:
                write_file(state, "THAWED")
                time.sleep(0.01)
            elif attempt % 25 == 24:
                time.sleep(0.001)

    def thaw(self) -> None:
        state = os.path.join(self._dir("freezer", "resuming"), "freezer.state")
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while True:
            write_file(state, "THAWED")
            if read_file(state).strip() == "THAWED":
                return
            if time.monotonic() >= deadline:
                raise RuntimeFailure(f"cgroup {os.path.dirname(state)} did not thaw in {FREEZE_TIMEOUT:.0f} s")
            time.sleep(0.001)

    def frozen(self) -> bool:
        path = self.paths.get("freezer")
        if path is None:
            return False
        state = read_optional(os.path.join(path, "freezer.state"))
        return state is not None and state.strip() == "FROZEN"

    def pids(self) -> list[int]:
        # Every task is in every hierarchy: any one hierarchy lists them all.
        for name in ("freezer", "devices", "pids", "memory"):
            if name in self.paths:
                return pids_below(self.paths[name])
        return pids_below(self._dirs()[0])

    def stats(self) -> dict:
        stats: dict = {}
        if "cpuacct" in self.paths or "cpu" in self.paths:
            stats["cpu"] = _cpu_stats(self.paths.get("cpuacct"), self.paths.get("cpu"))
        if "memory" in self.paths:
            stats["memory"] = _memory_stats(self.paths["memory"])
        if "pids" in self.paths:
            path = self.paths["pids"]
            current = read_optional(os.path.join(path, "pids.current"))
            limit = (read_optional(os.path.join(path, "pids.max")) or "max").strip()
            stats["pids"] = {"current": int(current or 0), "limit": 0 if limit == "max" else int(limit)}
        if "blkio" in self.paths:
            stats["blkio"] = _blkio_stats(self.paths["blkio"])
        if "hugetlb" in self.paths:
            stats["hugetlb"] = _hugetlb_stats(self.paths["hugetlb"])
        return stats

    def destroy(self) -> None:
        errors = []
        for path in self._dirs():
            try:
                remove_tree(path)
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]


# --- setting limits -------------------------------------------------------------------------------------------

def _cpuset_inherit(path: str, skip_cpus: bool, skip_mems: bool) -> None:
    """A new v1 cpuset starts empty and no task can join it: copy cpus and mems down from the nearest parent."""
    for name, skip in (("cpuset.cpus", skip_cpus), ("cpuset.mems", skip_mems)):
        value = _cpuset_value(os.path.dirname(path), name)  # fills an empty parent even when we skip the leaf
        if not skip:
            write_file(os.path.join(path, name), value)


def _cpuset_value(path: str, name: str) -> str:
    value = read_file(os.path.join(path, name)).strip()
    if not value and os.path.exists(os.path.join(os.path.dirname(path), name)):
        # A parent someone else made without filling it in: fill it first, as runc's ensureParent does.
        value = _cpuset_value(os.path.dirname(path), name)
        write_file(os.path.join(path, name), value)
    return value


def _set_devices(path: str, rules: tuple[DeviceRule, ...], fresh: bool) -> None:
    default_allow, kept = effective_device_rules(rules)
    lines: list[tuple[bool, str]] = []
    for rule in kept:
        # The kernel reads any "a ..." line as "everything", whatever follows: spell a partial one as b and c.
        for type_ in ("b", "c") if rule.type == "a" else (rule.type,):
            lines.append((rule.allow, rule.v1_line(type_)))
    allow = os.path.join(path, "devices.allow")
    deny = os.path.join(path, "devices.deny")
    if not fresh and not default_allow and all(ok for ok, _ in lines):
        # Updating a running container's allowlist: change only what differs, so that no device it is using
        # is denied for an instant (a full "deny a" then re-allow would be).
        current = read_file(os.path.join(path, "devices.list")).split("\n")
        if "a *:* rwm" not in current:
            wanted = [line for _, line in lines]
            have = {line for line in current if line}
            gone = sorted(have.difference(wanted))
            if gone:
                write_lines(deny, gone)
            new = [line for line in wanted if line not in have]
            if new:
                write_lines(allow, new)
            return
    # runc's order: reset to the default first, then every rule in the listed order (one open per run of
    # rules going to the same file).
    write_file(allow if default_allow else deny, "a")
    start = 0
    for i in range(1, len(lines) + 1):
        if i == len(lines) or lines[i][0] != lines[start][0]:
            write_lines(allow if lines[start][0] else deny, [line for _, line in lines[start:i]])
            start = i


def _set_memory(path: str, m: Memory, fresh: bool) -> None:
    limit_file = os.path.join(path, "memory.limit_in_bytes")
    swap_file = os.path.join(path, "memory.memsw.limit_in_bytes")
    swap = m.swap
    if swap is None and m.limit == -1 and not fresh and os.path.exists(swap_file):
        swap = -1  # runc: "unlimited memory" on update lifts the memory+swap limit with it
    writes = []
    if m.limit is not None:
        writes.append((limit_file, str(m.limit)))
    if swap is not None:
        if not os.path.exists(swap_file):
            if swap != -1:
                raise Unsupported("linux.resources.memory.swap needs swap accounting (memory.memsw.*), "
                                  "which this kernel does not have")
        else:
            writes.append((swap_file, str(swap)))
    if len(writes) == 2:
        # The kernel wants limit <= memory+swap at every step: raising both needs swap first, lowering both
        # needs the limit first. Try the usual order and turn round on EINVAL instead of reading the old values.
        try:
            write_file(*writes[0])
        except SyscallError as e:
            if e.errno != errno.EINVAL:
                raise
            write_file(*writes[1])
            write_file(*writes[0])
        else:
            write_file(*writes[1])
    elif writes:
        write_file(*writes[0])
    if m.reservation is not None:
        write_file(os.path.join(path, "memory.soft_limit_in_bytes"), str(m.reservation))
    if m.kernel_tcp is not None:
        write_file(os.path.join(path, "memory.kmem.tcp.limit_in_bytes"), str(m.kernel_tcp))
    if m.swappiness is not None:
        write_file(os.path.join(path, "memory.swappiness"), str(m.swappiness))
    if m.disable_oom_killer is not None and (m.disable_oom_killer or not fresh):
        write_file(os.path.join(path, "memory.oom_control"), "1" if m.disable_oom_killer else "0")


def _uses_cpu_controller(c: Cpu) -> bool:
    return any(v is not None for v in (c.shares, c.quota, c.period, c.burst, c.realtime_runtime,
                                       c.realtime_period, c.idle))


def _set_cpu(path: str, c: Cpu) -> None:
    # Realtime budget before anything joins: a realtime task cannot join a group without one.
    if c.realtime_period is not None:
        write_file(os.path.join(path, "cpu.rt_period_us"), str(c.realtime_period))
    if c.realtime_runtime is not None:
        write_file(os.path.join(path, "cpu.rt_runtime_us"), str(c.realtime_runtime))
    if c.shares is not None:
        write_file(os.path.join(path, "cpu.shares"), str(c.shares))
    period_pending = False
    if c.period is not None:
        try:
            write_file(os.path.join(path, "cpu.cfs_period_us"), str(c.period))
        except SyscallError as e:
            # A shorter period can break the parent's quota with the old quota: retry once the quota is set.
            if e.errno != errno.EINVAL or c.quota is None:
                raise
            period_pending = True
    if c.quota is not None:
        write_file(os.path.join(path, "cpu.cfs_quota_us"), str(c.quota))
        if period_pending:
            write_file(os.path.join(path, "cpu.cfs_period_us"), str(c.period))
    if c.burst is not None:
        write_file(os.path.join(path, "cpu.cfs_burst_us"), str(c.burst))
    if c.idle is not None:
        write_file(os.path.join(path, "cpu.idle"), str(c.idle))


def _set_blkio(path: str, b: BlockIO) -> None:
    # Hosts with the BFQ scheduler have blkio.bfq.weight (which also takes "major:minor weight") instead.
    weight_file = os.path.join(path, "blkio.weight")
    weight_device_file = os.path.join(path, "blkio.weight_device")
    if (b.weight is not None or b.weight_device) and not os.path.exists(weight_file):
        weight_file = weight_device_file = os.path.join(path, "blkio.bfq.weight")
    if b.weight is not None:
        write_file(weight_file, str(b.weight))
    if b.leaf_weight is not None:
        write_file(os.path.join(path, "blkio.leaf_weight"), str(b.leaf_weight))
    for wd in b.weight_device:
        if wd.weight is not None:
            write_file(weight_device_file, f"{wd.major}:{wd.minor} {wd.weight}")
        if wd.leaf_weight is not None:
            write_file(os.path.join(path, "blkio.leaf_weight_device"), f"{wd.major}:{wd.minor} {wd.leaf_weight}")
    for name, devices in (("read_bps_device", b.throttle_read_bps), ("write_bps_device", b.throttle_write_bps),
                          ("read_iops_device", b.throttle_read_iops), ("write_iops_device", b.throttle_write_iops)):
        if devices:
            write_lines(os.path.join(path, f"blkio.throttle.{name}"),
                        [f"{d.major}:{d.minor} {d.rate}" for d in devices])


# --- statistics -----------------------------------------------------------------------------------------------

def _int_file(path: str) -> int:
    text = read_optional(path)
    return int(text) if text and text.strip().lstrip("-").isdigit() else 0


def _cpu_stats(cpuacct: str | None, cpu: str | None) -> dict:
    usage: dict = {}
    if cpuacct is not None:
        usage["total"] = _int_file(os.path.join(cpuacct, "cpuacct.usage"))
        usage["percpu"] = [int(v) for v in (read_optional(os.path.join(cpuacct, "cpuacct.usage_percpu")) or "").split()]
        percpu_user = read_optional(os.path.join(cpuacct, "cpuacct.usage_percpu_user"))
        percpu_sys = read_optional(os.path.join(cpuacct, "cpuacct.usage_percpu_sys"))
        if percpu_user is not None and percpu_sys is not None:
            usage["percpu_user"] = [int(v) for v in percpu_user.split()]
            usage["percpu_kernel"] = [int(v) for v in percpu_sys.split()]
        user = read_optional(os.path.join(cpuacct, "cpuacct.usage_user"))
        if user is not None:
            usage["user"] = int(user)
            usage["kernel"] = _int_file(os.path.join(cpuacct, "cpuacct.usage_sys"))
        else:
            # Older kernels: only cpuacct.stat, in USER_HZ ticks.
            ticks = read_keyed(os.path.join(cpuacct, "cpuacct.stat"))
            ns_per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            usage["user"] = ticks.get("user", 0) * ns_per_tick
            usage["kernel"] = ticks.get("system", 0) * ns_per_tick
    throttling: dict = {}
    if cpu is not None:
        stat = read_keyed(os.path.join(cpu, "cpu.stat"))
        throttling = {"periods": stat.get("nr_periods", 0), "throttledPeriods": stat.get("nr_throttled", 0),
                      "throttledTime": stat.get("throttled_time", 0)}
    return {"usage": usage, "throttling": throttling}


def _memory_entry(path: str, prefix: str) -> dict:
    return {"limit": _int_file(os.path.join(path, f"{prefix}.limit_in_bytes")),
            "usage": _int_file(os.path.join(path, f"{prefix}.usage_in_bytes")),
            "max": _int_file(os.path.join(path, f"{prefix}.max_usage_in_bytes")),
            "failcnt": _int_file(os.path.join(path, f"{prefix}.failcnt"))}


def _memory_stats(path: str) -> dict:
    raw = read_keyed(os.path.join(path, "memory.stat"))
    result = {"cache": raw.get("total_cache", raw.get("cache", 0)), "usage": _memory_entry(path, "memory"),
              "raw": raw}
    if os.path.exists(os.path.join(path, "memory.memsw.usage_in_bytes")):
        result["swap"] = _memory_entry(path, "memory.memsw")
    if os.path.exists(os.path.join(path, "memory.kmem.usage_in_bytes")):
        result["kernel"] = _memory_entry(path, "memory.kmem")
        result["kernelTCP"] = _memory_entry(path, "memory.kmem.tcp")
    return result


def _blkio_entries(text: str | None) -> list[dict]:
    entries = []
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) == 3 and ":" in fields[0]:
            major, _, minor = fields[0].partition(":")
            entries.append({"major": int(major), "minor": int(minor), "op": fields[1], "value": int(fields[2])})
    return entries


def _blkio_stats(path: str) -> dict:
    # Prefer the scheduler's own counters (CFQ's, then BFQ's); the throttle layer's exist everywhere.
    for prefix in ("blkio", "blkio.bfq", "blkio.throttle"):
        serviced = read_optional(os.path.join(path, f"{prefix}.io_serviced_recursive"))
        if serviced is not None:
            return {"ioServiceBytesRecursive": _blkio_entries(
                        read_optional(os.path.join(path, f"{prefix}.io_service_bytes_recursive"))),
                    "ioServicedRecursive": _blkio_entries(serviced)}
    return {}


def _hugetlb_stats(path: str) -> dict:
    result = {}
    for name in sorted(os.listdir(path)):
        if name.startswith("hugetlb.") and name.endswith(".usage_in_bytes") and name.count(".") == 2:
            size = name.split(".")[1]
            result[size] = {"usage": _int_file(os.path.join(path, name)),
                            "max": _int_file(os.path.join(path, f"hugetlb.{size}.max_usage_in_bytes")),
                            "failcnt": _int_file(os.path.join(path, f"hugetlb.{size}.failcnt"))}
    return result

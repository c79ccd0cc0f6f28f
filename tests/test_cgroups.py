"""The cgroup layer against the real kernel: v1 limits and their effects, v2 freeze/kill and BPF device control.

Runs as root. On a hybrid host (v1 controllers plus /sys/fs/cgroup/unified) both halves run; the v2 tests root a
V2Cgroup explicitly at the cgroup2 mount. Every cgroup and process a test makes is removed, pass or fail.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from coldbrew.runtime.cgroups import (Cgroup, Resources, devices_bpf, from_paths, join_self, layout, mounts,
                                      open_cgroup)
from coldbrew.runtime.cgroups.resources import DeviceRule
from coldbrew.runtime.cgroups.v1 import V1Cgroup
from coldbrew.runtime.cgroups.v2 import V2Cgroup, blkio_weight_to_io_weight, shares_to_weight, swap_max
from coldbrew.runtime.errors import RuntimeFailure, SpecError, SyscallError, Unsupported
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    V1_HOST = layout() in ("v1", "hybrid")
    V2_MOUNT = mounts()[1]
except Unsupported:  # no cgroup file system at all
    V1_HOST, V2_MOUNT = False, None
needs_v1 = pytest.mark.skipif(not V1_HOST, reason="needs cgroup v1 controllers")
needs_v2 = pytest.mark.skipif(V2_MOUNT is None, reason="needs a cgroup2 mount")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")

DENY_ALL = {"allow": False, "access": "rwm"}
NULL = {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
ZERO = {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"}


# --- child processes ------------------------------------------------------------------------------------------

class Child:
    """A forked process that waits until released, then runs `action` and exits with its return value."""

    def __init__(self, action: Callable[[], int]) -> None:
        ready_r, self._go = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.close(self._go)
                os.read(ready_r, 1)
                code = action()
            finally:
                os._exit(code)
        os.close(ready_r)
        self.pid = pid
        self.status: int | None = None

    def go(self) -> None:
        os.write(self._go, b"x")
        os.close(self._go)
        self._go = -1

    def wait(self, timeout: float = 10.0) -> int:
        """The raw wait status."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"child {self.pid} did not exit in {timeout} s")
            time.sleep(0.005)
        return self.status

    def exit_code(self) -> int:
        status = self.wait()
        assert os.WIFEXITED(status), f"child ended by signal {os.WTERMSIG(status)}"
        return os.WEXITSTATUS(status)

    def cleanup(self) -> None:
        if self._go != -1:
            os.close(self._go)
            self._go = -1
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()


@pytest.fixture
def children() -> Iterator[Callable[[Callable[[], int]], Child]]:
    made: list[Child] = []

    def spawn(action: Callable[[], int]) -> Child:
        child = Child(action)
        made.append(child)
        return child

    yield spawn
    for child in made:
        child.cleanup()


def _sleep_forever() -> int:
    signal.pause()
    return 0


def _open_errno(path: str, flags: int = os.O_RDONLY) -> int:
    try:
        os.close(os.open(path, flags))
    except OSError as e:
        return e.errno or -1
    return 0


# --- cgroup fixtures ------------------------------------------------------------------------------------------

@pytest.fixture
def v1_cgroups() -> Iterator[Callable[..., Cgroup]]:
    """Cgroups under a private /coldbrew-test-* parent in every v1 hierarchy; all removed afterwards."""
    if not V1_HOST:
        pytest.skip("needs cgroup v1 controllers")
    parent = f"/coldbrew-test-{uuid.uuid4().hex[:8]}"
    made: list[Cgroup] = []

    def make(name: str = "c", resources: Resources | None = None) -> Cgroup:
        cg = open_cgroup(f"{parent}/{name}", "unused")
        made.append(cg)
        cg.create(resources)
        return cg

    make.parent = parent  # type: ignore[attr-defined]
    yield make
    for cg in made:
        _force_remove(cg)
    for mountpoint, _root in mounts()[0].values():
        _rmdir_tree(mountpoint + parent)


@pytest.fixture
def v2_root() -> Iterator[str]:
    """A private parent cgroup under the cgroup2 mount; the mount root's subtree_control is restored after."""
    if V2_MOUNT is None:
        pytest.skip("needs a cgroup2 mount")
    root = V2_MOUNT[0]
    control = os.path.join(root, "cgroup.subtree_control")
    before = set(open(control).read().split())
    parent = os.path.join(root, f"coldbrew-test-{uuid.uuid4().hex[:8]}")
    yield parent
    for pid in _procs_below(parent):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _rmdir_tree(parent)
    for name in set(open(control).read().split()) - before:
        with open(control, "w") as f:
            f.write(f"-{name}")


def _procs_below(path: str) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        with open(os.path.join(dirpath, "cgroup.procs")) as f:
            pids.extend(int(p) for p in f.read().split())
    return pids


def _rmdir_tree(path: str) -> None:
    deadline = time.monotonic() + 5
    while os.path.isdir(path):
        try:
            for dirpath, _dirs, _files in os.walk(path, topdown=False):
                os.rmdir(dirpath)
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _force_remove(cg: Cgroup) -> None:
    try:
        if cg.frozen():
            cg.thaw()
        for pid in cg.pids():
            os.kill(pid, signal.SIGKILL)
    except (OSError, RuntimeFailure):
        pass
    for path in set(cg.paths.values()):
        if os.path.isdir(path):
            _rmdir_tree(path)


def _read(cg: Cgroup, subsystem: str, name: str) -> str:
    with open(os.path.join(cg.paths[subsystem], name)) as f:
        return f.read().strip()


# --- Resources.from_spec ----------------------------------------------------------------------------------------

def test_from_spec_parses_a_full_resources_object() -> None:
    r = Resources.from_spec({
        "memory": {"limit": 1 << 30, "reservation": 1 << 29, "swap": 2 << 30, "kernel": 1 << 20,
                   "kernelTCP": 1 << 20, "swappiness": 10, "disableOOMKiller": True},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "realtimeRuntime": 900, "realtimePeriod": 1000,
                "cpus": "0-1", "mems": "0", "idle": 1},
        "pids": {"limit": 32},
        "devices": [DENY_ALL, {"allow": True, "type": "c", "major": 136, "access": "wr"}],
        "blockIO": {"weight": 500, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1000}]},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 1 << 21}],
        "network": {"classID": 7, "priorities": [{"name": "eth0", "priority": 3}]},
        "rdma": {"mlx5_0": {"hcaHandles": 3}},
        "unified": {"memory.high": "1G"},
        "someExtension": {"ignored": True},
    })
    assert r.memory is not None and r.memory.limit == 1 << 30 and r.memory.swap == 2 << 30
    assert r.memory.swappiness == 10 and r.memory.disable_oom_killer is True and r.memory.kernel_tcp == 1 << 20
    assert r.cpu is not None and (r.cpu.shares, r.cpu.quota, r.cpu.period, r.cpu.cpus) == (512, 50000, 100000, "0-1")
    assert r.pids_limit == 32
    assert r.devices == (DeviceRule(False, "a", None, None, "rwm"), DeviceRule(True, "c", 136, None, "rw"))
    assert r.devices[1].v1_line() == "c 136:* rw"
    assert r.block_io is not None and r.block_io.weight == 500 and r.block_io.throttle_read_bps[0].rate == 1000
    assert r.hugepage_limits[0].page_size == "2MB"
    assert r.network is not None and r.network.priorities == (("eth0", 3),)
    assert r.rdma[0].line() == "mlx5_0 hca_handle=3"
    assert r.unified == (("memory.high", "1G"),)


def test_from_spec_empty_and_unset_values() -> None:
    assert Resources.from_spec(None) == Resources()
    r = Resources.from_spec({"memory": {"limit": 0}, "cpu": {"shares": 0, "cpus": ""}, "pids": {"limit": -5}})
    assert r.memory is not None and r.memory.limit is None
    assert r.cpu is not None and r.cpu.shares is None and r.cpu.cpus is None
    assert r.pids_limit == -1  # any negative limit means "max"
    assert Resources.from_spec({"devices": []}).devices == ()  # an empty allowlist: deny everything


@pytest.mark.parametrize("data, path", [
    ([], "linux.resources"),
    ({"memory": {"limit": "1G"}}, "linux.resources.memory.limit"),
    ({"memory": {"limit": True}}, "linux.resources.memory.limit"),
    ({"memory": {"limit": 1.5}}, "linux.resources.memory.limit"),
    ({"memory": {"limit": -2}}, "linux.resources.memory.limit"),
    ({"memory": {"limit": 100 << 20, "swap": 50 << 20}}, "linux.resources.memory.swap"),
    ({"memory": {"swappiness": 101}}, "linux.resources.memory.swappiness"),
    ({"memory": {"disableOOMKiller": 1}}, "linux.resources.memory.disableOOMKiller"),
    ({"cpu": {"shares": 1}}, "linux.resources.cpu.shares"),
    ({"cpu": {"period": 10}}, "linux.resources.cpu.period"),
    ({"cpu": {"quota": 5}}, "linux.resources.cpu.quota"),
    ({"cpu": {"cpus": "0-a"}}, "linux.resources.cpu.cpus"),
    ({"cpu": {"idle": 2}}, "linux.resources.cpu.idle"),
    ({"pids": {"limit": "10"}}, "linux.resources.pids.limit"),
    ({"devices": {}}, "linux.resources.devices"),
    ({"devices": [DENY_ALL, {"type": "c"}]}, "linux.resources.devices[1].allow"),
    ({"devices": [{"allow": True, "type": "x"}]}, "linux.resources.devices[0].type"),
    ({"devices": [{"allow": True, "access": "rwx"}]}, "linux.resources.devices[0].access"),
    ({"devices": [{"allow": True, "major": 1 << 32}]}, "linux.resources.devices[0].major"),
    ({"blockIO": {"weight": 5}}, "linux.resources.blockIO.weight"),
    ({"blockIO": {"throttleReadBpsDevice": [{"major": 8, "rate": 1}]}},
     "linux.resources.blockIO.throttleReadBpsDevice[0]"),
    ({"hugepageLimits": [{"pageSize": "2M", "limit": 1}]}, "linux.resources.hugepageLimits[0].pageSize"),
    ({"network": {"priorities": [{"name": "eth 0", "priority": 1}]}}, "linux.resources.network.priorities[0].name"),
    ({"unified": {"../memory.max": "1"}}, "linux.resources.unified.../memory.max"),
    ({"unified": {"memory.max": 1}}, "linux.resources.unified.memory.max"),
])
def test_from_spec_names_the_bad_field(data: object, path: str) -> None:
    with pytest.raises(SpecError) as info:
        Resources.from_spec(data)
    assert info.value.path == path


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["a", "b", "c", "rwm", "2MB", "0-1", "max"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_KEYS = ["memory", "cpu", "pids", "devices", "blockIO", "hugepageLimits", "network", "rdma", "unified", "limit",
         "reservation", "swap", "kernel", "kernelTCP", "swappiness", "disableOOMKiller", "checkBeforeUpdate",
         "shares", "quota", "period", "burst", "realtimeRuntime", "realtimePeriod", "cpus", "mems", "idle",
         "allow", "type", "major", "minor", "access", "weight", "leafWeight", "weightDevice",
         "throttleReadBpsDevice", "throttleWriteIOPSDevice", "rate", "pageSize", "classID", "priorities", "name",
         "priority", "hcaHandles", "hcaObjects"]
_shaped = st.recursive(_json, lambda inner: st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)
                       | st.lists(st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5), max_size=3),
                       max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, st.dictionaries(st.sampled_from(_KEYS), _shaped, max_size=6)))
def test_from_spec_garbage_raises_only_spec_error(data: object) -> None:
    try:
        r = Resources.from_spec(data)
    except SpecError as e:
        assert e.path.startswith("linux.resources")
    else:
        assert isinstance(r, Resources)


def test_conversions_for_cgroup_v2() -> None:
    assert [shares_to_weight(s) for s in (2, 1024, 262144)] == [1, 100, 10000]
    assert shares_to_weight(512) < 100 < shares_to_weight(2048)
    assert blkio_weight_to_io_weight(10) == 1 and blkio_weight_to_io_weight(1000) == 10000
    assert swap_max(300, 100) == 200  # OCI swap is memory+swap
    assert swap_max(None, -1) == -1 and swap_max(-1, 100) == -1 and swap_max(None, 100) is None
    with pytest.raises(Unsupported):
        swap_max(300, None)


# --- path resolution --------------------------------------------------------------------------------------------

def _own(key: str) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if (key == "unified" and hid == "0") or key in controllers.split(","):
                return path
    raise AssertionError(key)


def test_open_cgroup_resolves_paths_and_creates_nothing() -> None:
    cg = open_cgroup(None, "abc123")
    v1, v2 = mounts()
    if layout() == "v2":
        assert v2 is not None and cg.paths == {"unified": v2[0] + "/coldbrew/abc123"}
    else:
        assert isinstance(cg, V1Cgroup) and "devices" in cg.paths and "memory" in cg.paths
        assert all(path == v1[name][0] + "/coldbrew/abc123" for name, path in cg.paths.items())
        rel = open_cgroup("../../sneaky/x", "abc123")
        for name, path in rel.paths.items():
            own = _own(name) if name != "systemd" else _own("name=systemd")
            assert path == os.path.normpath(f"{v1[name][0]}{own}/sneaky/x")
        assert open_cgroup("/a/b/../c", "i").paths["memory"] == v1["memory"][0] + "/a/c"
    assert not any(os.path.exists(p) for p in cg.paths.values())
    assert json.loads(json.dumps(cg.paths)) == cg.paths
    assert from_paths(cg.paths).paths == cg.paths


def test_open_cgroup_refuses_bad_paths() -> None:
    with pytest.raises(Unsupported, match="slice:prefix:name"):
        open_cgroup("system.slice:docker:abc", "abc")
    with pytest.raises(SpecError):
        open_cgroup("/", "abc")
    with pytest.raises(RuntimeFailure):
        open_cgroup(None, "../x")
    with pytest.raises(RuntimeFailure):
        from_paths({"memory": 3})  # type: ignore[dict-item]


# --- cgroup v1 ------------------------------------------------------------------------------------------------

LIMITS = {"memory": {"limit": 256 << 20, "swap": 256 << 20, "reservation": 128 << 20, "swappiness": 0},
          "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
          "pids": {"limit": 16},
          "devices": [DENY_ALL, NULL, ZERO, {"allow": True, "type": "c", "major": 136, "access": "rwm"}]}


@needs_v1
def test_v1_create_writes_every_limit(v1_cgroups: Callable[..., Cgroup]) -> None:
    cg = v1_cgroups("limits", Resources.from_spec(LIMITS))
    assert _read(cg, "memory", "memory.limit_in_bytes") == str(256 << 20)
    assert _read(cg, "memory", "memory.memsw.limit_in_bytes") == str(256 << 20)
    assert _read(cg, "memory", "memory.soft_limit_in_bytes") == str(128 << 20)
    assert _read(cg, "memory", "memory.swappiness") == "0"
    assert _read(cg, "cpu", "cpu.shares") == "512"
    assert _read(cg, "cpu", "cpu.cfs_quota_us") == "50000"
    assert _read(cg, "cpu", "cpu.cfs_period_us") == "100000"
    assert _read(cg, "cpuset", "cpuset.cpus") == "0"
    assert _read(cg, "cpuset", "cpuset.mems") == "0"
    assert _read(cg, "pids", "pids.max") == "16"
    assert _read(cg, "devices", "devices.list").splitlines() == ["c 1:3 rwm", "c 1:5 rwm", "c 136:* rwm"]


@needs_v1
def test_v1_cpuset_is_inherited_when_not_given(v1_cgroups: Callable[..., Cgroup]) -> None:
    cg = v1_cgroups("nested/deeper", None)
    with open(os.path.join(mounts()[0]["cpuset"][0], "cpuset.effective_cpus")) as f:
        host_cpus = f.read().strip()
    assert _read(cg, "cpuset", "cpuset.cpus") == host_cpus
    assert _read(cg, "cpuset", "cpuset.mems") != ""


@needs_v1
def test_v1_limits_take_effect(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("effects", Resources.from_spec(LIMITS))

    def probe() -> int:
        failures = 0
        if os.sched_getaffinity(0) != {0}:
            failures |= 1
        if _open_errno("/dev/full") != errno.EPERM:  # not in the allowlist
            failures |= 2
        if _open_errno("/dev/zero") != 0:
            failures |= 4
        return failures

    child = children(probe)
    cg.add_process(child.pid)
    assert child.pid in cg.pids()
    child.go()
    assert child.exit_code() == 0


@needs_v1
def test_v1_pids_limit_stops_fork(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("pids", Resources.from_spec({"pids": {"limit": 1}}))

    def fork_once() -> int:
        try:
            pid = os.fork()
        except BlockingIOError:
            return 0
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return 1

    child = children(fork_once)
    cg.add_process(child.pid)
    child.go()
    assert child.exit_code() == 0
    assert cg.stats()["pids"] == {"current": 0, "limit": 1}


@needs_v1
def test_v1_memory_limit_kills_on_overuse(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("oom", Resources.from_spec({"memory": {"limit": 32 << 20, "swap": 32 << 20}}))

    def hog() -> int:
        blocks = [b"\x01" * (8 << 20) for _ in range(16)]  # 128 MiB, every page touched
        return 0 if blocks else 1

    child = children(hog)
    cg.add_process(child.pid)
    child.go()
    status = child.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    memory = cg.stats()["memory"]
    assert memory["usage"]["limit"] == memory["swap"]["limit"] == 32 << 20
    assert memory["usage"]["max"] == 32 << 20  # the peak reached the limit and went no further
    oom = dict(line.split() for line in _read(cg, "memory", "memory.oom_control").splitlines())
    assert int(oom["oom_kill"]) == 1  # the cgroup's own OOM killer did it, not the host's


@needs_v1
def test_v1_cpu_quota_throttles(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("cpu", Resources.from_spec({"cpu": {"quota": 5000, "period": 10000}}))

    def spin() -> int:
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            pass
        return 0

    child = children(spin)
    cg.add_process(child.pid)
    child.go()
    assert child.exit_code() == 0
    cpu = cg.stats()["cpu"]
    assert cpu["throttling"]["throttledPeriods"] > 0
    assert 0 < cpu["usage"]["total"] < 0.2e9 and sum(cpu["usage"]["percpu"]) == cpu["usage"]["total"]


def _hold_memory() -> int:
    data = b"\x01" * (8 << 20)
    signal.pause()
    return len(data) & 0


@needs_v1
def test_v1_update(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("update", Resources.from_spec(LIMITS))
    # Raising limit and memory+swap together needs the swap written first: the EINVAL turn-round.
    cg.update(Resources.from_spec({"memory": {"limit": 512 << 20, "swap": 1 << 30}, "pids": {"limit": -1}},
                                  "resources"))
    assert _read(cg, "memory", "memory.limit_in_bytes") == str(512 << 20)
    assert _read(cg, "memory", "memory.memsw.limit_in_bytes") == str(1 << 30)
    assert _read(cg, "pids", "pids.max") == "max"
    cg.update(Resources.from_spec({"memory": {"limit": 128 << 20, "swap": 128 << 20}, "cpu": {"quota": -1}}))
    assert _read(cg, "memory", "memory.limit_in_bytes") == str(128 << 20)
    assert _read(cg, "memory", "memory.memsw.limit_in_bytes") == str(128 << 20)
    assert _read(cg, "cpu", "cpu.cfs_quota_us") == "-1"
    # A new allowlist replaces the old one: /dev/full in, /dev/zero out.
    cg.update(Resources.from_spec({"devices": [DENY_ALL, NULL, {"allow": True, "type": "c", "major": 1,
                                                                "minor": 7, "access": "rw"}]}))
    assert _read(cg, "devices", "devices.list").splitlines() == ["c 1:3 rwm", "c 1:7 rw"]
    child = children(lambda: (_open_errno("/dev/full", os.O_WRONLY) != 0) | (_open_errno("/dev/zero") == 0) << 1)
    cg.add_process(child.pid)
    child.go()
    assert child.exit_code() == 0

    holder = children(_hold_memory)
    cg.add_process(holder.pid)
    holder.go()
    deadline = time.monotonic() + 5
    while cg.stats()["memory"]["usage"]["usage"] < 8 << 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeFailure, match="below the container's usage"):
        cg.update(Resources.from_spec({"memory": {"limit": 4 << 20, "checkBeforeUpdate": True}}))
    assert _read(cg, "memory", "memory.limit_in_bytes") == str(128 << 20)


@needs_v1
def test_v1_freeze_thaw(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("freezer")
    child = children(_sleep_forever)
    cg.add_process(child.pid)
    child.go()
    assert not cg.frozen()
    cg.freeze()
    assert cg.frozen() and _read(cg, "freezer", "freezer.state") == "FROZEN"
    assert from_paths(json.loads(json.dumps(cg.paths))).frozen()
    cg.thaw()
    assert not cg.frozen() and _read(cg, "freezer", "freezer.state") == "THAWED"


@needs_v1
def test_v1_kill_all_and_destroy(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("kill")
    sub = V1Cgroup({name: path + "/inner" for name, path in cg.paths.items()})
    sub.create(None)  # a nested cgroup, as a container may make: pids() and destroy() cover it
    first, second = children(_sleep_forever), children(_sleep_forever)
    cg.add_process(first.pid)
    sub.add_process(second.pid)
    first.go()
    second.go()
    assert sorted(cg.pids()) == sorted([first.pid, second.pid])
    cg.kill_all(signal.SIGTERM)
    for child in (first, second):
        status = child.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not cg.frozen()  # kill_all thaws again
    cg.destroy()
    assert not any(os.path.exists(p) for p in cg.paths.values())
    cg.destroy()  # already gone: no error


@needs_v1
def test_v1_failed_create_leaves_nothing(v1_cgroups: Callable[..., Cgroup]) -> None:
    parent = v1_cgroups.parent  # type: ignore[attr-defined]
    with pytest.raises(SyscallError, match="cpuset.cpus"):
        v1_cgroups("bad/leaf", Resources.from_spec({"cpu": {"cpus": "4000"}}))
    for mountpoint, _root in mounts()[0].values():
        assert not os.path.exists(mountpoint + parent)  # every level it made, parent included, is gone
    with pytest.raises(Unsupported, match="unified"):
        v1_cgroups("unified", Resources.from_spec({"unified": {"memory.high": "1"}}))


@needs_v1
def test_v1_stats_shape(v1_cgroups: Callable[..., Cgroup], children: Callable[..., Child]) -> None:
    cg = v1_cgroups("stats", Resources.from_spec({"memory": {"limit": 128 << 20}, "pids": {"limit": 9}}))
    child = children(_sleep_forever)
    cg.add_process(child.pid)
    child.go()
    stats = cg.stats()
    assert set(stats["cpu"]["usage"]) >= {"total", "percpu", "kernel", "user"}
    assert set(stats["cpu"]["throttling"]) == {"periods", "throttledPeriods", "throttledTime"}
    assert set(stats["memory"]["usage"]) == {"limit", "usage", "max", "failcnt"}
    assert stats["memory"]["usage"]["limit"] == 128 << 20 and isinstance(stats["memory"]["raw"], dict)
    assert stats["pids"] == {"current": 1, "limit": 9}
    assert set(stats["blkio"]) == {"ioServiceBytesRecursive", "ioServicedRecursive"}
    json.dumps(stats)


# --- cgroup v2 (on a hybrid host: the bare unified hierarchy) ----------------------------------------------------

def _v2(parent: str, name: str, resources: Resources | None = None) -> V2Cgroup:
    assert V2_MOUNT is not None
    cg = V2Cgroup(os.path.join(parent, name), root=V2_MOUNT[0])
    cg.create(resources)
    return cg


@needs_v2
def test_v2_create_and_destroy(v2_root: str) -> None:
    cg = _v2(v2_root, "a/b")
    assert os.path.isdir(cg.path) and cg.paths == {"unified": cg.path}
    assert isinstance(from_paths(cg.paths), V2Cgroup)
    assert cg.pids() == [] and "cpu" in cg.stats()
    cg.destroy()
    assert not os.path.exists(cg.path)
    cg.destroy()


@needs_v2
def test_v2_freeze_and_kill(v2_root: str, children: Callable[..., Child]) -> None:
    cg = _v2(v2_root, "freeze")
    first, second = children(_sleep_forever), children(_sleep_forever)
    for child in (first, second):
        cg.add_process(child.pid)
        child.go()
    cg.freeze()
    assert cg.frozen()
    with open(os.path.join(cg.path, "cgroup.events")) as f:
        assert "frozen 1" in f.read().splitlines()
    cg.thaw()
    assert not cg.frozen()
    cg.kill_all(signal.SIGKILL)  # cgroup.kill where the kernel has it
    for child in (first, second):
        status = child.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    cg.destroy()
    assert not os.path.exists(cg.path)


@needs_v2
def test_v2_kill_with_another_signal_freezes_first(v2_root: str, children: Callable[..., Child]) -> None:
    cg = _v2(v2_root, "term")
    child = children(_sleep_forever)
    cg.add_process(child.pid)
    child.go()
    cg.kill_all(signal.SIGTERM)
    status = child.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not cg.frozen()


def _device_probe() -> int:
    """Bit set = surprise: /dev/null rw allowed, /dev/zero read-only, /dev/full denied."""
    return ((_open_errno("/dev/null", os.O_RDWR) != 0)
            | (_open_errno("/dev/zero", os.O_RDONLY) != 0) << 1
            | (_open_errno("/dev/zero", os.O_WRONLY) != errno.EPERM) << 2
            | (_open_errno("/dev/full", os.O_RDONLY) != errno.EPERM) << 3)


@needs_v2
def test_v2_bpf_device_program_enforces_rules(v2_root: str, children: Callable[..., Child]) -> None:
    rules = Resources.from_spec({"devices": [DENY_ALL, NULL, {"allow": True, "type": "c", "major": 1, "minor": 5,
                                                              "access": "r"}]})
    cg = _v2(v2_root, "devices", rules)
    fd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(devices_bpf.attached(fd)) == 1
    finally:
        os.close(fd)
    child = children(_device_probe)
    cg.add_process(child.pid)
    child.go()
    assert child.exit_code() == 0


@needs_v2
def test_v2_device_update_replaces_the_program(v2_root: str, children: Callable[..., Child]) -> None:
    cg = _v2(v2_root, "update", Resources.from_spec({"devices": [DENY_ALL, NULL]}))
    fd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = devices_bpf.attached(fd)
        # Last match wins: allow all of major 1, then take /dev/full out again.
        cg.update(Resources.from_spec({"devices": [
            DENY_ALL, {"allow": True, "type": "c", "major": 1, "access": "rwm"},
            {"allow": False, "type": "c", "major": 1, "minor": 7, "access": "rwm"}]}))
        after = devices_bpf.attached(fd)
        assert len(after) == 1 and after != before
        child = children(lambda: (_open_errno("/dev/zero", os.O_RDWR) != 0)
                         | (_open_errno("/dev/full") != errno.EPERM) << 1)
        cg.add_process(child.pid)
        child.go()
        assert child.exit_code() == 0
        # Allow-all needs no program: the old one is detached.
        cg.update(Resources.from_spec({"devices": [{"allow": True, "access": "rwm"}]}))
        assert devices_bpf.attached(fd) == []
    finally:
        os.close(fd)


@needs_v2
def test_v2_verifier_accepts_every_rule_shape() -> None:
    shapes = [DeviceRule(allow, type_, major, minor, access)
              for allow in (True, False) for type_ in ("a", "b", "c") for major in (None, 0, 4095, (1 << 32) - 1)
              for minor in (None, 7) for access in ("r", "wm", "rwm")]
    insns = devices_bpf.program(tuple(shapes))
    assert insns is not None and len(insns) % 8 == 0
    os.close(devices_bpf.load(insns))
    assert devices_bpf.program((DeviceRule(True),)) is None
    with pytest.raises(SyscallError, match="verifier"):
        devices_bpf.load(insns[:-8])  # no exit: the verifier refuses, and its log is in the message


@needs_v2
def test_v2_hugetlb_limit_where_available(v2_root: str) -> None:
    assert V2_MOUNT is not None
    with open(os.path.join(V2_MOUNT[0], "cgroup.controllers")) as f:
        if "hugetlb" not in f.read().split():
            pytest.skip("no hugetlb controller on the cgroup2 mount")
    cg = _v2(v2_root, "huge/leaf", Resources.from_spec({"hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 21}]}))
    with open(os.path.join(cg.path, "hugetlb.2MB.max")) as f:
        assert f.read().strip() == str(4 << 21)


@needs_v2
def test_v2_missing_controller_is_named(v2_root: str) -> None:
    assert V2_MOUNT is not None
    with open(os.path.join(V2_MOUNT[0], "cgroup.controllers")) as f:
        if "pids" in f.read().split():
            pytest.skip("the pids controller is available here")
    with pytest.raises(Unsupported, match="pids controller is not enabled"):
        _v2(v2_root, "nopids", Resources.from_spec({"pids": {"limit": 5}}))
    assert not os.path.exists(os.path.join(v2_root, "nopids"))
    with pytest.raises(Unsupported, match="swappiness"):
        _v2(v2_root, "swappy", Resources.from_spec({"memory": {"swappiness": 5}}))
    assert not os.path.exists(os.path.join(v2_root, "swappy"))


def test_v1_a_forked_child_moves_itself_into_every_hierarchy(v1_cgroups: Callable[..., Cgroup],
                                                             children: Callable[..., Child]) -> None:
    cg = v1_cgroups("selfjoin")
    files = cg.self_join_files()
    assert sorted(files) == sorted({os.path.join(path, "tasks") for path in cg.paths.values()})
    own_before = open("/proc/self/cgroup").read()

    def join_and_wait() -> int:
        join_self(files)
        return _sleep_forever()

    child = children(join_and_wait)
    child.go()
    want = v1_cgroups.parent + "/selfjoin"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while True:
        lines = open(f"/proc/{child.pid}/cgroup").read().splitlines()
        v1_lines = [line for line in lines if not line.startswith("0::")]
        if v1_lines and all(line.split(":", 2)[2] == want for line in v1_lines):
            break
        assert time.monotonic() < deadline, f"the child never joined {want}: {lines}"
        time.sleep(0.01)
    assert child.pid in cg.pids()
    assert open("/proc/self/cgroup").read() == own_before  # only the child moved

"""Many create/start/kill/delete cycles leave nothing behind: mounts, cgroups, links, state, processes, fds.

`HostWatch` is also used by test_badinput.py and test_resources.py. Other test sessions may run on this host at the
same time, so a leak is judged only on what can be traced to this test: container ids, bridge and veth names with
the test's own prefix, mounts under the test's own directories, processes that are our children or whose root is
one of the test's root filesystems.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coldbrew.bench.bundles import busybox_config
from coldbrew.runtime.container import Runtime
from coldbrew.runtime.spec import Process
from conftest import coldbrew

CGROUP_PARENTS = ("/sys/fs/cgroup/*/coldbrew", "/sys/fs/cgroup/coldbrew")


def _mountinfo() -> dict[str, tuple[str, str]]:
    """mount id -> (mount point, propagation fields) of this process's mount namespace."""
    table = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            table[fields[0]] = (fields[4], " ".join(fields[6:fields.index("-")]))
    return table


def _children() -> dict[int, str]:
    """pid -> state letter of every child of this process (zombies included)."""
    me = os.getpid()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[1]) == me:
            found[int(name)] = fields[0].decode()
    return found


def _rooted_under(dirs: tuple[str, ...]) -> list[int]:
    """Processes whose root directory is inside one of `dirs`: container processes, wherever they were reparented."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                root = os.readlink(f"/proc/{name}/root")
            except OSError:
                continue
            if any(root == d or root.startswith(d + "/") for d in dirs):
                found.append(int(name))
    return found


def _fds() -> dict[int, str]:
    result = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            result[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used
    return result


def reap_orphans() -> None:
    """Reap our zombie children, as a shim does. After any Runtime() this process is a subreaper, so what the CLI
    leaves running is reparented to it: a container's init once `coldbrew create` exits, an exec'd process once
    `coldbrew exec --detach` exits. A pid namespace's init cannot finish exiting until its exec'd processes are
    reaped."""
    for pid, state in _children().items():
        if state == "Z":
            os.waitpid(pid, os.WNOHANG)


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@dataclass
class Snapshot:
    mounts: dict[str, tuple[str, str]]
    children: dict[int, str]
    fds: dict[int, str]
    links: set[str]
    rooted: set[int]  # processes running in one of the watched directories


@dataclass
class HostWatch:
    """What a test may leave behind, narrowed to what it can own.

    `prefix` starts every container id, bridge and host veth name the test makes; `dirs` are its bundles, root
    filesystems and state root.
    """

    prefix: str
    dirs: tuple[str, ...]
    runtime_root: str
    extra_links: set[str] = field(default_factory=set)  # names made by the runtime (random veths) to check too

    def snapshot(self) -> Snapshot:
        return Snapshot(_mountinfo(), _children(), _fds(), links(), set(_rooted_under(self.dirs)))

    def problems(self, before: Snapshot, *, fds: bool = True) -> list[str]:
        found = []
        after = _mountinfo()
        for mid, (point, propagation) in after.items():
            if mid not in before.mounts:
                if any(point == d or point.startswith(d + "/") for d in self.dirs):
                    found.append(f"mount left at {point}")
            elif before.mounts[mid][1] != propagation:
                found.append(f"propagation of {point} changed: {before.mounts[mid][1]!r} -> {propagation!r}")
        for pattern in CGROUP_PARENTS:
            for path in glob.glob(os.path.join(pattern, self.prefix + "*")):
                found.append(f"cgroup left: {path}")
        now = links()
        for name in sorted(now - before.links):
            if name.startswith(self.prefix):
                found.append(f"network device left: {name}")
        for name in sorted(self.extra_links & now):
            found.append(f"network device left: {name}")
        if os.path.isdir(self.runtime_root):
            for name in os.listdir(self.runtime_root):
                if name.startswith(self.prefix):
                    found.append(f"state directory left: {name}")
        for pid, state in _children().items():
            if pid not in before.children:
                found.append(f"child process left: {pid} (state {state})")
        for pid in set(_rooted_under(self.dirs)) - before.rooted:
            found.append(f"process {pid} still runs in a test root filesystem")
        if fds:
            for fd, target in _fds().items():
                if before.fds.get(fd) != target:
                    found.append(f"descriptor left open: {fd} -> {target}")
        return found

    def assert_clean(self, before: Snapshot, *, fds: bool = True, shim: bool = False) -> None:
        """`shim`: reap zombie children meanwhile, as the shim that runs the CLI would (see reap_orphans)."""
        # A kill's aftermath (a zombie reaped by init, an rmdir after the last task left) can lag a little.
        deadline = time.monotonic() + 2.0
        while (found := self.problems(before, fds=fds)) and time.monotonic() < deadline:
            if shim:
                reap_orphans()
            time.sleep(0.02)
        assert not found, "left behind:\n" + "\n".join(found)


def private_subnet(second_octet: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"10.{second_octet}.{int.from_bytes(os.urandom(1), 'big')}.0/24")


def remove_links(names: set[str]) -> None:
    """Test teardown: delete whatever of `names` is still there (a failed test must not leave devices)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in names:
            index = ipr.link_lookup(ifname=name)
            if index:
                ipr.link("del", index=index[0])


@pytest.fixture
def prefix() -> str:
    return f"lk{uuid.uuid4().hex[:6]}"


@pytest.fixture
def watch(prefix: str, tmp_path: Path, rootfs: Path, runtime_root: str) -> HostWatch:
    return HostWatch(prefix, (str(tmp_path), str(rootfs), runtime_root), runtime_root)


def warm_up(runtime: Runtime, bundle: Path, container_id: str) -> None:
    """One container first: the runtime keeps a few things open for its lifetime (the exec shim's memfd, the
    cgroup mount table); those are caches, not leaks."""
    stdio = _devnull_stdio()
    try:
        runtime.create(container_id, str(bundle), stdio=stdio).delete()
    finally:
        os.close(stdio[0])


def _devnull_stdio() -> tuple[int, int, int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return fd, fd, fd


def test_api_cycles_leave_nothing(runtime: Runtime, bundles, watch: HostWatch, prefix: str) -> None:
    """200 cycles through the in-process API, in every way a container ends, with exec'd processes and networks."""
    sleeper = bundles.make(["sleep", "60"])
    quick = bundles.make(["true"])
    subnet = private_subnet(241)
    bridge = prefix + "br"
    made_links = {bridge}
    stdio = _devnull_stdio()
    exec_sleep = Process.from_spec({"args": ["sleep", "60"], "env": ["PATH=/bin"]})
    exec_true = Process.from_spec({"args": ["true"], "env": ["PATH=/bin"]})
    warm_up(runtime, quick, prefix + "warm")
    before = watch.snapshot()
    try:
        for i in range(200):
            cid = f"{prefix}-{i}"
            kind = i % 5
            container = runtime.create(cid, str(quick if kind == 3 else sleeper), stdio=stdio)
            if kind == 0:  # created, never started
                assert container.status == "created"
                container.delete()
                continue
            container.start()
            if kind == 1:  # killed, reaped, deleted
                if i % 10 == 1:
                    assert container.exec(exec_true, stdio=stdio).wait() == 0
                    container.exec(exec_sleep, stdio=stdio)  # still running when the container is killed
                container.kill(signal.SIGKILL)
                assert container.wait() == 128 + signal.SIGKILL
                assert container.delete() == 128 + signal.SIGKILL
            elif kind == 2:  # deleted while running
                if i % 20 == 7:
                    container.exec(exec_true, stdio=stdio)  # exits, never waited for: delete reaps it
                if i % 20 == 2:
                    host_if = f"{prefix}v{i}"
                    made_links.add(host_if)
                    attachment = container.attach_network(bridge=bridge, address=f"{subnet[2 + i]}/24",
                                                          gateway=str(subnet[1]), host_ifname=host_if)
                    assert attachment["host_ifname"] in links()
                container.delete(force=True)
            elif kind == 3:  # exited by itself
                assert container.wait() == 0
                assert container.delete() == 0
            else:  # every process killed (--all), then deleted without waiting
                container.exec(exec_sleep, stdio=stdio)
                container.kill(signal.SIGKILL, all_processes=True)
                container.delete(force=True)
    finally:
        os.close(stdio[0])
        remove_links(made_links & links())
    watch.assert_clean(before)


def test_failed_creates_leave_nothing(runtime: Runtime, bundles, watch: HostWatch, prefix: str,
                                      tmp_path: Path) -> None:
    """A create that fails at each stage of the init (cgroup, mounts, hooks, exec lookup, OOM) cleans up."""
    from coldbrew.runtime.errors import RuntimeFailure

    failing = [
        ("cgroup", lambda c: c["linux"]["resources"].update(cpu={"cpus": "999"})),
        ("mount", lambda c: c["mounts"].append({"destination": "/mnt", "type": "nosuchfs", "source": "x"})),
        ("hook", lambda c: c.update(hooks={"createRuntime": [{"path": "/bin/false"}]})),
        ("container hook", lambda c: c.update(hooks={"createContainer": [{"path": "/bin/false"}]})),
        ("program", lambda c: c["process"].update(args=["/no/such/program"])),
        ("rlimit", lambda c: c["process"].update(rlimits=[{"type": "RLIMIT_NOFILE", "soft": 2**40,
                                                           "hard": 2**40}])),
        ("oom", lambda c: c["linux"]["resources"].update(memory={"limit": 1 << 16})),  # 1 MiB holds a lone init
        ("sysctl", lambda c: c["linux"].update(sysctl={"kernel.no_such_knob": "1"})),
    ]
    bundle_for = {name: bundles.make(["sleep", "60"], edit=edit) for name, edit in failing}
    warm_up(runtime, bundles.make(["true"]), prefix + "warm")
    stdio = _devnull_stdio()
    before = watch.snapshot()
    for round_ in range(4):
        for name, _ in failing:
            with pytest.raises(RuntimeFailure):
                runtime.create(f"{prefix}-{name.replace(' ', '')}-{round_}", str(bundle_for[name]), stdio=stdio)
            assert not (found := watch.problems(before)), f"after a failed create ({name}): {found}"
    os.close(stdio[0])
    watch.assert_clean(before)


def test_cli_cycles_leave_nothing(runtime: Runtime, runtime_root: str, bundles, watch: HostWatch, prefix: str,
                                  rootfs: Path, tmp_path: Path) -> None:
    """The same through the CLI, a separate process per verb, with exec and network attach. (`runtime`: its teardown
    deletes what a failed run leaves.)"""
    sleeper = bundles.make(["sleep", "60"])
    subnet = private_subnet(243)
    bridge = prefix + "br"
    process_json = tmp_path / "process.json"
    config = busybox_config(rootfs, ["sleep", "60"])
    process_json.write_text(json.dumps({**config["process"], "args": ["sleep", "60"]}))
    veths: set[str] = set()
    before = watch.snapshot()
    try:
        for i in range(12):
            cid = f"{prefix}-c{i}"
            coldbrew(runtime_root, "create", "--bundle", str(sleeper), cid)
            if i % 3 == 0:
                coldbrew(runtime_root, "delete", cid)
                continue
            coldbrew(runtime_root, "start", cid)
            coldbrew(runtime_root, "exec", "--detach", "--process", str(process_json), cid)
            if i % 3 == 1:
                out = coldbrew(runtime_root, "network", "attach", cid, "--bridge", bridge,
                               "--address", f"{subnet[2 + i]}/24", "--gateway", str(subnet[1])).stdout
                veths.add(json.loads(out)["host_ifname"])
                coldbrew(runtime_root, "delete", "--force", cid)
            else:
                coldbrew(runtime_root, "kill", "--all", cid, "KILL")
                deadline = time.monotonic() + 5
                while json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] != "stopped":
                    assert time.monotonic() < deadline, "the container did not stop"
                    reap_orphans()
                    time.sleep(0.01)
                coldbrew(runtime_root, "delete", cid)
        watch.extra_links |= veths | {bridge}
        assert len(veths) == 4
        watch.assert_clean(before, shim=True)
    finally:
        remove_links((veths | {bridge}) & links())


def test_wait_async_with_an_exec_running(runtime: Runtime, bundles, watch: HostWatch, prefix: str) -> None:
    """wait_async() returns when the init is killed while a process exec'd by us still runs in its pid namespace:
    the init cannot finish exiting before that process is reaped, and we are the one to reap it."""
    import asyncio

    bundle = bundles.make(["sleep", "60"])
    warm_up(runtime, bundle, prefix + "warm")
    stdio = _devnull_stdio()
    before = watch.snapshot()
    container = runtime.create(prefix + "-async", str(bundle), stdio=stdio)
    container.start()
    container.exec(Process.from_spec({"args": ["sleep", "60"], "env": ["PATH=/bin"]}), stdio=stdio)
    container.kill(signal.SIGKILL)
    assert asyncio.run(asyncio.wait_for(container.wait_async(), 10)) == 128 + signal.SIGKILL
    container.delete()
    os.close(stdio[0])
    watch.assert_clean(before)

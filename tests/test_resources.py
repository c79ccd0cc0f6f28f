"""A running container's resources: pause/resume, statistics, limits changed by `update` and enforced by the kernel,
network attachment through the CLI, and `ps`.

Every bridge and subnet here is private to its test (a bridge named after the test, 10.242.x.0/24).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from coldbrew.runtime.cgroups import open_cgroup
from coldbrew.runtime.container import Runtime
from coldbrew.runtime.errors import InvalidState
from conftest import COLDBREW, coldbrew
from test_leaks import HostWatch, links, private_subnet, remove_links, warm_up

MiB = 1 << 20


@pytest.fixture
def watch(cid: str, tmp_path: Path, rootfs: Path, runtime_root: str) -> HostWatch:
    return HostWatch(cid, (str(tmp_path), str(rootfs), runtime_root), runtime_root)


def limits(cid: str) -> dict[str, int | None]:
    """The memory and pids limits in the container's cgroup files (None: unlimited), on v1 or v2."""
    paths = open_cgroup(None, cid).paths
    if set(paths) == {"unified"}:
        memory_file, pids_file = (os.path.join(paths["unified"], name) for name in ("memory.max", "pids.max"))
    else:
        memory_file = os.path.join(paths["memory"], "memory.limit_in_bytes")
        pids_file = os.path.join(paths["pids"], "pids.max")
    values = {}
    for name, path in (("memory", memory_file), ("pids", pids_file)):
        text = Path(path).read_text().strip()
        # v1 spells "unlimited" as the largest page-aligned int64
        values[name] = None if text == "max" or int(text) >= 1 << 62 else int(text)
    return values


def cgroup_file(cid: str, v1_controller: str, name: str) -> str:
    paths = open_cgroup(None, cid).paths
    return Path(paths.get("unified") or paths[v1_controller], name).read_text()


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def with_resources(**resources):
    def edit(config: dict) -> None:
        config["linux"]["resources"].update(resources)

    return edit


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


# ---- pause / resume ----------------------------------------------------------------------------------------------

def test_pause_freezes_and_resume_thaws(runtime: Runtime, runtime_root: str, bundles, cid: str, tmp_path: Path,
                                        watch: HostWatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    counter = out / "count"

    def edit(config: dict) -> None:
        config["mounts"].append({"destination": "/out", "type": "bind", "source": str(out), "options": ["rbind"]})

    bundle = bundles.make(["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /out/count; done"], edit=edit)

    def count() -> int:
        return int(counter.read_text().strip() or 0) if counter.exists() else 0

    null = _devnull()
    warm_up(runtime, bundles.make(["true"]), cid + "-warm")
    before = watch.snapshot()
    container = runtime.create(cid, str(bundle), stdio=(null, null, null))
    container.start()
    wait_for(count, what="the counter to start")
    with pytest.raises(InvalidState):
        container.resume()
    container.pause()
    assert container.status == "paused" and container.state()["status"] == "paused"
    assert json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] == "paused"
    frozen = counter.read_text()
    time.sleep(0.3)
    assert counter.read_text() == frozen, "the counter advanced while paused"
    with pytest.raises(InvalidState):
        container.pause()
    with pytest.raises(InvalidState):
        container.exec(container.spec().process)
    container.resume()
    assert container.status == "running"
    stopped_at = int(frozen.strip() or 0)
    wait_for(lambda: count() > stopped_at + 100, what="the counter to advance after resume")

    # the same through the CLI, then delete --force of a paused container
    coldbrew(runtime_root, "pause", cid)
    assert json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] == "paused"
    frozen = counter.read_text()
    time.sleep(0.2)
    assert counter.read_text() == frozen
    refused = coldbrew(runtime_root, "pause", cid, check=False)
    assert refused.returncode == 1 and "paused" in refused.stderr
    coldbrew(runtime_root, "resume", cid)
    wait_for(lambda: count() > int(frozen.strip() or 0) + 100, what="the counter to advance after CLI resume")
    coldbrew(runtime_root, "pause", cid)
    started = time.monotonic()
    container.delete(force=True)
    assert time.monotonic() - started < 5
    os.close(null)
    watch.assert_clean(before)


# ---- statistics --------------------------------------------------------------------------------------------------

def test_events_stats_have_real_numbers(runtime: Runtime, runtime_root: str, bundles, cid: str,
                                        watch: HostWatch) -> None:
    script = "sleep 60 & i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo burnt; wait"
    bundle = bundles.make(["sh", "-c", script],
                          edit=with_resources(memory={"limit": 64 * MiB}, pids={"limit": 50}))
    before = watch.snapshot()
    coldbrew(runtime_root, "run", "--detach", "--bundle", str(bundle), cid)
    pids = wait_for(lambda: len(json.loads(coldbrew(runtime_root, "ps", "--format", "json", cid).stdout)) == 2,
                    what="sh and sleep")
    assert pids
    time.sleep(0.2)  # the loop burns some CPU time
    event = json.loads(coldbrew(runtime_root, "events", "--stats", cid).stdout)
    assert event["type"] == "stats" and event["id"] == cid
    data = event["data"]
    assert data["pids"] == {"current": 2, "limit": 50}
    memory = data["memory"]["usage"]
    assert memory["limit"] == 64 * MiB
    assert 0 < memory["usage"] <= 64 * MiB
    assert memory["usage"] <= memory["max"] <= 64 * MiB or memory["max"] == 0  # 0: a v2 kernel without memory.peak
    assert isinstance(data["memory"]["raw"], dict) and data["memory"]["raw"]
    usage = data["cpu"]["usage"]
    assert usage["total"] > 1_000_000  # nanoseconds: the loop ran for more than a millisecond
    if "percpu" in usage:  # cgroup v1 only
        assert usage["percpu"] and all(isinstance(v, int) and v >= 0 for v in usage["percpu"])
    assert usage["user"] + usage["kernel"] > 0
    assert set(data["cpu"]["throttling"]) == {"periods", "throttledPeriods", "throttledTime"}

    # a stream of the same, ending by itself once the container is gone
    stream = subprocess.Popen([COLDBREW, "--root", runtime_root, "events", "--interval", "100ms", cid],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        for _ in range(2):
            ready, _, _ = select.select([stream.stdout], [], [], 5)
            assert ready, "no event in 5 s"
            line = json.loads(stream.stdout.readline())
            assert line["type"] == "stats" and line["data"]["pids"]["current"] == 2
        coldbrew(runtime_root, "kill", "--all", cid, "KILL")
        assert stream.wait(timeout=5) == 0
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
        stream.stdout.close()
        stream.stderr.close()
    coldbrew(runtime_root, "delete", "--force", cid)
    watch.assert_clean(before, shim=True)


# ---- update ------------------------------------------------------------------------------------------------------

def test_update_changes_memory_and_pids_limits(runtime: Runtime, runtime_root: str, bundles, cid: str, tmp_path: Path,
                                               watch: HostWatch) -> None:
    bundle = bundles.make(["sleep", "60"], edit=with_resources(memory={"limit": 64 * MiB}, pids={"limit": 50}))
    before = watch.snapshot()
    coldbrew(runtime_root, "run", "--detach", "--bundle", str(bundle), cid)
    assert limits(cid) == {"memory": 64 * MiB, "pids": 50}

    coldbrew(runtime_root, "update", "--memory", str(96 * MiB), "--pids-limit", "30", cid)
    assert limits(cid) == {"memory": 96 * MiB, "pids": 30}

    resources = tmp_path / "resources.json"
    resources.write_text(json.dumps({"memory": {"limit": 48 * MiB}, "pids": {"limit": 20}}))
    coldbrew(runtime_root, "update", "-r", str(resources), cid)
    assert limits(cid) == {"memory": 48 * MiB, "pids": 20}

    coldbrew(runtime_root, "update", "--resources", "-", cid, input=json.dumps({"pids": {"limit": -1}}))
    assert limits(cid) == {"memory": 48 * MiB, "pids": None}
    stats = json.loads(coldbrew(runtime_root, "events", "--stats", cid).stdout)["data"]
    assert stats["memory"]["usage"]["limit"] == 48 * MiB and stats["pids"]["limit"] == 0

    # refusals change nothing and say what is wrong in one line
    resources.write_text(json.dumps({"memory": {"limit": "lots"}}))
    for args, expected in ((["--memory", "lots"], "--memory"), (["-r", str(resources)], "memory.limit"),
                           (["--pids-limit", "1.5"], "--pids-limit")):
        refused = coldbrew(runtime_root, "update", *args, cid, check=False)
        assert refused.returncode == 1 and expected in refused.stderr, refused
        assert len(refused.stderr.splitlines()) == 1 and refused.stderr.startswith("coldbrew: ")
    resources.write_text("{not json")
    refused = coldbrew(runtime_root, "update", "-r", str(resources), cid, check=False)
    assert refused.returncode == 1 and "JSON" in refused.stderr
    assert limits(cid) == {"memory": 48 * MiB, "pids": None}

    coldbrew(runtime_root, "kill", cid, "KILL")
    wait_for(lambda: json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] == "stopped",
             what="the container to stop")
    refused = coldbrew(runtime_root, "update", "--pids-limit", "10", cid, check=False)
    assert refused.returncode == 1 and "not running" in refused.stderr
    coldbrew(runtime_root, "delete", cid)
    watch.assert_clean(before, shim=True)


# ---- limits the kernel enforces ----------------------------------------------------------------------------------

def test_pids_limit_stops_fork(runtime: Runtime, bundles, cid: str, tmp_path: Path, watch: HostWatch) -> None:
    # The inner shell forks sleeps until the limit (5: the outer sh, the inner sh, three sleeps) refuses one;
    # then the outer shell becomes a sleep too: four processes stay.
    script = 'sh -c "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 60 & done"; echo inner=$?; exec sleep 60'
    bundle = bundles.make(["sh", "-c", script], edit=with_resources(pids={"limit": 5}))
    out = tmp_path / "out"
    null = _devnull()
    warm_up(runtime, bundles.make(["true"]), cid + "-warm")
    before = watch.snapshot()
    with open(out, "wb") as f:
        container = runtime.create(cid, str(bundle), stdio=(null, f.fileno(), f.fileno()))
    container.start()
    wait_for(lambda: "inner=" in out.read_text(), what="the inner shell to give up")
    text = out.read_text()
    assert "can't fork" in text and "inner=0" not in text, text
    wait_for(lambda: len(container.processes()) == 4, what="the sleeps")
    assert container.stats()["pids"] == {"current": 4, "limit": 5}
    if "unified" not in open_cgroup(None, cid).paths:
        assert int(cgroup_file(cid, "pids", "pids.events").split()[-1]) > 0  # "max N": refused forks
    container.kill(signal.SIGKILL)
    assert container.wait() == 128 + signal.SIGKILL
    container.delete()
    os.close(null)
    watch.assert_clean(before)


def test_memory_limit_kills_what_goes_over(runtime: Runtime, bundles, cid: str, tmp_path: Path,
                                           watch: HostWatch) -> None:
    # dd's 64 MiB buffer cannot fit in 32 MiB (and no swap: memory+swap is 32 MiB too)
    limit = {"memory": {"limit": 32 * MiB, "swap": 32 * MiB}}
    script = "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo dd=$?"
    out = tmp_path / "out"
    null = _devnull()
    warm_up(runtime, bundles.make(["true"]), cid + "-warm")
    before = watch.snapshot()
    with open(out, "wb") as f:
        container = runtime.create(cid, str(bundles.make(["sh", "-c", script], edit=with_resources(**limit))),
                                   stdio=(null, f.fileno(), f.fileno()))
    container.start()
    assert container.wait() == 0
    assert out.read_text().strip() == f"dd={128 + signal.SIGKILL}"
    if "unified" in open_cgroup(None, cid).paths:
        events = cgroup_file(cid, "memory", "memory.events")
    else:
        events = cgroup_file(cid, "memory", "memory.oom_control")
    assert int(dict(line.split() for line in events.splitlines())["oom_kill"]) >= 1
    container.delete()

    # the init itself over the limit: the container's exit status says SIGKILL
    with open(out, "wb") as f:
        container = runtime.create(cid, str(bundles.make(["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                                                         edit=with_resources(**limit))),
                                   stdio=(null, f.fileno(), f.fileno()))
    container.start()
    assert container.wait() == 128 + signal.SIGKILL
    container.delete()
    os.close(null)
    watch.assert_clean(before)


# ---- network -----------------------------------------------------------------------------------------------------

def test_cli_network_attach(runtime: Runtime, runtime_root: str, bundles, cid: str, watch: HostWatch) -> None:
    bridge = f"cbr{uuid.uuid4().hex[:8]}"
    subnet = private_subnet(242)
    address, gateway = f"{subnet[2]}/24", str(subnet[1])
    bundle = bundles.make(["sleep", "60"])
    made: set[str] = {bridge}
    before = watch.snapshot()
    try:
        coldbrew(runtime_root, "run", "--detach", "--bundle", str(bundle), cid)
        attached = json.loads(coldbrew(runtime_root, "network", "attach", cid, "--bridge", bridge,
                                       "--address", address, "--gateway", gateway).stdout)
        made.add(attached["host_ifname"])
        assert attached["bridge"] == bridge and attached["ifname"] == "eth0" and attached["address"] == address
        assert {bridge, attached["host_ifname"]} <= links()
        master = os.path.realpath(f"/sys/class/net/{attached['host_ifname']}/master")
        assert os.path.basename(master) == bridge

        shown = coldbrew(runtime_root, "exec", cid, "ip", "-4", "addr", "show", "eth0").stdout
        assert f"inet {address}" in shown and "UP" in shown, shown
        routes = coldbrew(runtime_root, "exec", cid, "ip", "route").stdout
        assert f"default via {gateway} dev eth0" in routes, routes

        # the container reaches the host on the bridge
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        received: list[bytes] = []
        try:
            server.bind((gateway, 0))
            server.listen(1)
            server.settimeout(10)

            def accept() -> None:
                conn, _ = server.accept()
                with conn:
                    received.append(conn.recv(100))

            thread = threading.Thread(target=accept)
            thread.start()
            coldbrew(runtime_root, "exec", cid, "sh", "-c",
                     f"echo hello-from-{cid} | nc -w 2 {gateway} {server.getsockname()[1]}")
            thread.join(10)
        finally:
            server.close()
        assert received and received[0].strip() == f"hello-from-{cid}".encode()

        refused = coldbrew(runtime_root, "network", "attach", cid, "--bridge", bridge, "--address", "10.242.0.0/24",
                           check=False)
        assert refused.returncode == 1 and refused.stderr.startswith("coldbrew: address: "), refused

        coldbrew(runtime_root, "delete", "--force", cid)
        assert not made & links(), "delete left the veth or the bridge"
        watch.extra_links |= made
        watch.assert_clean(before, shim=True)
    finally:
        remove_links(made & links())


# ---- ps ----------------------------------------------------------------------------------------------------------

def test_ps_table_lists_the_containers_processes(runtime: Runtime, runtime_root: str, bundles, cid: str,
                                                 watch: HostWatch) -> None:
    bundle = bundles.make(["sh", "-c", "sleep 60 & sleep 61 & wait"])
    before = watch.snapshot()
    coldbrew(runtime_root, "run", "--detach", "--bundle", str(bundle), cid)
    def listed() -> list[int] | None:
        found = json.loads(coldbrew(runtime_root, "ps", "--format", "json", cid).stdout)
        return found if len(found) == 3 else None

    pids = wait_for(listed, what="three processes")
    assert pids == sorted(pids)

    table = coldbrew(runtime_root, "ps", cid).stdout.splitlines()
    header = table[0].split()
    assert "PID" in header and "CMD" in header
    column = header.index("PID")
    assert sorted(int(line.split()[column]) for line in table[1:]) == pids
    assert sorted(line.split()[-2:] for line in table[1:] if "-c" not in line) == [["sleep", "60"], ["sleep", "61"]]

    custom = coldbrew(runtime_root, "ps", cid, "-o", "pid,comm").stdout.splitlines()
    assert custom[0].split() == ["PID", "COMMAND"]
    rows = {int(pid): comm for pid, comm in (line.split() for line in custom[1:])}
    assert sorted(rows) == pids and sorted(rows.values()) == ["sh", "sleep", "sleep"]

    coldbrew(runtime_root, "pause", cid)  # a frozen container can be listed too
    assert len(coldbrew(runtime_root, "ps", cid).stdout.splitlines()) == 4
    coldbrew(runtime_root, "delete", "--force", cid)
    missing = coldbrew(runtime_root, "ps", cid, check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    watch.assert_clean(before, shim=True)

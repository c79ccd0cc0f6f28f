"""Checkpoint and restore of coldbrew containers with a real CRIU (>= 4; skipped, saying why, without one).

The main subject is a Python server in a container: a random token and 4 MiB of random bytes in memory, a counter,
an open file on the container's tmpfs it appends every count to, and a listening TCP socket that answers queries.
A query (an `exec` into the container) tells whether all of that is still consistent: same token, the memory's
digest unchanged, the file holding exactly the lines 1..count.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from coldbrew.runtime.errors import InvalidState
from coldbrew.runtime.features import default_spec
from coldbrew.runtime.spec import Process
from coldbrew.snapshot import CriuError, CriuNotFound, SnapshotError, find_criu, restore, snapshot
from coldbrew.snapshot import filepages, rpc
from conftest import COLDBREW, coldbrew
from test_filepages import PAGE, TOUCHED, UNTOUCHED, data_file, evicted, resident, wait_cached
from test_leaks import HostWatch


def _criu_or_reason():
    try:
        return find_criu(), ""
    except CriuNotFound as e:
        return None, str(e)


CRIU, CRIU_MISSING = _criu_or_reason()
needs_criu = pytest.mark.skipif(CRIU is None, reason=f"no CRIU >= 4 here (run scripts/setup-criu): {CRIU_MISSING}")

SERVER = r"""
import hashlib, os, select, socket
token = os.urandom(8).hex()
blob = bytearray(os.urandom(4 << 20))
digest = hashlib.sha256(blob).hexdigest()
count = 0
log = open("/tmp/log", "a+")
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 7777))
server.listen(8)
while True:
    count += 1
    log.write(f"{count}\n")
    log.flush()
    if select.select([server], [], [], 0.005)[0]:
        conn, _ = server.accept()
        log.seek(0)
        consecutive = log.read().split() == [str(i) for i in range(1, count + 1)]
        intact = hashlib.sha256(blob).hexdigest() == digest
        conn.sendall(f"{token} {count} {consecutive} {intact}\n".encode())
        conn.close()
"""
CLIENT = "import socket; print(socket.create_connection(('127.0.0.1', 7777)).makefile().readline(), end='')"
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def python_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root filesystem whose /usr is the host's (bound read-only by the bundle): the host's Python runs in it."""
    if not os.path.exists(PYTHON):
        pytest.skip(f"{PYTHON} is missing (Debian's python3)")
    root = tmp_path_factory.mktemp("pyroot")
    root.chmod(0o755)
    for name in ("proc", "sys", "dev", "tmp", "usr", "app"):
        (root / name).mkdir()
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{name}"):
            (root / name).symlink_to(os.readlink(f"/{name}"))
        elif os.path.isdir(f"/{name}"):
            (root / name).mkdir()  # not usr-merged: the bundle binds it too
    return root


def python_bundle(base: Path, rootfs: Path, script: str) -> Path:
    """A bundle running `script` with the host's Python: /usr bound read-only, the script in a bound /app, a tmpfs
    /tmp, a read-only root, the default namespaces (pid, network, ipc, uts, mount, cgroup)."""
    bundle = base / f"bundle-{uuid.uuid4().hex[:8]}"
    app = bundle / "app"
    app.mkdir(parents=True)
    (app / "main.py").write_text(script)
    config = default_spec()
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = [PYTHON, "-u", "/app/main.py"]
    config["mounts"] += [
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        {"destination": "/app", "type": "bind", "source": str(app), "options": ["rbind", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=65536k"]},
    ]
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}"):
            config["mounts"].append({"destination": f"/{name}", "type": "bind", "source": f"/{name}",
                                     "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


class Stdio:
    """The container's stdio: /dev/null in, a pipe out, as a shim gives it (CRIU reconnects pipes at restore)."""

    def __init__(self) -> None:
        self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.read, self.write = os.pipe2(os.O_CLOEXEC)

    @property
    def fds(self) -> tuple[int, int, int]:
        return (self.null, self.write, self.write)

    def close(self) -> None:
        for fd in (self.null, self.read, self.write):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def stdio():
    made: list[Stdio] = []

    def make() -> Stdio:
        made.append(Stdio())
        return made[-1]

    yield make
    for s in made:
        s.close()


def query(container, timeout: float = 10.0) -> tuple[str, int, bool, bool]:
    """(token, count, file consistent, memory intact) from the server, through an exec into the container."""
    raw = dict(container.spec().raw["process"])
    raw["args"] = [PYTHON, "-c", CLIENT]
    read, write = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            proc = container.exec(Process.from_spec(raw, "process"), stdio=(null, write, write))
            code = proc.wait()
            os.set_blocking(read, False)
            try:
                out = os.read(read, 4096).decode()
            except BlockingIOError:
                out = ""
            if code == 0 and out.count(" ") == 3:
                token, count, consecutive, intact = out.split()
                return token, int(count), consecutive == "True", intact == "True"
            if time.monotonic() >= deadline:  # the server may still be starting
                pytest.fail(f"no answer from the server in the container (exit {code}): {out}")
            time.sleep(0.05)
    finally:
        for fd in (read, write, null):
            os.close(fd)


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.01)


def read_counter(stdio: Stdio, timeout: float = 5.0) -> int:
    """The last number a busybox counter wrote to its stdout pipe, waiting for one."""
    deadline = time.monotonic() + timeout
    os.set_blocking(stdio.read, False)
    while time.monotonic() < deadline:
        try:
            numbers = os.read(stdio.read, 65536).split()
        except BlockingIOError:
            numbers = []
        if numbers:
            return int(numbers[-1])
        time.sleep(0.02)
    pytest.fail("the counter wrote nothing")


COUNTER = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.02; done"]


@pytest.fixture
def watch(tmp_path: Path, rootfs: Path, runtime_root: str, cid: str) -> HostWatch:
    return HostWatch(cid, (str(tmp_path), str(rootfs), runtime_root), runtime_root)


def no_scratch_left() -> list[str]:
    import tempfile

    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("coldbrew-restore-")]


# ---- the Python program ----------------------------------------------------------------------------------------

@needs_criu
def test_python_state_survives_checkpoint_kill_restore(runtime, cid, tmp_path, python_rootfs, stdio, watch):
    before = watch.snapshot()
    scratch_before = set(no_scratch_left())
    bundle = python_bundle(tmp_path, python_rootfs, SERVER)
    io = stdio()
    container = runtime.create(cid, str(bundle), stdio=io.fds)
    container.start()
    token, count, consecutive, intact = query(container)
    assert consecutive and intact
    old_pid = container.pid
    old_net = os.stat(f"/proc/{old_pid}/ns/net").st_ino

    snap = snapshot(container, str(tmp_path / "images"))
    # checkpoint without --leave-running ends the container, as runc's does: process, state and cgroup are gone
    wait_gone(old_pid)
    assert runtime.list() == [] and snap.kind == "dump" and snap.container_id == cid
    assert not Path(f"/sys/fs/cgroup/memory/coldbrew/{cid}").exists()
    assert snap.size > 4 << 20  # the random bytes are in there

    restored = restore(runtime, snap.path, cid, stdio=io.fds)
    assert restored.status == "running" and runtime.get(cid).pid == restored.pid != old_pid
    again_token, again_count, consecutive, intact = query(restored)
    assert again_token == token  # the same process memory, not a fresh start
    assert again_count > count and consecutive and intact  # counter, open file (offset, content) and memory
    # back in namespaces of its own (a new network namespace; the listening socket answered in it), in its cgroup,
    # on its root filesystem, read-only as the bundle says
    pid = restored.pid
    assert os.stat(f"/proc/{pid}/ns/net").st_ino not in (old_net, os.stat("/proc/self/ns/net").st_ino)
    assert os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    with open(f"/proc/{pid}/status") as f:
        assert [line.split()[-1] for line in f if line.startswith("NSpid:")] == ["1"]
    with open(f"/proc/{pid}/cgroup") as f:
        assert all(line.rstrip().endswith(f"/coldbrew/{cid}") for line in f if not line.startswith("0::"))
    assert os.path.samefile(f"/proc/{pid}/root/app/main.py", bundle / "app" / "main.py")
    with open(f"/proc/{pid}/mountinfo") as f:
        root_mount = next(line.split() for line in f if line.split()[4] == "/")
    assert "ro" in root_mount[5].split(",")
    assert restored.processes() == [pid]

    restored.kill("KILL")
    assert restored.wait() == 128 + signal.SIGKILL
    restored.delete()
    watch.assert_clean(before, fds=False)
    assert set(no_scratch_left()) <= scratch_before


@needs_criu
def test_restore_twice_from_one_snapshot(runtime, cid, tmp_path, python_rootfs, stdio, watch):
    before = watch.snapshot()
    bundle = python_bundle(tmp_path, python_rootfs, SERVER)
    io = stdio()
    container = runtime.create(cid, str(bundle), stdio=io.fds)
    container.start()
    token, count, _, _ = query(container)
    snap = snapshot(container, str(tmp_path / "images"))

    first = restore(runtime, snap, f"{cid}-a", stdio=io.fds)
    second = restore(runtime, snap.path, f"{cid}-b", stdio=io.fds)
    assert first.pid != second.pid
    answers = [query(c) for c in (first, second)]
    assert all(a[0] == token and a[1] > count and a[2] and a[3] for a in answers)
    # two containers, each with its own tmpfs copy of the open file and its own network namespace
    first.kill("KILL")
    first.wait()
    assert second.status == "running" and query(second)[0] == token
    for c in (first, second):
        c.delete(force=True)
    watch.assert_clean(before, fds=False)


# ---- busybox counters ------------------------------------------------------------------------------------------

@needs_criu
def test_leave_running(runtime, bundles, cid, tmp_path, stdio, watch):
    before = watch.snapshot()
    io = stdio()
    container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=io.fds)
    container.start()
    read_counter(io)
    snap = snapshot(container, str(tmp_path / "images"), leave_running=True)
    assert container.status == "running" and runtime.get(cid).pid == container.pid
    at_dump = read_counter(io)
    time.sleep(0.2)
    assert read_counter(io) > at_dump  # still counting

    copy_io = stdio()
    copy = restore(runtime, snap, f"{cid}-copy", stdio=copy_io.fds)
    resumed = read_counter(copy_io)
    assert 0 < resumed <= at_dump + 50  # from where the dump was, not from 1 or from the original's count now
    assert container.status == copy.status == "running"
    for c in (container, copy):
        c.delete(force=True)
    watch.assert_clean(before, fds=False)


MAPPER = """
import mmap, time
with open("/app/data.bin", "rb") as f:
    data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
data[40 * 4096], data[3000 * 4096]
print("mapped", flush=True)
while True:
    time.sleep(1)
"""


@needs_criu
def test_restore_reads_ahead_the_file_pages_the_processes_had_mapped(runtime, cid, tmp_path, python_rootfs, stdio,
                                                                   watch):
    before = watch.snapshot()
    bundle = python_bundle(tmp_path, python_rootfs, MAPPER)
    data = data_file(bundle / "app" / "data.bin")
    io = stdio()
    container = runtime.create(cid, str(bundle), stdio=io.fds)
    container.start()
    os.set_blocking(io.read, True)
    assert os.read(io.read, 100) == b"mapped\n"
    snap = snapshot(container, str(tmp_path / "images"))

    document = json.loads((Path(snap.path) / filepages.FILE_PAGES).read_text())
    assert document["format"] == filepages.FORMAT and document["page_size"] == PAGE
    pages = {first + i for first, count in document["files"]["/app/data.bin"] for i in range(count)}
    assert set(TOUCHED) <= pages and not pages & set(UNTOUCHED)  # what the program touched (and mapped with it)
    interpreter = os.path.realpath(PYTHON)  # the container's /usr is the host's
    assert document["files"][interpreter]
    assert filepages.FILE_PAGES in snap.record["files"]  # checked with the rest of the snapshot

    evicted(data)
    restored = restore(runtime, snap.path, cid, stdio=io.fds)
    wait_cached(data, TOUCHED)  # the program is asleep: only the read-ahead brings them in
    assert not resident(data) & set(UNTOUCHED)
    restored.kill("KILL")
    restored.wait()
    restored.delete()
    watch.assert_clean(before, fds=False)


def recorded_network_lock(images: Path) -> str:
    """The network lock CRIU used for a dump, as its inventory records it (its restores follow the same)."""
    data = (images / "inventory.img").read_bytes()
    # one magic number (the inventory is a service image: no common magic before it), then one length-prefixed entry
    length = int.from_bytes(data[4:8], "little")
    assert len(data) == 8 + length, "inventory.img is not one entry after one magic number"
    entry = rpc.decode({"network_lock_method": (11, "int")}, data[8:])
    return ("iptables", "nftables", "skip")[entry.get("network_lock_method", 0)]


@needs_criu
def test_network_lock_is_skipped_only_where_nothing_outside_can_send(runtime, bundles, cid, tmp_path, stdio,
                                                                    watch):
    before = watch.snapshot()
    container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=stdio().fds)
    container.start()
    # only loopback: no lock, so no iptables-restore at the dump or at any restore of it
    snapshot(container, str(tmp_path / "loopback"), leave_running=True)
    assert recorded_network_lock(tmp_path / "loopback") == "skip"
    # established TCP connections are dumped: CRIU's lock keeps them quiet
    snapshot(container, str(tmp_path / "tcp"), leave_running=True, tcp_established=True)
    assert recorded_network_lock(tmp_path / "tcp") == "iptables"
    # a namespace joined by path may hold other containers, which go on running during the dump: locked
    def join(config: dict) -> None:
        for ns in config["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = f"/proc/{container.pid}/ns/net"

    neighbour = runtime.create(f"{cid}-nb", str(bundles.make(COUNTER, edit=join)), stdio=stdio().fds)
    neighbour.start()
    snapshot(neighbour, str(tmp_path / "joined"), leave_running=True)
    assert recorded_network_lock(tmp_path / "joined") == "iptables"
    # a second interface could carry packets in from outside: locked
    subprocess.run(["nsenter", "-t", str(container.pid), "-n", "ip", "link", "add", "cbtest0", "type", "veth",
                    "peer", "name", "cbtest1"], check=True)
    snapshot(container, str(tmp_path / "veth"), leave_running=True)
    assert recorded_network_lock(tmp_path / "veth") == "iptables"

    copy = restore(runtime, str(tmp_path / "loopback"), f"{cid}-copy", stdio=stdio().fds)
    assert copy.status == "running"
    for c in (container, neighbour, copy):
        c.delete(force=True)
    watch.assert_clean(before, fds=False)


@needs_criu
def test_pre_dump_then_dump(runtime, bundles, cid, tmp_path, stdio, watch):
    before = watch.snapshot()
    io = stdio()
    container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=io.fds)
    container.start()
    read_counter(io)
    pre = snapshot(container, str(tmp_path / "pre"), pre_dump=True)
    assert pre.kind == "pre-dump" and container.status == "running"
    assert pre.record["incremental"] == CRIU.features()["mem_track"]
    with pytest.raises(SnapshotError, match="pre-dump"):
        restore(runtime, pre, f"{cid}-pre", stdio=io.fds)
    counted = read_counter(io)

    final = snapshot(container, str(tmp_path / "final"), parent_path="../pre")
    if CRIU.features()["mem_track"]:  # only the pages written since the pre-dump, the rest through the link
        assert os.readlink(tmp_path / "final" / "parent") == "../pre"
        assert final.parent is not None and final.parent.path == pre.path and final.size < pre.size
    else:  # without dirty-memory tracking the final dump is complete in itself
        assert final.parent is None and not final.record["incremental"]
        assert not os.path.lexists(tmp_path / "final" / "parent")
    assert runtime.list() == []
    io2 = stdio()
    restored = restore(runtime, final.path, cid, stdio=io2.fds)
    assert read_counter(io2) > counted
    restored.delete(force=True)
    watch.assert_clean(before, fds=False)


# ---- refusals and failures ---------------------------------------------------------------------------------------

@needs_criu
def test_corrupt_snapshot_is_refused(runtime, bundles, cid, tmp_path, stdio, watch):
    io = stdio()
    container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=io.fds)
    container.start()
    read_counter(io)
    good = snapshot(container, str(tmp_path / "good"))
    before = watch.snapshot()

    def variant(name: str, damage) -> str:
        path = tmp_path / name
        shutil.copytree(good.path, path, symlinks=True)
        damage(path)
        return str(path)

    def flip_a_byte(path: Path) -> None:
        pages = max(path.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        with open(pages, "r+b") as f:
            f.seek(pages.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

    cases = {
        "flipped": (flip_a_byte, "pages-.*does not have the content"),
        "truncated": (lambda p: os.truncate(p / "pstree.img", 1), "pstree.img has 1 bytes"),
        "missing": (lambda p: os.unlink(p / "inventory.img"), "inventory.img is missing"),
        "unrecorded": (lambda p: os.unlink(p / "coldbrew-snapshot.json"), "not a coldbrew snapshot"),
        "garbled": (lambda p: (p / "coldbrew-snapshot.json").write_text("{"), "coldbrew-snapshot.json is corrupt"),
    }
    for name, (damage, message) in cases.items():
        with pytest.raises(SnapshotError, match=message):
            restore(runtime, variant(name, damage), f"{cid}-{name}", stdio=io.fds)
    with pytest.raises(SnapshotError, match="does not exist"):
        restore(runtime, str(tmp_path / "nowhere"), f"{cid}-x", stdio=io.fds)
    watch.assert_clean(before, fds=False)  # refused before anything was made for the container

    restored = restore(runtime, good, cid, stdio=io.fds)  # the untouched one still restores
    restored.delete(force=True)


@needs_criu
def test_failed_checkpoint_leaves_the_container_running(runtime, bundles, cid, tmp_path, stdio, watch):
    """A stdout connected to a unix socket outside the container: CRIU refuses to dump it (without
    --ext-unix-sk) after it froze the container, which must come back running and untouched."""
    before = watch.snapshot()
    ours, theirs = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=(null, theirs.fileno(), theirs.fileno()))
        theirs.close()
        container.start()
        ours.settimeout(5)
        assert ours.recv(64)
        with pytest.raises(CriuError, match="(?s)criu dump failed.*Error"):
            snapshot(container, str(tmp_path / "images"))
        assert container.status == "running"
        ours.recv(65536)
        time.sleep(0.1)
        assert ours.recv(64)  # still counting, not frozen
        with pytest.raises(SnapshotError, match="not a coldbrew snapshot"):
            restore(runtime, str(tmp_path / "images"), f"{cid}-r")
        container.delete(force=True)
    finally:
        ours.close()
        os.close(null)
    watch.assert_clean(before, fds=False)


@needs_criu
def test_checkpoint_needs_a_running_container_and_an_empty_directory(runtime, bundles, cid, tmp_path):
    container = runtime.create(cid, str(bundles.make(["sleep", "60"])))
    with pytest.raises(InvalidState, match="created, not running"):
        snapshot(container, str(tmp_path / "images"))
    container.start()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(SnapshotError, match="not empty"):
        snapshot(container, str(tmp_path / "full"))
    with pytest.raises(SnapshotError, match="parent path"):
        snapshot(container, str(tmp_path / "images"), parent_path="../none")
    snapshot(container, str(tmp_path / "full-copy"), leave_running=True)
    with pytest.raises(SnapshotError, match="not a pre-dump"):
        snapshot(container, str(tmp_path / "images"), parent_path="../full-copy")
    assert container.status == "running"
    container.delete(force=True)


@needs_criu
def test_restore_refuses_stdio_of_another_kind(runtime, bundles, cid, tmp_path):
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=(null.fileno(), f.fileno(), f.fileno()))
    container.start()
    time.sleep(0.1)
    snap = snapshot(container, str(tmp_path / "images"))
    read, write = os.pipe()
    try:
        with pytest.raises(SnapshotError, match="stdout was a regular file.*given for the restore is a pipe"):
            restore(runtime, snap, cid, stdio=(0, write, write))
    finally:
        os.close(read)
        os.close(write)
    with open(tmp_path / "other", "wb") as f, open(os.devnull, "rb") as null:
        with pytest.raises(SnapshotError, match="regular file of [0-9]+ bytes.*has 0"):
            restore(runtime, snap, cid, stdio=(null.fileno(), f.fileno(), f.fileno()))
    with open(out, "ab") as f, open(os.devnull, "rb") as null:  # the same file, as it was: that restores
        restored = restore(runtime, snap, cid, stdio=(null.fileno(), f.fileno(), f.fileno()))
    size = out.stat().st_size
    time.sleep(0.2)
    assert out.stat().st_size > size
    restored.delete(force=True)
    assert runtime.list() == []


# ---- the command line ----------------------------------------------------------------------------------------------

@needs_criu
def test_cli_checkpoint_restore_state_kill_delete(runtime_root, bundles, cid, tmp_path, watch):
    before = watch.snapshot()
    bundle = bundles.make(COUNTER)
    out = tmp_path / "out"
    out.write_bytes(b"")
    with open(out, "ab") as f:
        subprocess.run([COLDBREW, "--root", runtime_root, "run", "-d", "-b", str(bundle),
                        cid], stdin=subprocess.DEVNULL, stdout=f, stderr=f, check=True)
    time.sleep(0.2)
    images = tmp_path / "images"
    coldbrew(runtime_root, "checkpoint", "--image-path", str(images), "--work-path", str(tmp_path / "work"), cid)
    assert (tmp_path / "work" / "dump.log").exists() and (images / "coldbrew-snapshot.json").exists()
    assert json.loads(coldbrew(runtime_root, "list", "--format", "json").stdout) == []
    size = out.stat().st_size
    with open(out, "ab") as f:
        result = subprocess.run([COLDBREW, "--root", runtime_root, "restore", "-d",
                                 "--image-path", str(images), "--bundle", str(bundle), "--pid-file",
                                 str(tmp_path / "pid"), "-no-subreaper", cid],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    assert result.returncode == 0, out.read_text()[size:]
    state = json.loads(coldbrew(runtime_root, "state", cid).stdout)
    assert state["status"] == "running" and state["pid"] == int((tmp_path / "pid").read_text())
    time.sleep(0.2)
    numbers = out.read_bytes()[size:].split()
    assert numbers and int(numbers[0]) > 1  # went on counting from where it was
    coldbrew(runtime_root, "kill", cid, "KILL")
    deadline = time.monotonic() + 5
    while json.loads(coldbrew(runtime_root, "state", cid).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    coldbrew(runtime_root, "delete", cid)
    watch.assert_clean(before, fds=False, shim=True)


def test_cli_checkpoint_help_and_refused_flags(runtime_root, cid):
    # podman takes `checkpoint --help` exiting 0 to mean the runtime can checkpoint
    assert "--leave-running" in coldbrew(runtime_root, "checkpoint", "--help").stdout
    assert "--console-socket" in coldbrew(runtime_root, "restore", "--help").stdout
    result = coldbrew(runtime_root, "checkpoint", "--lazy-pages", cid, check=False)
    assert result.returncode == 1 and "--lazy-pages is not supported" in result.stderr
    result = coldbrew(runtime_root, "checkpoint", "--manage-cgroups-mode", "sometimes", cid, check=False)
    assert result.returncode == 1 and "--manage-cgroups-mode 'sometimes'" in result.stderr
    result = coldbrew(runtime_root, "restore", "--image-path", "/nonexistent", cid, check=False)
    assert result.returncode == 1 and "snapshot /nonexistent does not exist" in result.stderr


# ---- finding CRIU, the RPC codec ---------------------------------------------------------------------------------

def test_find_criu_refuses_missing_and_old(tmp_path, monkeypatch):
    with pytest.raises(CriuNotFound, match="cannot run /nonexistent/criu"):
        find_criu("/nonexistent/criu")
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    with pytest.raises(CriuNotFound, match=r"criu 3\.17\.1 at .* is too old.*CRIU >= 4\.0"):
        find_criu(str(old))
    monkeypatch.setenv("COLDBREW_CRIU", str(old))
    with pytest.raises(CriuNotFound, match="from COLDBREW_CRIU"):
        find_criu()
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\necho 'no version here'\nexit 3\n")
    silent.chmod(0o755)
    with pytest.raises(CriuNotFound, match="exited 3 without a version"):
        find_criu(str(silent))


@needs_criu
def test_found_criu_is_new_enough():
    assert CRIU.version >= (4, 0, 0)
    assert set(CRIU.features()) >= {"mem_track", "lazy_pages"}


_ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_text = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "images_dir_fd": _ints, "pid": _ints, "leave_running": st.booleans(), "log_file": _text, "root": _text,
    "ext_mnt": st.lists(st.fixed_dictionaries({"key": _text, "val": _text}), max_size=4),
    "external": st.lists(_text, max_size=4), "manage_cgroups_mode": st.integers(0, 6),
}))
def test_rpc_encoding_round_trips(opts):
    request = {"type": rpc.DUMP, "opts": opts}
    sent = {"type": rpc.DUMP, "opts": {k: v for k, v in opts.items() if v != []}}  # an empty list sends nothing
    assert rpc.decode(rpc.REQUEST, rpc.encode(rpc.REQUEST, request)) == sent


def test_rpc_decodes_a_response_and_skips_unknown_fields():
    notify = rpc.encode(rpc.RESPONSE["notify"][1], {"script": "post-restore", "pid": 42})
    data = rpc.encode(rpc.RESPONSE, {"type": rpc.NOTIFY, "success": True}) + bytes([0xF8, 0x07, 0x01])  # field 127
    data += rpc._varint(5 << 3 | 2) + rpc._varint(len(notify)) + notify
    assert rpc.decode(rpc.RESPONSE, data) == {"type": rpc.NOTIFY, "success": True,
                                              "notify": {"script": "post-restore", "pid": 42}}
    with pytest.raises(rpc.DecodeError):
        rpc.decode(rpc.RESPONSE, data[:-3])


@needs_criu
def test_restore_that_fails_half_way_leaves_nothing(runtime, bundles, cid, tmp_path, stdio, watch):
    """A pids limit of 2 in the bundle restored into: CRIU (which runs in the container's cgroup) makes the init,
    cannot fork its child, and gives up; the tasks it made and killed are ours to reap."""
    io = stdio()
    container = runtime.create(cid, str(bundles.make(COUNTER)), stdio=io.fds)
    container.start()
    read_counter(io)
    snap = snapshot(container, str(tmp_path / "images"))
    before = watch.snapshot()
    tight = bundles.make(COUNTER, edit=lambda c: c["linux"]["resources"].update(pids={"limit": 2}))
    with pytest.raises(CriuError, match="criu restore failed"):
        restore(runtime, snap, cid, str(tight), stdio=io.fds)
    watch.assert_clean(before, fds=False)
    assert runtime.list() == []

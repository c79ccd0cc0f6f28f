"""Real container engines drive coldbrew as their runc: containerd (ctr and containerd-shim-runc-v2) and podman
(conmon). Each engine runs privately (its own root, state, socket, cgroup parent) and every trace of it (processes,
mounts, cgroups, state, paths it makes on the host) is removed at teardown, and a leak fails the run."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from coldbrew.runtime.container import DEFAULT_ROOT
from conftest import COLDBREW, HostPaths, coldbrew, run_through_files

IMAGE = "localhost/coldbrew-busybox:test"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
# pid 1 of a pid namespace ignores signals it has no handler for: trap TERM so that a plain kill stops it.
TRAPPING = "trap 'exit 3' TERM; echo ready; while true; do sleep 0.1; done"

needs_containerd = pytest.mark.skipif(not (shutil.which("containerd") and shutil.which("ctr")),
                                      reason="containerd and ctr are not installed (scripts/setup installs them)")
needs_podman = pytest.mark.skipif(not shutil.which("podman"),
                                  reason="podman is not installed (scripts/setup installs it)")


# ---- plumbing ------------------------------------------------------------------------------------------------------

def _run(cmd: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a client command; output through files, since daemons it starts (shims, conmon) may inherit pipes."""
    result = run_through_files(cmd, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def _run_in_pty(cmd: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run a client whose stdio is a terminal (what `-t` needs); its exit status and everything it wrote."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave descriptor is closed
                    chunk = b""
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, output.decode(errors="replace")


def _wait_for(predicate, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (our private socket or directory): what an engine left running."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def _still_running(*texts: str, grace: float = 10) -> list[int]:
    """Processes mentioning any of `texts` that are still there after `grace` seconds (an engine's helpers, such as
    a shim or conmon's exit command, finish a moment after the command that ended them)."""
    deadline = time.monotonic() + grace
    while True:
        pids = sorted({pid for text in texts for pid in _pids_mentioning(text)})
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _unmount_under(base: Path) -> list[str]:
    """Unmount (lazily, deepest first) everything mounted at or below `base`; the mount points found."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point == str(base) or point.startswith(str(base) + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL, check=False)
    return points


def _cgroup_dirs(name: str) -> list[Path]:
    """`/NAME` in every mounted cgroup hierarchy (v1 controllers, a named hierarchy, cgroup2) where it exists."""
    roots = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-", 6) + 1]
            if fstype in ("cgroup", "cgroup2"):
                roots.add(fields[4])
    return [Path(root) / name.strip("/") for root in sorted(roots) if (Path(root) / name.strip("/")).is_dir()]


def _remove_cgroup_tree(path: Path) -> list[int]:
    """Kill whatever is still in the cgroup tree at `path`, then remove the tree; the pids that were left in it."""
    dirs = sorted((p for p in [path, *path.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    left = [int(pid) for d in dirs for pid in (d / "cgroup.procs").read_text().split()]
    _kill_pids(left)
    for d in dirs:
        # a killed process leaves its cgroup a moment after the signal
        _wait_for(lambda d=d: _rmdir_quietly(d), f"removing cgroup {d}")
    return left


def _rmdir_quietly(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return False
    return True


def _docker_archive(rootfs: Path, dest: Path) -> Path:
    """A one-layer docker-archive (manifest.json, config, layer tar) of `rootfs`, as `docker save` writes."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False)
    layer_bytes = layer.getvalue()
    config = json.dumps({
        "architecture": GOARCH.get(os.uname().machine, os.uname().machine), "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [IMAGE], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest


# ---- containerd --------------------------------------------------------------------------------------------------

class Containerd:
    """A private containerd: its own root, state and socket, a namespace of its own, coldbrew as the shim's runc."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / "containerd.sock")
        self.namespace = f"cbtest-{uuid.uuid4().hex[:8]}"
        self.runc_root = base / "runc"  # the shim passes --root RUNC_ROOT/NAMESPACE to coldbrew
        self.fifo_dir = base / "fifo"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        (self.base / "config.toml").write_text(f"""version = 2
root = "{self.base}/root"
state = "{self.base}/state"
# no CRI (it would want CNI and a pause image), no snapshotters that cannot work here, no /opt/containerd
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
""")
        with open(self.base / "containerd.log", "wb") as log:
            self.process = subprocess.Popen(["containerd", "--config", str(self.base / "config.toml")],
                                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while self.ctr("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd did not start:\n{(self.base / 'containerd.log').read_text()}")
            time.sleep(0.05)

    def ctr_command(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", self.namespace, *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(self.ctr_command(*args), check=check, timeout=timeout)

    @property
    def run_options(self) -> list[str]:
        return ["--runc-binary", COLDBREW, "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir)]

    def task_status(self, cid: str) -> str | None:
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[2]
        return None

    def remove(self, cid: str) -> None:
        """Kill and delete the task if there is one, then delete the container."""
        if self.task_status(cid) is not None:
            self.ctr("task", "kill", "--signal", "SIGKILL", cid, check=False)
            _wait_for(lambda: self.task_status(cid) in ("STOPPED", None), f"task {cid} to stop")
            # plain delete first: `delete --force` signals again, and fails where that signal fails
            if self.ctr("task", "delete", cid, check=False).returncode != 0:
                self.ctr("task", "delete", "--force", cid, check=False)
        self.ctr("containers", "delete", cid, check=False)

    def coldbrew_states(self) -> list[dict]:
        """The containers coldbrew itself holds under the shim's root: proof that coldbrew, not runc, runs them."""
        return json.loads(coldbrew(str(self.runc_root / self.namespace), "list", "--format", "json").stdout)

    def stop(self) -> list[str]:
        """Delete every task and container, stop containerd, remove all it made; returns what had leaked."""
        leaks = []
        listed = self.ctr("containers", "ls", "-q", check=False).stdout.split()
        if listed:
            leaks.append(f"containers a test did not delete: {listed}")
        for cid in listed:
            try:
                self.remove(cid)
            except (AssertionError, subprocess.TimeoutExpired) as e:  # what is left is killed below
                leaks.append(f"cannot delete {cid}: {e}")
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # shims outlive containerd by design; one left (or a coldbrew under our root) means a task was not deleted
        if stray := _still_running(self.address, str(self.base)):
            leaks.append(f"processes still running: {stray}")
            _kill_pids(stray)
        if mounts := _unmount_under(self.base):
            leaks.append(f"mounts left: {mounts}")
        for cgroup in _cgroup_dirs(self.namespace):
            # runc and coldbrew leave the parent (/NAMESPACE) they made; a container's own cgroup below is a leak
            if children := [p.name for p in cgroup.iterdir() if p.is_dir()]:
                leaks.append(f"cgroups left in {cgroup}: {children}")
            if left := _remove_cgroup_tree(cgroup):
                leaks.append(f"processes left in {cgroup}: {left}")
        states = self.runc_root / self.namespace
        if states.is_dir() and os.listdir(states):
            leaks.append(f"coldbrew state left: {os.listdir(states)}")
        shutil.rmtree(self.base, ignore_errors=True)
        return leaks


@pytest.fixture(scope="module")
def containerd(rootfs: Path, tmp_path_factory: pytest.TempPathFactory):
    # the socket path must fit a sockaddr_un (108 bytes): a short directory of our own, not pytest's tmp_path
    base = Path(tempfile.mkdtemp(prefix="cb-ctrd-"))
    # shims put their sockets in /run/containerd/s and ctr its default fifos in /run/containerd/fifo
    host = HostPaths(["/run/containerd"])
    daemon = Containerd(base)
    try:
        daemon.start()
        archive = _docker_archive(rootfs, tmp_path_factory.mktemp("image") / "image.tar")
        daemon.ctr("images", "import", str(archive))
        yield daemon
    finally:
        leaks = daemon.stop()
        host.remove()
    assert not leaks, leaks


@pytest.fixture
def ctr_id(containerd: Containerd):
    """A container id for one test; whatever the test leaves of it is deleted, and the leak reported."""
    cid = f"c-{uuid.uuid4().hex[:8]}"
    yield cid
    leftover = containerd.task_status(cid)
    containerd.remove(cid)
    assert leftover is None, f"task {cid} was left {leftover}"
    assert not containerd.coldbrew_states(), "coldbrew still holds containers the shim deleted"


@needs_containerd
def test_containerd_run_prints_and_returns_exit_code(containerd: Containerd, ctr_id: str):
    result = containerd.ctr("run", "--rm", *containerd.run_options, IMAGE, ctr_id, "sh", "-c",
                            "echo hello from pid $$ as uid $(id -u); echo oops >&2; exit 7", check=False)
    assert result.returncode == 7, result.stderr
    assert result.stdout == "hello from pid 1 as uid 0\n"
    assert result.stderr == "oops\n"
    # a failure inside coldbrew reaches the user through the shim's log.json
    failed = containerd.ctr("run", "--rm", *containerd.run_options, IMAGE, ctr_id + "b", "/no/such/program",
                            check=False)
    assert failed.returncode != 0
    assert "/no/such/program" in failed.stderr and "no such file or directory" in failed.stderr
    assert containerd.ctr("containers", "ls", "-q").stdout.split() == []


@needs_containerd
def test_containerd_exec_pause_kill_delete(containerd: Containerd, ctr_id: str, tmp_path: Path):
    # `ctr run` without --detach waits for the task and returns its exit status: the kill below decides it
    with open(tmp_path / "run.out", "wb") as out:
        runner = subprocess.Popen(containerd.ctr_command("run", "--rm", *containerd.run_options, IMAGE, ctr_id,
                                                         "sh", "-c", TRAPPING),
                                  stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        _wait_for(lambda: containerd.task_status(ctr_id) == "RUNNING", "the task to run")
        states = containerd.coldbrew_states()
        assert [(s["id"], s["status"]) for s in states] == [(ctr_id, "running")]
        init_pid = states[0]["pid"]
        assert containerd.ctr("task", "ps", ctr_id).stdout.split()[2] == str(init_pid)

        # exec joins the container (its pid namespace, where the init is pid 1) and has its own exit status
        exec_options = ["--fifo-dir", str(containerd.fifo_dir), ctr_id]
        ran = containerd.ctr("task", "exec", "--exec-id", "e1", *exec_options, "sh", "-c",
                             "readlink /proc/self/ns/pid; tr '\\0' ' ' < /proc/1/cmdline; exit 4", check=False)
        assert ran.returncode == 4, ran.stderr
        assert ran.stdout.splitlines() == [os.readlink(f"/proc/{init_pid}/ns/pid"), f"sh -c {TRAPPING} "]
        # quick execs in a row: the shim reads each one's pid file as soon as coldbrew returns
        for n in range(5):
            assert containerd.ctr("task", "exec", "--exec-id", f"q{n}", *exec_options, "sh", "-c", f"exit {n}",
                                  check=False).returncode == n
        missing = containerd.ctr("task", "exec", "--exec-id", "e2", *exec_options, "/no/such/program", check=False)
        assert missing.returncode != 0 and "no such file or directory" in missing.stderr

        # the shim reads the cgroups coldbrew made for its metrics
        assert "pids.current" in containerd.ctr("task", "metrics", ctr_id).stdout

        containerd.ctr("task", "pause", ctr_id)
        assert containerd.task_status(ctr_id) == "PAUSED"
        containerd.ctr("task", "resume", ctr_id)
        assert containerd.task_status(ctr_id) == "RUNNING"

        containerd.ctr("task", "kill", ctr_id)  # SIGTERM, trapped: the container exits 3
        assert runner.wait(timeout=20) == 3
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert (tmp_path / "run.out").read_text().startswith("ready\n")
    assert containerd.task_status(ctr_id) is None  # --rm: ctr deleted task and container


@needs_containerd
def test_containerd_detached_kill_twice_and_delete(containerd: Containerd, ctr_id: str):
    containerd.ctr("run", "--detach", *containerd.run_options, IMAGE, ctr_id, "sleep", "60")
    assert containerd.task_status(ctr_id) == "RUNNING"
    cgroups = [p / ctr_id for p in _cgroup_dirs(containerd.namespace)]
    assert cgroups and all(p.is_dir() for p in cgroups)  # containerd's default cgroup path: /NAMESPACE/ID
    containerd.ctr("task", "kill", "--signal", "SIGKILL", ctr_id)
    _wait_for(lambda: containerd.task_status(ctr_id) == "STOPPED", "the task to stop")
    # the shim asks coldbrew to signal a stopped container: runc's "container not running" makes that "not found"
    again = containerd.ctr("task", "kill", ctr_id, check=False)
    assert again.returncode != 0
    assert "not found" in again.stderr and "unknown error" not in again.stderr, again.stderr
    containerd.ctr("task", "delete", ctr_id)
    assert containerd.task_status(ctr_id) is None
    assert containerd.coldbrew_states() == []
    assert not any(p.exists() for p in cgroups)
    containerd.ctr("containers", "delete", ctr_id)


@needs_containerd
def test_containerd_terminal(containerd: Containerd, ctr_id: str):
    """`-t`: the shim passes --console-socket and expects the pty master back, for the init and for an exec."""
    containerd.ctr("run", "--detach", *containerd.run_options, IMAGE, ctr_id, "sleep", "60")
    code, output = _run_in_pty(containerd.ctr_command("task", "exec", "-t", "--exec-id", "t1", "--fifo-dir",
                                                      str(containerd.fifo_dir), ctr_id, "sh", "-c",
                                                      "tty; exit 5"))
    assert code == 5, output
    assert "/dev/pts/0" in output
    containerd.ctr("task", "kill", "--signal", "SIGKILL", ctr_id)
    _wait_for(lambda: containerd.task_status(ctr_id) == "STOPPED", "the task to stop")
    containerd.ctr("task", "delete", ctr_id)
    containerd.ctr("containers", "delete", ctr_id)
    code, output = _run_in_pty(containerd.ctr_command("run", "--rm", "-t", *containerd.run_options, IMAGE,
                                                      ctr_id + "t", "sh", "-c", "tty; exit 2"))
    assert code == 2, output
    assert "/dev/pts/0" in output


# ---- podman ------------------------------------------------------------------------------------------------------

class Podman:
    """podman with private storage, run root, tmp dir, network config and cgroup parent; coldbrew as its runtime."""

    def __init__(self, base: Path) -> None:
        self.base = base
        # coldbrew's default --root: podman's --runtime-flag does not reach the `container cleanup` that conmon runs
        # when a container exits, so a root of our own would make that cleanup miss the container
        self.state_root = DEFAULT_ROOT
        self.cgroup_parent = f"/cbtest-podman-{uuid.uuid4().hex[:8]}"
        self.global_args = [
            "--root", str(base / "storage"), "--runroot", str(base / "run"), "--tmpdir", str(base / "tmp"),
            # the CNI backend keeps its lock in the config dir; netavark's run dir is always /run/containers
            "--network-backend", "cni", "--network-config-dir", str(base / "net"),
            "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--storage-driver", "overlay",
        ]
        # podman's default rlimits (1048576) are above what this host lets even root set (environment.md)
        self.run_options = ["--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                            "--cgroup-parent", self.cgroup_parent]

    def command(self, *args: str, runtime: str = COLDBREW) -> list[str]:
        return ["podman", *self.global_args, "--runtime", runtime, *args]

    def podman(self, *args: str, check: bool = True, timeout: float = 60,
               runtime: str = COLDBREW) -> subprocess.CompletedProcess:
        return _run(self.command(*args, runtime=runtime), check=check, timeout=timeout)

    def inspect(self, name: str, field: str) -> str:
        return self.podman("inspect", "--format", "{{" + field + "}}", name).stdout.strip()

    def coldbrew_states(self) -> list[dict]:
        """The containers coldbrew holds for this podman (others may share coldbrew's default root)."""
        states = json.loads(coldbrew(self.state_root, "list", "--format", "json").stdout)
        return [s for s in states if s["bundle"].startswith(f"{self.base}/")]

    def stop(self) -> list[str]:
        """Remove every container and image, then all podman made; returns what had leaked."""
        leaks = []
        if containers := self.podman("ps", "--all", "--quiet", check=False).stdout.split():
            leaks.append(f"containers a test did not remove: {containers}")
            self.podman("rm", "--all", "--force", "--time", "0", check=False)
        self.podman("rmi", "--all", "--force", check=False)
        if stray := _still_running(str(self.base)):  # conmon, or the `podman container cleanup` it runs
            leaks.append(f"processes still running: {stray}")
            _kill_pids(stray)
        if states := self.coldbrew_states():
            leaks.append(f"coldbrew state left: {[s['id'] for s in states]}")
            for state in states:
                coldbrew(self.state_root, "delete", "--force", state["id"], check=False)
        _unmount_under(self.base)  # the overlay driver keeps its home bind-mounted on itself until shutdown
        for cgroup in _cgroup_dirs(self.cgroup_parent):
            # podman leaves conmon's cgroup (PARENT/conmon); a container's cgroup left below is coldbrew's leak
            if children := [p.name for p in cgroup.iterdir() if p.is_dir() and p.name != "conmon"]:
                leaks.append(f"cgroups left in {cgroup}: {children}")
            if pids := _remove_cgroup_tree(cgroup):
                leaks.append(f"processes left in {cgroup}: {pids}")
        shutil.rmtree(self.base, ignore_errors=True)
        return leaks


@pytest.fixture(scope="module")
def podman(rootfs: Path, tmp_path_factory: pytest.TempPathFactory):
    base = Path(tempfile.mkdtemp(prefix="cb-podman-"))
    # what podman writes outside --root/--runroot/--tmpdir: the image copy's blob cache, netavark's and CNI's files
    host = HostPaths(["/var/lib/containers", "/run/containers", "/etc/containers/networks", "/run/libpod",
                       "/etc/cni/net.d/cni.lock", "/var/lib/cni"])
    engine = Podman(base)
    try:
        tarball = tmp_path_factory.mktemp("podman-image") / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(rootfs, arcname=".")
        engine.podman("import", "--quiet", str(tarball), IMAGE)
        yield engine
    finally:
        leaks = engine.stop()
        host.remove()
    assert not leaks, leaks


@needs_podman
def test_podman_run_prints_and_returns_exit_code(podman: Podman):
    result = podman.podman("run", "--rm", *podman.run_options, IMAGE, "sh", "-c",
                           "echo hello; ulimit -n; echo oops >&2; exit 6", check=False)
    assert result.returncode == 6, result.stderr
    assert result.stdout == "hello\n1024\n"
    assert result.stderr == "oops\n"
    # podman reads runc's words: "no such file or directory" means exit status 127
    missing = podman.podman("run", "--rm", *podman.run_options, IMAGE, "/no/such/program", check=False)
    assert missing.returncode == 127, missing.stderr
    assert f"{COLDBREW}: coldbrew: exec: '/no/such/program': no such file or directory" in missing.stderr
    # a runtime named runc also gets --log-format=json --log FILE, and podman takes the error from that file
    runc = podman.base / "bin" / "runc"
    runc.parent.mkdir(exist_ok=True)
    runc.symlink_to(COLDBREW)
    logged = podman.podman("run", "--rm", *podman.run_options, IMAGE, "/no/such/program", check=False,
                           runtime=str(runc))
    assert logged.returncode == 127, logged.stderr
    assert f"{runc}: exec: '/no/such/program': no such file or directory" in logged.stderr
    assert podman.podman("ps", "--all", "--quiet").stdout == ""
    assert podman.coldbrew_states() == []


@needs_podman
def test_podman_exec_pause_kill_rm(podman: Podman):
    name = f"p-{uuid.uuid4().hex[:8]}"
    cid = podman.podman("run", "--detach", "--name", name, *podman.run_options, IMAGE, "sh", "-c",
                        TRAPPING).stdout.strip()
    try:
        assert podman.inspect(name, ".State.Status") == "running"
        states = podman.coldbrew_states()
        assert [(s["id"], s["status"]) for s in states] == [(cid, "running")]
        assert int(podman.inspect(name, ".State.Pid")) == states[0]["pid"]

        ran = podman.podman("exec", "--env", "GREETING=hi", "--workdir", "/tmp", name, "sh", "-c",
                            "echo $GREETING from $(pwd); cat /proc/1/cmdline | tr '\\0' ' '; exit 4", check=False)
        assert ran.returncode == 4, ran.stderr
        assert ran.stdout.splitlines() == ["hi from /tmp", f"sh -c {TRAPPING} "]
        assert podman.podman("exec", name, "/no/such/program", check=False).returncode == 127
        assert podman.podman("exec", name, "/etc/passwd", check=False).returncode == 126  # not executable
        code, output = _run_in_pty(podman.command("exec", "--tty", name, "sh", "-c", "tty; exit 5"))
        assert code == 5, output
        assert "/dev/pts/0" in output

        podman.podman("pause", name)
        assert podman.inspect(name, ".State.Status") == "paused"
        assert json.loads(coldbrew(podman.state_root, "state", cid).stdout)["status"] == "paused"
        podman.podman("unpause", name)
        assert podman.inspect(name, ".State.Status") == "running"

        podman.podman("kill", "--signal", "TERM", name)
        assert podman.podman("wait", name).stdout.strip() == "3"
        assert podman.inspect(name, ".State.Status") == "exited"
        assert podman.podman("logs", name).stdout.startswith("ready\n")
    finally:
        podman.podman("rm", "--force", "--time", "0", name)
    assert podman.podman("ps", "--all", "--quiet").stdout == ""
    assert podman.coldbrew_states() == []
    assert not [p / f"libpod-{cid}" for p in _cgroup_dirs(podman.cgroup_parent) if (p / f"libpod-{cid}").exists()]


@needs_podman
def test_podman_terminal_run(podman: Podman):
    code, output = _run_in_pty(podman.command("run", "--rm", "--tty", *podman.run_options, IMAGE, "sh", "-c",
                                              "tty; exit 2"))
    assert code == 2, output
    assert "/dev/pts/0" in output

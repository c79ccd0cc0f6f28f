"""The start-up benchmark: how long one container takes from nothing to exited and deleted, beside runc.

Scenarios are data (what to run, on which root filesystem), peers are adapters (one way of running a container:
runc's CLI, coldbrew's CLI, coldbrew's in-process API), results are rows (one per scenario, peer and metric).
Every round runs each peer once, in an order shuffled afresh each round (seeded, so a run can be repeated): drift on
the machine (page cache, CPU frequency, other load) reaches every peer alike, and no peer always follows the same
one. That matters: a container start right after another one is measurably quicker (the kernel's cgroup migration
lock stays on its fast path for a while after a write to cgroup.procs), so a fixed order would favour one peer.

Wall times of a CLI are taken around posix_spawn + waitpid of the whole command in this process: the spawn costs the
same for every CLI. In-process times are taken around the API calls themselves.
"""

from __future__ import annotations

import abc
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .bundles import busybox_config, make_rootfs, write_bundle
from .report import Result, Row, Target

RUNC = "/usr/sbin/runc"
CGROUP_ROOT = "/sys/fs/cgroup"
_LOG_TAIL = 2000


class BenchError(Exception):
    """A peer failed to run a container, or the benchmark could not be set up."""


@dataclass(frozen=True)
class Scenario:
    """What one measured start runs. Later scenarios add an image, a store location, a network shape, a cache state
    and snapshots; this one is a busybox-static root with runc's default spec."""

    name: str
    args: tuple[str, ...]
    description: str

    def bundle(self, where: Path) -> Path:
        rootfs = make_rootfs(where / "rootfs")
        return write_bundle(where / "bundle", busybox_config(rootfs, list(self.args)))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": list(self.args), "description": self.description}


SCENARIOS = (
    Scenario("true", ("/bin/true",), "busybox-static /bin/true, read-only root, runc's default spec"),
)

# The mission's start-up targets (docs/mission.md), judged on p50 in the same run.
TARGETS = (
    Target("true", "coldbrew", "total", "runc", "total", 1.0, "`coldbrew run` p50 at or below runc's"),
    Target("true", "inprocess", "total", "runc", "total", 0.5, "in-process start p50 at most half of runc's"),
)
BASELINE = ("runc", "total")


class Peer(abc.ABC):
    """One way of running a container. `sample` runs one to the end and deletes it; it returns seconds by metric."""

    name: str
    metrics: tuple[tuple[str, str], ...]  # (metric, label) in table order

    @abc.abstractmethod
    def prepare(self, workdir: Path) -> None:
        """Make what the peer needs (its state root, a log file) under `workdir`, which it owns."""

    @abc.abstractmethod
    def sample(self, bundle: Path, container_id: str) -> dict[str, float]:
        ...

    @abc.abstractmethod
    def cleanup(self, container_id: str) -> None:
        """Force-delete `container_id` after a failed sample; never raises."""

    @abc.abstractmethod
    def close(self) -> list[str]:
        """Delete every container still under the peer's root; what had been left behind, for the report."""

    def output(self) -> str:
        """The end of what the last sample's container and runtime wrote, for error messages."""
        return ""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "metrics": [m for m, _ in self.metrics]}


class _Stdio:
    """/dev/null for stdin, a log file for stdout and stderr, emptied before each sample; its tail goes into errors."""

    def __init__(self, log: Path) -> None:
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.log = os.open(log, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def reset(self) -> None:
        os.ftruncate(self.log, 0)
        os.lseek(self.log, 0, os.SEEK_SET)

    def tail(self) -> str:
        size = os.fstat(self.log).st_size
        return os.pread(self.log, _LOG_TAIL, max(0, size - _LOG_TAIL)).decode(errors="replace").strip()

    def close(self) -> None:
        os.close(self.null)
        os.close(self.log)


class CommandPeer(Peer):
    """A command timed as a whole. `argv` may name {root} (the peer's own state root), {bundle} and {id}."""

    def __init__(self, name: str, label: str, argv: tuple[str, ...], *, delete: tuple[str, ...] = (),
                 version: tuple[str, ...] = ()) -> None:
        self.name = name
        self.metrics = (("total", label),)
        self.argv = argv
        self.delete_argv = delete  # force-deletes {id}; empty for commands that make no container
        self.version_argv = version
        self.root: Path | None = None
        self._stdio: _Stdio | None = None

    def _fill(self, template: tuple[str, ...], bundle: Path | None, container_id: str) -> list[str]:
        return [part.format(root=self.root, bundle=bundle, id=container_id) for part in template]

    def prepare(self, workdir: Path) -> None:
        if not os.access(self.argv[0], os.X_OK):
            raise BenchError(f"{self.name}: {self.argv[0]} is not an executable file")
        workdir.mkdir(parents=True)
        self.root = workdir / "root"
        self._stdio = _Stdio(workdir / "output.log")

    def sample(self, bundle: Path, container_id: str) -> dict[str, float]:
        assert self._stdio is not None, "prepare() first"
        stdio = self._stdio
        argv = self._fill(self.argv, bundle, container_id)
        stdio.reset()
        actions = [(os.POSIX_SPAWN_DUP2, stdio.null, 0), (os.POSIX_SPAWN_DUP2, stdio.log, 1),
                   (os.POSIX_SPAWN_DUP2, stdio.log, 2)]
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        elapsed = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise BenchError(f"{self.name}: `{' '.join(argv)}` exited {code}: {stdio.tail() or '(no output)'}")
        return {"total": elapsed}

    def output(self) -> str:
        return self._stdio.tail() if self._stdio is not None else ""

    def cleanup(self, container_id: str) -> None:
        if self.delete_argv:
            subprocess.run(self._fill(self.delete_argv, None, container_id), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def close(self) -> list[str]:
        left = []
        if self.root is not None and self.root.is_dir():
            for entry in sorted(os.listdir(self.root)):
                left.append(f"{self.name}: state {self.root / entry}")
                self.cleanup(entry)
        if self._stdio is not None:
            self._stdio.close()
            self._stdio = None
        return left

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "argv": list(self.argv)}
        if self.version_argv:
            out = subprocess.run(list(self.version_argv), capture_output=True, text=True, check=False).stdout
            info["version"] = out.splitlines()[0] if out else None
        return info


class InProcessPeer(Peer):
    """coldbrew's library API called from this process: one `Runtime` kept for the whole run, as a scheduler would.

    With `phases` the four calls that `Runtime.run` makes are timed one by one instead, and create+start is reported
    as the time until the container's init execs its program (start returns once the init has passed the exec fifo,
    as `runc start` does).
    """

    def __init__(self, name: str, label: str, *, phases: bool = False) -> None:
        self.name = name
        self.phases = phases
        if phases:
            self.metrics = (("to_exec", label), ("create", "  create"), ("start", "  start"),
                            ("wait", "  wait (the program runs)"), ("delete", "  delete"))
        else:
            self.metrics = (("total", label),)
        self.runtime: Any = None
        self._stdio: _Stdio | None = None

    def prepare(self, workdir: Path) -> None:
        from coldbrew.runtime.container import Runtime

        workdir.mkdir(parents=True)
        self.runtime = Runtime(str(workdir / "root"))
        self._stdio = _Stdio(workdir / "output.log")

    def sample(self, bundle: Path, container_id: str) -> dict[str, float]:
        assert self._stdio is not None, "prepare() first"
        stdio = self._stdio
        stdio.reset()
        io = (stdio.null, stdio.log, stdio.log)
        clock = time.perf_counter
        if not self.phases:
            start = clock()
            code = self.runtime.run(container_id, str(bundle), stdio=io)
            elapsed = clock() - start
            self._check(code, container_id)
            return {"total": elapsed}
        t0 = clock()
        container = self.runtime.create(container_id, str(bundle), stdio=io)
        t1 = clock()
        container.start()
        t2 = clock()
        code = container.wait()
        t3 = clock()
        container.delete(force=True)
        t4 = clock()
        self._check(code, container_id)
        return {"to_exec": t2 - t0, "create": t1 - t0, "start": t2 - t1, "wait": t3 - t2, "delete": t4 - t3}

    def output(self) -> str:
        return self._stdio.tail() if self._stdio is not None else ""

    def _check(self, code: int | None, container_id: str) -> None:
        if code != 0:
            assert self._stdio is not None
            raise BenchError(f"{self.name}: container {container_id} exited {code}: "
                             f"{self._stdio.tail() or '(no output)'}")

    def cleanup(self, container_id: str) -> None:
        from coldbrew.runtime.errors import RuntimeFailure

        try:
            self.runtime.get(container_id).delete(force=True)
        except (RuntimeFailure, OSError):
            pass

    def close(self) -> list[str]:
        left = []
        if self.runtime is not None:
            root = Path(self.runtime.root)
            for entry in sorted(os.listdir(root)) if root.is_dir() else ():
                left.append(f"{self.name}: state {root / entry}")
                self.cleanup(entry)
        if self._stdio is not None:
            self._stdio.close()
            self._stdio = None
        return left


def coldbrew_binary() -> str:
    """The `coldbrew` console script of the environment this Python runs in (never a pyenv shim)."""
    return str(Path(sys.prefix) / "bin" / "coldbrew")


def default_peers(*, runc: str = RUNC, coldbrew: str | None = None, floors: bool = False) -> list[Peer]:
    """runc and coldbrew's CLI on runc's command line, the in-process API; with `floors`, the fixed cost of a bare
    interpreter and of `coldbrew --version` (what every CLI call pays before it does any work)."""
    coldbrew = coldbrew or coldbrew_binary()
    peers: list[Peer] = [
        CommandPeer("runc", "runc run", (runc, "--root", "{root}", "run", "-b", "{bundle}", "{id}"),
                    delete=(runc, "--root", "{root}", "delete", "-f", "{id}"), version=(runc, "--version")),
        CommandPeer("coldbrew", "coldbrew run (CLI)", (coldbrew, "--root", "{root}", "run", "-b", "{bundle}", "{id}"),
                    delete=(coldbrew, "--root", "{root}", "delete", "-f", "{id}"), version=(coldbrew, "--version")),
        InProcessPeer("inprocess", "Runtime.run (in-process)"),
        InProcessPeer("inprocess-phases", "create+start, to exec (in-process)", phases=True),
    ]
    if floors:
        bare = (sys.executable, "-I", "-S", "-c", "pass")
        peers += [CommandPeer("python-floor", "floor: python -I -S -c pass", bare),
                  CommandPeer("coldbrew-version", "floor: coldbrew --version", (coldbrew, "--version"))]
    return peers


def run_startup(runs: int = 50, warmup: int = 3, *, peers: list[Peer] | None = None,
                scenarios: tuple[Scenario, ...] = SCENARIOS, targets: tuple[Target, ...] = TARGETS,
                workdir_parent: str = "/run", seed: int | None = None, gap: float = 0.0,
                progress: Callable[[int, int], None] | None = None) -> Result:
    """Run every scenario `warmup + runs` rounds, each peer once a round; the warm-up rounds are not recorded.

    The order within a round is shuffled with `seed` (a random one when None, reported in `Result.settings`).
    `gap` seconds of idle come before each sample (outside its time): with a gap every start is an isolated one.

    Everything made (bundles, state roots, containers, cgroups) is removed before this returns or raises; what a
    peer left behind for the harness to remove is listed in `Result.leftovers`.
    """
    if runs < 1 or warmup < 0 or gap < 0:
        raise BenchError(f"runs must be at least 1, warmup and gap at least 0 (got {runs}, {warmup}, {gap})")
    seed = seed if seed is not None else random.randrange(2**32)
    order = random.Random(seed)
    peers = peers if peers is not None else default_peers()
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise BenchError(f"peer names must be unique: {names}")
    token = uuid.uuid4().hex[:8]
    prefix = f"cbb-{token}-"
    workdir = Path(tempfile.mkdtemp(prefix=f"coldbrew-bench-{token}-", dir=workdir_parent))
    result = Result(bench="startup", runs=runs, warmup=warmup, baseline=BASELINE, host=host_info(),
                    scenarios=[s.to_dict() for s in scenarios],
                    settings={"order": "shuffled each round", "seed": seed, "gap_ms": round(gap * 1000, 3)})
    stale = stale_bytecode()
    if stale:
        result.warnings.append(f"{len(stale)} coldbrew.runtime modules have missing or stale bytecode, so each CLI "
                               f"start compiles them (e.g. {stale[0]}); run `python -m compileall` on them first")
    result.targets = [t for t in targets if t.scenario in {s.name for s in scenarios}
                      and {t.peer, t.baseline_peer} <= set(names)]
    prepared: list[Peer] = []
    try:
        for peer in peers:
            prepared.append(peer)
            peer.prepare(workdir / "peers" / peer.name)
        result.peers = [p.describe() for p in peers]
        total = len(scenarios) * (warmup + runs)
        done = 0
        for scenario in scenarios:
            bundle = scenario.bundle(workdir / "scenarios" / scenario.name)
            rows = {(p.name, metric): Row(scenario.name, p.name, metric, label)
                    for p in peers for metric, label in p.metrics}
            for round_no in range(warmup + runs):
                for peer in order.sample(peers, len(peers)):
                    if gap:
                        time.sleep(gap)
                    container_id = f"{prefix}{scenario.name}-{peer.name}-{round_no}"
                    try:
                        sample = peer.sample(bundle, container_id)
                    except BaseException as e:
                        peer.cleanup(container_id)
                        if isinstance(e, BenchError) or not isinstance(e, Exception):
                            raise
                        output = peer.output()
                        raise BenchError(f"{peer.name}: container {container_id}: {e}"
                                         + (f" (its output: {output})" if output else "")) from e
                    if round_no >= warmup:
                        for metric, seconds in sample.items():
                            rows[(peer.name, metric)].samples.append(seconds * 1000)
                done += 1
                if progress is not None:
                    progress(done, total)
            result.rows.extend(rows.values())
    finally:
        for peer in prepared:
            result.leftovers.extend(peer.close())
        result.leftovers.extend(remove_cgroups(prefix))
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def remove_cgroups(prefix: str, root: str = CGROUP_ROOT) -> list[str]:
    """Kill the processes of, then remove, every cgroup whose name starts with `prefix`; the paths it found."""
    found = []
    for top, dirs, _ in os.walk(root):
        for name in dirs:
            if name.startswith(prefix):
                found.append(os.path.join(top, name))
        dirs[:] = [d for d in dirs if not d.startswith(prefix)]
    for path in found:
        for top, _, _ in sorted(os.walk(path), key=lambda item: -len(item[0])):  # children before parents
            _kill_cgroup(top)
            try:
                os.rmdir(top)
            except OSError:
                pass
    return [f"cgroup {path}" for path in found]


def _kill_cgroup(path: str) -> None:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(line) for line in f if line.strip()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def stale_bytecode(package: str = "coldbrew.runtime") -> list[str]:
    """The package's modules whose cached bytecode is missing or older than the source: every process that imports
    them compiles them again (and with PYTHONDONTWRITEBYTECODE set, never stops doing so)."""
    import importlib.util
    import struct

    spec = importlib.util.find_spec(package)
    stale = []
    for top in spec.submodule_search_locations if spec and spec.submodule_search_locations else ():
        for where, _, files in os.walk(top):
            for name in sorted(f for f in files if f.endswith(".py")):
                source = os.path.join(where, name)
                try:
                    with open(importlib.util.cache_from_source(source), "rb") as f:
                        flags, mtime, size = struct.unpack("<III", f.read(16)[4:16])
                except (OSError, struct.error):
                    stale.append(source)
                    continue
                st = os.stat(source)
                if flags == 0 and (mtime, size) != (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF):
                    stale.append(source)
    return stale


def host_info() -> dict[str, Any]:
    uname = os.uname()
    return {"kernel": uname.release, "machine": uname.machine, "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "python": platform.python_version(), "executable": sys.executable,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

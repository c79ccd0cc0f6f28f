"""Shared fixtures: a busybox-static root filesystem, bundles made from it, a private runtime root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from coldbrew.bench.bundles import busybox_config, make_rootfs

VENV_BIN = Path(sys.executable).parent
COLDBREW = str(VENV_BIN / "coldbrew")


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rootfs(tmp_path_factory.mktemp("rootfs"))


class Bundles:
    def __init__(self, base: Path, rootfs: Path) -> None:
        self.base = base
        self.rootfs = rootfs

    def make(self, args: list[str] | None = None, edit=None, config: dict | None = None) -> Path:
        bundle = self.base / uuid.uuid4().hex[:12]
        bundle.mkdir()
        config = config if config is not None else busybox_config(self.rootfs, args or ["true"])
        if edit:
            edit(config)
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle


@pytest.fixture
def bundles(tmp_path: Path, rootfs: Path) -> Bundles:
    return Bundles(tmp_path, rootfs)


@pytest.fixture
def runtime_root(tmp_path: Path):
    root = Path("/run") / f"coldbrew-test-{uuid.uuid4().hex[:8]}"
    yield str(root)
    leftovers = os.listdir(root) if root.exists() else []
    if leftovers:  # a test that failed half-way: take its containers down (processes, cgroups) before failing
        from coldbrew.runtime.container import Runtime
        from coldbrew.runtime.errors import RuntimeFailure

        for cid in leftovers:
            try:
                Runtime(str(root), subreaper=False).get(cid).delete(force=True)
            except RuntimeFailure:
                pass
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"state directories left behind: {leftovers}"


@pytest.fixture
def runtime(runtime_root: str):
    from coldbrew.runtime.container import Runtime

    rt = Runtime(runtime_root)
    yield rt
    for container in rt.list():
        container.delete(force=True)


@pytest.fixture
def cid(request) -> str:
    """A container id unique to this test (cgroups are named after it)."""
    return f"t-{uuid.uuid4().hex[:10]}"


def run_through_files(cmd: list[str], *, input: str | None = None, timeout: float | None = None,
                      ) -> subprocess.CompletedProcess:
    """Run a command with its output through files, not pipes: a container's init (or a shim, conmon) started by
    it inherits them and keeps running, so a pipe would never see its end."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        result = subprocess.run(cmd, stdout=out, stderr=err, input=input.encode() if input is not None else None,
                                stdin=None if input is not None else subprocess.DEVNULL, timeout=timeout)
        out.seek(0)
        err.seek(0)
        result.stdout, result.stderr = out.read().decode(), err.read().decode()
    return result


def coldbrew(root: str, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI (see run_through_files)."""
    result = run_through_files([COLDBREW, "--root", root, *args], input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"coldbrew {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def fork_child(body, *, dumpable: bool = True) -> tuple[int, dict | None]:
    """Run body() in a forked child; return its wait status and {"ok": result} or {"error": ..., "errno": ...}.

    The report pipe is close-on-exec, so a body that execs reports nothing (None) and the status is the program's.
    `dumpable=False` spares core files when the body is meant to die of a signal.
    """
    import signal

    from coldbrew.runtime import libc

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            signal.alarm(10)  # a wedged child must not hang the suite
            if not dumpable:
                libc.prctl(libc.PR_SET_DUMPABLE, 0)
            try:
                report = {"ok": body()}
                code = 0
            except BaseException as error:  # everything goes back to the parent
                report = {"error": f"{type(error).__name__}: {error}", "errno": getattr(error, "errno", None)}
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    return status, json.loads(data) if data else None


class HostPaths:
    """Host paths a real tool (containerd, podman, skopeo) makes outside its private directories: at teardown,
    remove those that were not there before."""

    def __init__(self, paths: list[str]) -> None:
        self.new = [p for p in paths if not os.path.lexists(p)]

    def remove(self) -> None:
        for path in self.new:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)

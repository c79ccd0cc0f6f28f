"""Attacks from runc's past escapes (docs/references.md), each against the real runtime.

The host must stay untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest

from coldbrew.bench.bundles import make_rootfs
from coldbrew.runtime import exec_shim
from coldbrew.runtime.errors import RuntimeFailure
from coldbrew.runtime.spec import Process
from test_lifecycle import run_capture


@pytest.fixture
def own_rootfs(tmp_path: Path) -> Path:
    """A writable rootfs of this test's own, for attacks that plant files in the image."""
    return make_rootfs(tmp_path / "rootfs")


def config_for(bundles, rootfs: Path, args: list[str], edit=None):
    def set_root(c):
        c["root"] = {"path": str(rootfs), "readonly": False}
        if edit:
            edit(c)

    return bundles.make(args, edit=set_root)


def sha256(path: str) -> str:
    with open(os.path.realpath(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


# CVE-2019-5736: /proc/self/exe of the runtime reached through exec

def test_proc_self_exe_script_cannot_reach_the_host_interpreter(runtime, bundles, own_rootfs, cid, tmp_path):
    (own_rootfs / "evil").write_text("#!/proc/self/exe\n")
    (own_rootfs / "evil").chmod(0o755)
    (own_rootfs / "evil-link").symlink_to("/proc/self/exe")
    before = sha256(sys.executable)
    for n, program in enumerate(("/evil", "/evil-link")):
        code, out = run_capture(runtime, f"{cid}-{n}", config_for(bundles, own_rootfs, [program]), tmp_path)
        # the kernel ran our sealed shim, not the host's Python, and the shim refused to go on
        assert code == 127, out
    assert sha256(sys.executable) == before


def test_exec_shim_cannot_be_written(tmp_path):
    fd = exec_shim.shim_fd()
    if fd is None:
        pytest.skip("no exec shim for this CPU")
    with pytest.raises(PermissionError):
        writer = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        try:
            os.write(writer, b"overwritten")
        finally:
            os.close(writer)


def test_exec_into_container_goes_through_shim(runtime, bundles, own_rootfs, cid, tmp_path):
    (own_rootfs / "evil").write_text("#!/proc/self/exe\n")
    (own_rootfs / "evil").chmod(0o755)
    container = runtime.create(cid, config_for(bundles, own_rootfs, ["sleep", "60"]))
    container.start()
    before = sha256(sys.executable)
    proc = container.exec(Process.from_spec({"args": ["/evil"], "cwd": "/", "env": ["PATH=/bin"]}))
    assert proc.wait() == 127
    assert sha256(sys.executable) == before
    container.kill(signal.SIGKILL)
    container.wait()


# CVE-2019-16884 / CVE-2019-19921: symlinked /proc and mount destinations

def test_symlinked_proc_is_refused(runtime, runtime_root, bundles, own_rootfs, cid):
    (own_rootfs / "proc").rmdir()
    (own_rootfs / "fakeproc").mkdir()
    (own_rootfs / "proc").symlink_to("/fakeproc")
    mounts = host_mounts()
    with pytest.raises(RuntimeFailure, match="symlink"):
        runtime.create(cid, config_for(bundles, own_rootfs, ["true"]))
    assert host_mounts() == mounts
    assert not os.path.exists(os.path.join(runtime_root, cid))


def test_mount_destination_symlink_stays_inside_root(runtime, bundles, own_rootfs, cid, tmp_path):
    outside = tmp_path / "host-dir"
    outside.mkdir()
    (own_rootfs / "escape").symlink_to(str(outside))  # absolute: on the host it would leave the rootfs
    (own_rootfs / "up").symlink_to("../../../../../../../../" + str(outside))

    def edit(c):
        c["mounts"].append({"destination": "/escape/data", "type": "tmpfs", "source": "tmpfs"})
        c["mounts"].append({"destination": "/up/more", "type": "tmpfs", "source": "tmpfs"})

    script = "echo planted > /escape/data/file && echo planted > /up/more/file && grep -c ' /' /proc/self/mountinfo"
    code, out = run_capture(runtime, cid, config_for(bundles, own_rootfs, ["sh", "-c", script], edit), tmp_path)
    assert code == 0, out
    assert list(outside.iterdir()) == []  # nothing made on the host
    inside = own_rootfs / str(outside).lstrip("/")
    assert (inside / "data").is_dir() and (inside / "more").is_dir()  # made inside the rootfs instead


# CVE-2021-30465: swapping a directory for a symlink between check and mount

def test_racing_symlink_swap_never_mounts_outside(runtime, bundles, own_rootfs, cid, tmp_path):
    outside = tmp_path / "host-target"
    outside.mkdir()
    (outside / "precious").write_text("host data")
    volume = own_rootfs / "vol"
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            try:
                if volume.is_symlink():
                    volume.unlink()
                    volume.mkdir()
                else:
                    shutil.rmtree(volume, ignore_errors=True)
                    volume.symlink_to(str(outside))
            except OSError:
                pass

    def edit(c):
        c["mounts"].append({"destination": "/vol/x", "type": "tmpfs", "source": "tmpfs"})

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for n in range(15):
            try:
                code, out = run_capture(runtime, f"{cid}-{n}", config_for(
                    bundles, own_rootfs, ["sh", "-c", "echo overwritten > /vol/x/precious; true"], edit), tmp_path)
            except RuntimeFailure:
                continue  # losing the race may fail the mount: fine, as long as nothing escapes
    finally:
        stop.set()
        swapper.join()
    assert (outside / "precious").read_text() == "host data"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]


# CVE-2024-21626: leaked host descriptors and a cwd through them

def test_no_host_descriptor_reaches_the_container(runtime, bundles, cid, tmp_path):
    leak = os.open("/", os.O_RDONLY | os.O_DIRECTORY)  # an inheritable host directory fd in the runtime process
    os.set_inheritable(leak, True)
    try:
        code, out = run_capture(runtime, cid, bundles.make(["ls", "/proc/self/fd"]), tmp_path)
    finally:
        os.close(leak)
    assert code == 0, out
    assert sorted(int(x) for x in out.split()) == [0, 1, 2, 3]  # stdio, and ls's own directory fd


@pytest.mark.parametrize("fd", range(3, 12))
def test_cwd_through_a_descriptor_is_refused(runtime, runtime_root, bundles, cid, fd):
    bundle = bundles.make(["pwd"], edit=lambda c: c["process"].update(cwd=f"/proc/self/fd/{fd}"))
    with pytest.raises(RuntimeFailure, match="process.cwd"):
        runtime.create(cid, bundle)
    assert not os.path.exists(os.path.join(runtime_root, cid))


# masked and read-only paths

def test_masked_and_readonly_paths(runtime, bundles, cid, tmp_path):
    script = ("cat /proc/timer_list | wc -c; ls /sys/firmware | wc -l; "
              "echo x > /proc/sys/kernel/hostname && echo wrote-sysctl; "
              "echo h > /proc/sysrq-trigger && echo wrote-sysrq; "
              "touch /proc/sys/kernel/x 2>/dev/null || echo ro; touch /newfile 2>/dev/null || echo root-ro")
    code, out = run_capture(runtime, cid, bundles.make(["sh", "-c", script]), tmp_path)
    lines = out.splitlines()
    assert lines[0].strip() == "0" and lines[1].strip() == "0", out  # masked: empty
    assert "wrote-sysctl" not in out and "wrote-sysrq" not in out
    assert "ro" in lines and "root-ro" in lines

"""`coldbrew fs ...` end to end: push a tree, make a writable container root over the lazy mount, run a container
in it with `coldbrew run`, read the mount's statistics, take it all down."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from conftest import COLDBREW, coldbrew, run_through_files


def fs(*args: str, check: bool = True):
    result = run_through_files([COLDBREW, "fs", *args])
    if check and result.returncode != 0:
        raise AssertionError(f"coldbrew fs {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def mounts_under(path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(path))]


@pytest.fixture
def pushed(tmp_path, rootfs):
    store = tmp_path / "store"
    result = json.loads(fs("push", "--json", "--store", str(store), str(rootfs)).stdout)
    assert len(result["reference"]) == 64 and result["entries"] > 10
    return store, result["reference"]


def test_container_runs_from_an_image_reference(tmp_path, pushed, bundles, runtime_root, cid):
    store, reference = pushed
    stored_before = sorted(p.name for p in store.rglob("*") if p.is_file())
    root_dir = tmp_path / "ctr"
    cache = tmp_path / "cache"
    try:
        rootfs = fs("rootfs", reference, str(root_dir), "--store", str(store), "--cache", str(cache)).stdout.strip()
        assert rootfs == str(root_dir / "rootfs")

        def writable_root(config):
            config["root"] = {"path": rootfs, "readonly": False}

        bundle = bundles.make(["sh", "-c", "echo changed > /etc/created && cat /etc/created && ls /bin/busybox"],
                              edit=writable_root)
        result = coldbrew(runtime_root, "run", "--bundle", str(bundle), cid)
        assert result.stdout.split() == ["changed", "/bin/busybox"]
        # the change lives in the container's upper layer; the image and the store are untouched
        assert (root_dir / "upper" / "etc" / "created").read_text() == "changed\n"
        assert not (root_dir / "image" / "etc" / "created").exists()
        assert sorted(p.name for p in store.rglob("*") if p.is_file()) == stored_before

        stats = json.loads(fs("stats", "--json", str(root_dir / "image")).stdout)
        assert stats["chunks_fetched"] > 0 and stats["bytes_fetched"] > 0
        text = fs("stats", str(root_dir / "image")).stdout
        assert any(line.split()[:2] == ["chunks_fetched", str(stats["chunks_fetched"])] for line in text.splitlines())
    finally:
        fs("rm-rootfs", str(root_dir), check=False)
    assert not mounts_under(root_dir)
    assert not root_dir.exists()


def test_mount_and_umount(tmp_path, pushed, rootfs):
    store, reference = pushed
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        fs("mount", reference, str(mountpoint), "--store", str(store), "--cache", str(tmp_path / "cache"))
        assert sorted(os.listdir(mountpoint)) == sorted(os.listdir(rootfs))
        assert (mountpoint / "bin" / "busybox").read_bytes() == (rootfs / "bin" / "busybox").read_bytes()
    finally:
        fs("umount", str(mountpoint), check=False)
    assert not mounts_under(mountpoint)


def test_errors_are_one_clear_line(tmp_path, pushed):
    store, reference = pushed
    result = fs("mount", "f" * 64, str(tmp_path), "--store", str(store), check=False)
    assert result.returncode == 1 and "f" * 64 in result.stderr and "Traceback" not in result.stderr
    result = fs("push", str(tmp_path / "missing"), "--store", str(store), check=False)
    assert result.returncode == 1 and "missing" in result.stderr and "Traceback" not in result.stderr
    result = fs("rootfs", "not-a-reference", str(tmp_path / "r"), "--store", str(store), check=False)
    assert result.returncode == 1 and "not-a-reference" in result.stderr
    assert not mounts_under(tmp_path)
    result = fs("mount", reference, str(tmp_path / "nowhere"), "--store", str(store), check=False)
    assert result.returncode == 1 and "nowhere" in result.stderr


def test_mounts_fork_from_the_mount_server(tmp_path, pushed, rootfs, monkeypatch):
    store, reference = pushed
    socket_path = tmp_path / "mount-server.sock"
    monkeypatch.setenv("COLDBREW_MOUNT_SERVER", str(socket_path))
    server = subprocess.Popen([COLDBREW, "fs", "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.02)
        second = fs("serve", check=False)
        assert second.returncode == 1 and "already listens" in second.stderr
        fs("mount", reference, str(mountpoint), "--store", str(store), "--cache", str(tmp_path / "cache"))
        daemon = json.loads(fs("stats", "--json", str(mountpoint)).stdout)["pid"]
        with open(f"/proc/{daemon}/stat") as stat_file:
            parent = int(stat_file.read().rpartition(")")[2].split()[1])
        assert parent == server.pid  # forked by the server, not started from scratch
        assert (mountpoint / "bin" / "busybox").read_bytes() == (rootfs / "bin" / "busybox").read_bytes()
        bad = fs("mount", "e" * 64, str(tmp_path), "--store", str(store), check=False)
        assert bad.returncode == 1 and "e" * 64 in bad.stderr  # errors come back through the server's child too
    finally:
        fs("umount", str(mountpoint), check=False)
        server.terminate()
        assert server.wait(10) == 0
    assert not socket_path.exists() and not mounts_under(tmp_path)


def test_concurrent_roots_share_one_mounted_image(tmp_path, pushed, rootfs):
    """Roots made at once by separate processes with --keep-mounted stack on one set of image mounts."""
    store, reference = pushed
    directories = [tmp_path / f"ctr{k}" for k in range(4)]
    makers = [subprocess.Popen([COLDBREW, "fs", "rootfs", reference, str(directory), "--store", str(store),
                                "--cache", str(tmp_path / "cache"), "--keep-mounted", "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for directory in directories]
    stack = None
    try:
        for maker in makers:
            assert maker.wait(60) == 0, maker.stderr.read()
        images = {os.readlink(directory / "image") for directory in directories}
        assert len(images) == 1
        stack = os.path.dirname(images.pop())
        assert [point for point in mounts_under(stack)] == [f"{stack}/image", f"{stack}/meta"]
        pids = {json.loads(fs("stats", "--json", str(directory / "image")).stdout)["pid"] for directory in directories}
        assert len(pids) == 1
        for directory in directories:
            assert (directory / "rootfs" / "bin" / "busybox").read_bytes() == (rootfs / "bin" / "busybox").read_bytes()
    finally:
        for directory in directories:
            fs("rm-rootfs", str(directory), check=False)
        if stack is not None:
            fs("umount", f"{stack}/image", check=False)
    assert not mounts_under(tmp_path)
    assert stack is not None and not mounts_under(stack) and not os.path.exists(stack)

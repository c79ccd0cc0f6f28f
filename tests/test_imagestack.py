"""Container roots on an image's shared, lingering read-only layers (`create_root(..., keep_mounted=...)`).

Real FUSE daemons, real EROFS and overlay mounts: roots of one image share one stack, a stack outlives its last
root for `keep_mounted` seconds and then takes itself down (mounts, daemon, directory, lock, state files), a
stack whose daemon was killed is rebuilt, and an outdated stack still in use is left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from coldbrew.fs.daemon import _paths, mount_stats, unmount
from coldbrew.fs.imagestack import STACKS_DIR
from coldbrew.fs.mounts import mount_entry, mount_table, mounts_below
from coldbrew.fs.pushing import push
from coldbrew.fs.rootfs import create_root, image_mount, remove_root
from coldbrew.fs.store import LocalStore

from test_mount import SMALL_CHUNK, describe, make_rich_tree


class Roots:
    """Roots for one test, on shared stacks; at teardown every root and every stack they used is gone."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.store = base / "store"
        self.made: list[Path] = []
        self.stacks: set[str] = set()

    def create(self, reference: str, name: str, *, keep_mounted: float | None = 30.0, **options) -> Path:
        directory = self.base / name
        self.made.append(directory)
        rootfs = Path(create_root(reference, str(directory), store=str(self.store),
                                  cache_dir=str(self.base / "cache"), keep_mounted=keep_mounted, **options))
        image = image_mount(str(directory))
        if image.startswith(STACKS_DIR):
            self.stacks.add(os.path.dirname(image))
        return rootfs

    def cleanup(self) -> None:
        for directory in self.made:
            if directory.exists():
                remove_root(str(directory))
        for stack in self.stacks:
            if mount_entry(os.path.join(stack, "image")) is not None:
                unmount(os.path.join(stack, "image"))
        assert not mounts_below(os.path.realpath(self.base))
        for stack in self.stacks:
            assert_taken_down(stack)


@pytest.fixture
def roots(tmp_path: Path):
    helper = Roots(tmp_path)
    yield helper
    helper.cleanup()


def assert_taken_down(stack: str) -> None:
    image = os.path.join(stack, "image")
    assert not mounts_below(stack)
    assert not os.path.exists(stack) and not os.path.exists(stack + ".lock")
    assert not any(os.path.exists(path) for path in _paths(image))  # the daemon's state, socket and log


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def exited(pid: int) -> bool:
    """Gone, or a zombie (the daemon's parent may be a subreaper that has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rpartition(b")")[2].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def _pushed_rich_tree(tmp_path: Path) -> tuple[Path, str]:
    tree = tmp_path / "tree"
    make_rich_tree(tree)
    return tree, push(str(tree), LocalStore(str(tmp_path / "store")), chunk_size=SMALL_CHUNK).reference


def _lower(rootfs: Path) -> str:
    options = next(entry.options for entry in mount_table() if entry.point == str(rootfs))
    return next(option for option in options.split(",") if option.startswith("lowerdir="))


def _without_root(description: dict) -> dict:
    return {path: value for path, value in description.items() if path != b"."}


def test_roots_of_one_image_share_its_layers(roots: Roots, tmp_path: Path) -> None:
    tree, reference = _pushed_rich_tree(tmp_path)
    first = roots.create(reference, "first")
    second = roots.create(reference, "second")
    (stack,) = roots.stacks
    assert _lower(first) == _lower(second) == f"lowerdir={stack}/meta::{stack}/image"
    assert [entry.fstype for entry in mount_table() if entry.point.startswith(stack + "/")] == ["fuse.coldbrew",
                                                                                               "erofs"]
    daemon = mount_stats(image_mount(str(tmp_path / "first")))["pid"]
    assert _without_root(describe(first)) == _without_root(describe(tree))
    (first / "small.txt").write_text("only in the first")
    assert (second / "small.txt").read_text() == "hello\n"

    remove_root(str(tmp_path / "first"))
    assert (second / "large.bin").read_bytes() == (tree / "large.bin").read_bytes()
    remove_root(str(tmp_path / "second"))
    # The stack outlives its last root: the next root is one overlay mount on the same daemon.
    third = roots.create(reference, "third")
    assert mount_stats(image_mount(str(tmp_path / "third")))["pid"] == daemon
    assert (third / "small.txt").read_text() == "hello\n"
    remove_root(str(tmp_path / "third"))
    # Unmounting the stack's image takes all of it down at once.
    unmount(os.path.join(stack, "image"))
    assert_taken_down(stack)
    assert exited(daemon)


def test_unused_stack_takes_itself_down(roots: Roots, tmp_path: Path) -> None:
    tree, reference = _pushed_rich_tree(tmp_path)
    rootfs = roots.create(reference, "root", keep_mounted=0.5)
    (stack,) = roots.stacks
    daemon = mount_stats(image_mount(str(tmp_path / "root")))["pid"]
    time.sleep(2.5)  # in use: the stack stays, whatever keep_mounted says
    assert (rootfs / "small.txt").read_text() == "hello\n"
    remove_root(str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()
    wait_until(lambda: not os.path.exists(stack + ".lock"))
    assert_taken_down(stack)
    wait_until(lambda: exited(daemon))


def test_stack_whose_daemon_was_killed_is_built_again(roots: Roots, tmp_path: Path) -> None:
    tree, reference = _pushed_rich_tree(tmp_path)
    roots.create(reference, "first")
    daemon = mount_stats(image_mount(str(tmp_path / "first")))["pid"]
    os.kill(daemon, signal.SIGKILL)
    remove_root(str(tmp_path / "first"))
    wait_until(lambda: exited(daemon))
    rootfs = roots.create(reference, "second")
    assert mount_stats(image_mount(str(tmp_path / "second")))["pid"] != daemon
    assert (rootfs / "large.bin").read_bytes() == (tree / "large.bin").read_bytes()


def test_outdated_stack_in_use_leaves_a_new_root_its_own_layers(roots: Roots, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "module.py").write_bytes(os.urandom(3000))
    reference = push(str(tree), LocalStore(str(roots.store)), chunk_size=SMALL_CHUNK).reference
    recording = roots.create(reference, "record", record_profile=True)
    assert not os.path.islink(tmp_path / "record" / "image")  # a recording root has layers of its own
    (recording / "module.py").read_bytes()
    remove_root(str(tmp_path / "record"))  # saves the profile: roots from now on stack a hot layer

    first = roots.create(reference, "first")
    (stack,) = roots.stacks
    hot = _lower(first).split("::")[1]
    wait_until(lambda: os.path.exists(hot + ".complete"))  # its daemon no longer writes to it
    shutil.rmtree(hot)  # evicted from the cache (the eviction itself spares a stacked layer)
    second = roots.create(reference, "second")
    assert not os.path.islink(tmp_path / "second" / "image")
    assert mount_entry(str(tmp_path / "second" / "image"))[1] == "fuse.coldbrew"
    assert (second / "module.py").read_bytes() == (tree / "module.py").read_bytes()
    assert roots.stacks == {stack}

"""The lazy image filesystem beside its peers, on a real Debian + Python + PyTorch tree (`trees.torch_tree`).

Every scenario pairs a coldbrew row with its peer row, measured in the same run and interleaved round by round:
- push: `coldbrew fs push` into an empty local store beside `tar | zstd -3` of the same tree;
- first start of a command in a container whose root is the image mounted from an HTTP store behind a shaped link
  (nginx in a network namespace, 1 Gbit/s and 2 ms RTT), with an empty chunk cache and a dropped page cache, beside
  downloading the whole tree as one tar.zst through the same link, unpacking it and running the same command in a
  container on the unpacked tree; once without a start-up profile, once with the profile a previous run recorded;
- bytes fetched for that start beside the command's native working set (mincore after a dropped page cache);
- the same start with a warm chunk cache (page cache dropped) beside the unpacked tree on local disk: the root made
  on the image's layers that an earlier container on the host left mounted (`keep_mounted`), and made with
  layers mounted for it;
- sequential read of the tree's largest file from a warm chunk cache beside local disk (page caches dropped);
- a metadata walk (`find -printf` with sizes and modes: a stat of each entry), first and second time, beside
  local disk.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .report import Result, Row, Target
from .trees import drop_caches

COMMANDS = {"print(1)": "print(1)", "import numpy": "import numpy", "import torch": "import torch"}
FIRST_START_TARGETS = {"print(1)": 20, "import numpy": 8, "import torch": 3}
WORKDIR = "/var/cache/coldbrew-bench/fsbench"
# How long a warm start's image layers stay mounted after its container (longer than a round of the bench).
KEEP_MOUNTED = 600.0


def _coldbrew() -> str:
    from .startup import coldbrew_binary

    return coldbrew_binary()


@dataclass
class Setting:
    workdir: str
    store_url: str = ""
    archive_url: str = ""
    reference: str = ""


def run_container(root: str, code: str, workdir: str, *, read_only: bool = False) -> float:
    """Seconds to run `python3 -c code` in a coldbrew container whose root is `root`."""
    from .bundles import busybox_config, write_bundle
    from pathlib import Path

    config = busybox_config(Path(root), ["/usr/bin/python3", "-c", code])
    config["root"]["readonly"] = read_only
    config["process"]["env"] = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "PYTHONDONTWRITEBYTECODE=1"]
    bundle = tempfile.mkdtemp(dir=workdir, prefix="bundle-")
    try:
        write_bundle(Path(bundle), config)
        started = time.perf_counter()
        subprocess.run([_coldbrew(), "--root", os.path.join(workdir, "state"), "run", "--bundle", bundle,
                        f"fsbench-{os.getpid()}"], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(bundle)


def _lazy_start(setting: Setting, code: str, cache_dir: str, *, prefetch: bool, hot: bool = True,
                record: bool = False, keep_mounted: float | None = None) -> tuple[float, dict]:
    """(seconds from making the container's root to the command's exit, the image mount's statistics).

    `hot`: the root stacks the hot layer of the recorded profile (built first when the cache has none).
    `keep_mounted`: the root is made on the host's shared image layers (mounted by an earlier root, if any)."""
    from coldbrew.fs.daemon import mount_stats
    from coldbrew.fs.rootfs import create_root, image_mount, remove_root

    directory = tempfile.mkdtemp(dir=setting.workdir, prefix="root-")
    started = time.perf_counter()
    try:
        root = create_root(setting.reference, directory, store=setting.store_url, cache_dir=cache_dir,
                           prefetch=prefetch, hot=hot, record_profile=record, keep_mounted=keep_mounted)
        run_container(root, code, setting.workdir)
        elapsed = time.perf_counter() - started
        stats = mount_stats(image_mount(directory))
    finally:
        remove_root(directory)
    return elapsed, stats


def _unmount_shared(image_mounts: set[str]) -> None:
    """Take down the shared image layers the warm starts kept mounted."""
    from coldbrew.fs.daemon import unmount
    from coldbrew.fs.mounts import mounted

    for image in image_mounts:
        if mounted(image):
            unmount(image)
    image_mounts.clear()


def _download_unpack_start(setting: Setting, code: str) -> float:
    """The peer: fetch the whole tree as one archive through the same link, unpack it, run the command."""
    directory = tempfile.mkdtemp(dir=setting.workdir, prefix="unpacked-")
    try:
        started = time.perf_counter()
        # curl streams into zstd | tar: download and unpacking overlap, as a good puller does.
        subprocess.run(f"curl -sf {setting.archive_url} | zstd -dq -T0 | tar -x -C {directory}", shell=True,
                       check=True)
        run_container(directory, code, setting.workdir)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(directory)


def _timed(command: list[str] | str, **options) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **options)
    return time.perf_counter() - started


def run_fsbench(runs: int = 3, commands: list[str] | None = None, progress=None) -> Result:
    from coldbrew.fs.pushing import push
    from coldbrew.fs.store import LocalStore

    from . import trees
    from .netshape import ShapedLink
    from .nginx import NginxServer

    tree = trees.torch_tree()
    os.makedirs(WORKDIR, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=WORKDIR, prefix="run-")
    setting = Setting(workdir=workdir)
    result = Result(bench="fs", runs=runs, warmup=0, baseline=("peer", "time"))
    result.settings = {"runs": runs, "tree": tree, "link": "1 Gbit/s, 2 ms RTT"}
    chosen = commands or list(COMMANDS)

    def row(scenario: str, peer: str, label: str, unit: str = "ms", metric: str = "time") -> Row:
        for existing in result.rows:
            if (existing.scenario, existing.peer, existing.metric) == (scenario, peer, metric):
                return existing
        new = Row(scenario, peer, metric, label, unit)
        result.rows.append(new)
        return new

    # The host's mount server, as a worker host runs it: mounts fork from it with trio and pyfuse3 loaded.
    server_log = open(os.path.join(workdir, "mount-server.log"), "wb")
    mount_server = subprocess.Popen([_coldbrew(), "fs", "serve", "--socket", _mount_server_socket()],
                                    stdout=server_log, stderr=subprocess.STDOUT)
    result.settings["mount server"] = "coldbrew fs serve (warm)"
    shared: set[str] = set()
    try:
        _wait_for_socket(_mount_server_socket())
        # push, beside tar | zstd
        served = os.path.join(workdir, "served")
        os.makedirs(served)
        archive = os.path.join(served, "tree.tar.zst")
        for run in range(runs):
            store_dir = os.path.join(workdir, f"push-store-{run}")
            drop_caches()
            started = time.perf_counter()
            pushed = push(tree, LocalStore(store_dir))
            row("push", "coldbrew", "coldbrew fs push").samples.append((time.perf_counter() - started) * 1e3)
            drop_caches()
            row("push", "peer", "tar | zstd -3 -T0").samples.append(
                _timed(f"tar -C {tree} -cf - . | zstd -3 -T0 -q -f -o {archive}", shell=True) * 1e3)
            if run == 0:
                os.rename(store_dir, os.path.join(served, "store"))
            else:
                shutil.rmtree(store_dir)
        setting.reference = pushed.reference
        if progress:
            progress("push done")

        largest = max((os.path.join(d, f) for d, _, fs in os.walk(tree) for f in fs
                       if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))),
                      key=os.path.getsize)
        with ShapedLink(rate_bit=1e9, rtt_ms=2.0) as link, \
                NginxServer(served, address=link.ns_address, netns=link.netns, webdav_put=True) as server:
            setting.store_url = f"{server.url}/store"
            setting.archive_url = f"{server.url}/tree.tar.zst"
            warm_cache = os.path.join(workdir, "warm-cache")
            for name in chosen:
                code = COMMANDS[name]
                # a run that records the start-up profile (and warms the warm cache)
                _lazy_start(setting, code, warm_cache, prefetch=False, record=True)
                # a previous container of the image on this host, whose layers (with the hot layer of the new
                # profile) stay mounted for the warm starts
                _unmount_shared(shared)
                shared.add(_lazy_start(setting, code, warm_cache, prefetch=False, keep_mounted=KEEP_MOUNTED)[1][
                    "mountpoint"])
                native = trees.native_working_set(tree, ["/usr/bin/python3", "-c", code])
                for run in range(runs):
                    cold = os.path.join(workdir, f"cold-cache-{run}")
                    drop_caches()
                    elapsed, stats = _lazy_start(setting, code, cold, prefetch=False, hot=False)
                    shutil.rmtree(cold)
                    row(f"first start: {name}", "coldbrew", "lazy mount, no profile").samples.append(elapsed * 1e3)
                    row(f"bytes fetched: {name}", "coldbrew", "lazy mount, no profile", "MB", "bytes").samples.append(
                        stats["chunk_bytes_fetched"] / 1e6)
                    row(f"bytes fetched: {name}", "coldbrew-wire", "lazy mount, no profile, compressed on the wire",
                        "MB", "bytes").samples.append(stats["bytes_fetched"] / 1e6)
                    drop_caches()
                    elapsed, _ = _lazy_start(setting, code, cold, prefetch=True)
                    shutil.rmtree(cold)
                    row(f"first start: {name}", "coldbrew+profile", "lazy mount, profile: hot layer + prefetch"
                        ).samples.append(elapsed * 1e3)
                    row(f"bytes fetched: {name}", "peer", "native working set (mincore)", "MB", "bytes"
                        ).samples.append(native / 1e6)
                    drop_caches()
                    row(f"first start: {name}", "peer", "download + unpack + start").samples.append(
                        _download_unpack_start(setting, code) * 1e3)
                    # warm chunk cache, cold page cache, beside the tree on local disk: on the image layers
                    # that an earlier container left mounted, and on layers mounted for this root
                    drop_caches()
                    elapsed, _ = _lazy_start(setting, code, warm_cache, prefetch=False, keep_mounted=KEEP_MOUNTED)
                    row(f"warm start: {name}", "coldbrew", "root on the mounted image (warm cache, hot layer)"
                        ).samples.append(elapsed * 1e3)
                    drop_caches()
                    elapsed, _ = _lazy_start(setting, code, warm_cache, prefetch=False)
                    row(f"warm start: {name}", "coldbrew-unmounted", "root mounting the image (warm cache, hot layer)"
                        ).samples.append(elapsed * 1e3)
                    drop_caches()
                    row(f"warm start: {name}", "peer", "local disk").samples.append(
                        run_container(tree, code, workdir, read_only=True) * 1e3)
                    if progress:
                        progress(f"{name}: run {run + 1}/{runs}")
                result.targets.append(Target(f"first start: {name}", "coldbrew+profile", "time", "peer", "time",
                                             1 / FIRST_START_TARGETS[name],
                                             f"{FIRST_START_TARGETS[name]}x faster than download+unpack+start"))
                result.targets.append(Target(f"bytes fetched: {name}", "coldbrew", "bytes", "peer", "bytes", 1.25,
                                             "bytes fetched at most 1.25x the native working set"))
                result.targets.append(Target(f"warm start: {name}", "coldbrew", "time", "peer", "time", 1.2,
                                             "warm-cache start within 1.2x of local disk"))

            # sequential read and metadata walk through a container root (no hot layer: the data comes from FUSE)
            from coldbrew.fs.rootfs import create_root, remove_root

            directory = tempfile.mkdtemp(dir=workdir, prefix="walk-")
            root = create_root(setting.reference, directory, store=setting.store_url, cache_dir=warm_cache,
                               prefetch=False, hot=False)
            try:
                relative = os.path.relpath(largest, tree)
                subprocess.run(["cat", os.path.join(root, relative)], check=True, stdout=subprocess.DEVNULL)
                size_mb = os.path.getsize(largest) / 1e6
                for run in range(runs):
                    for peer, label, base in (("coldbrew", "container root, warm chunk cache", root), ("peer", "local disk", tree)):
                        drop_caches()
                        seconds = _timed(["dd", f"if={os.path.join(base, relative)}", "of=/dev/null", "bs=1M"],
                                         stderr=subprocess.DEVNULL)
                        row(f"sequential read {size_mb:.0f} MB", peer, label).samples.append(seconds * 1e3)
                    for peer, label, base in (("coldbrew", "container root on the mount", root), ("peer", "local disk", tree)):
                        drop_caches()
                        walk = ["find", base, "-printf", "%s %m %U\n"]
                        row("metadata walk, first", peer, label).samples.append(_timed(walk) * 1e3)
                        row("metadata walk, second", peer, label).samples.append(_timed(walk) * 1e3)
                result.targets.append(Target(f"sequential read {size_mb:.0f} MB", "coldbrew", "time", "peer", "time",
                                             2.0, "cached sequential reads at least half of local disk speed"))
            finally:
                remove_root(directory)
        result.warnings.append("the link's delay comes from a user-space packet queue (this kernel has no netem); "
                               "its rate from tbf")
    finally:
        _unmount_shared(shared)
        mount_server.terminate()
        mount_server.wait()
        server_log.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _mount_server_socket() -> str:
    from coldbrew.fs.daemon import MOUNT_SERVER_SOCKET

    return MOUNT_SERVER_SOCKET


def _wait_for_socket(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the mount server did not listen on {path} within {timeout:.0f} s")
        time.sleep(0.02)

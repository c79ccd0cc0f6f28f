"""The demo: build a busybox-static bundle with resource limits and run it with `coldbrew run`; then push the same
tree into a content-addressed store and run a container from the image reference on a lazy, writable root; then run
a program with a slow start twice under `coldbrew run --snapshot`: cold the first time, restored at its warm point
the second."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coldbrew.bench.bundles import busybox_config, make_rootfs, write_bundle

SCRIPT = r"""
echo "== hello from container $(hostname), pid $$"
echo "== namespaces (inode numbers differ from the host's):"
for ns in /proc/self/ns/*; do echo "   $(basename $ns) -> $(readlink $ns)"; done
echo "== cgroup limits:"
show() { [ -r "$2" ] && echo "   $1: $(cat $2)"; }
show memory /sys/fs/cgroup/memory/memory.limit_in_bytes; show memory /sys/fs/cgroup/memory.max
show pids /sys/fs/cgroup/pids/pids.max; show pids /sys/fs/cgroup/pids.max
show cpu-quota /sys/fs/cgroup/cpu/cpu.cfs_quota_us; show cpu /sys/fs/cgroup/cpu.max
echo "== capabilities: $(grep CapEff /proc/self/status)"
"""

# A program with a slow start and a warm point (the protocol of coldbrew.snapshot.warmpoint, from a shell).
WARM_SCRIPT = r"""
echo "== warming up: 3 s of start-up work"; sleep 3; token=$(cat /proc/sys/kernel/random/uuid)
answer=none
if [ -n "$COLDBREW_WARM_FD" ]; then echo ready >&3; read answer <&4; fi
echo "== warm ($answer); the token drawn while warming up: $token"
"""


def main() -> int:
    coldbrew = str(Path(sys.executable).parent / "coldbrew")
    with tempfile.TemporaryDirectory(prefix="coldbrew-demo-") as tmp:
        rootfs = make_rootfs(Path(tmp) / "rootfs")
        config = busybox_config(rootfs, ["sh", "-c", SCRIPT])
        config["hostname"] = "coldbrew-demo"
        config["linux"]["resources"].update({"memory": {"limit": 64 * 2**20}, "pids": {"limit": 64},
                                             "cpu": {"quota": 50000, "period": 100000}})
        write_bundle(Path(tmp), config)
        code = shell([coldbrew, "run", "--bundle", tmp, f"demo-{os.getpid()}"])
        if code:
            return code

        store, root = f"{tmp}/store", f"{tmp}/image-root"
        reference = shell([coldbrew, "fs", "push", "--store", store, str(rootfs)], capture=True)
        shell([coldbrew, "fs", "rootfs", reference, root, "--store", store, "--cache", f"{tmp}/cache"], capture=True)
        try:
            config["root"] = {"path": f"{root}/rootfs", "readonly": False}
            config["process"]["args"] = ["sh", "-c", "echo '== from image': && ls / && echo written > /hello"]
            image_bundle = Path(tmp) / "image-bundle"
            image_bundle.mkdir()
            write_bundle(image_bundle, config)
            code = shell([coldbrew, "run", "--bundle", str(image_bundle), f"demo-image-{os.getpid()}"])
            shell([coldbrew, "fs", "stats", f"{root}/image"])
            print(f"== the container's write landed in its own layer: {root}/upper/hello", flush=True)
        finally:
            shell([coldbrew, "fs", "rm-rootfs", root])
        if code:
            return code
        return warm_start_demo(coldbrew, Path(tmp), rootfs, store)


def warm_start_demo(coldbrew: str, tmp: Path, rootfs: Path, store: str) -> int:
    from coldbrew.snapshot import CriuNotFound, find_criu

    try:
        find_criu()
    except CriuNotFound as error:
        print(f"== no snapshot demo: {error}", flush=True)
        return 0
    bundle = tmp / "warm-bundle"
    bundle.mkdir()
    write_bundle(bundle, busybox_config(rootfs, ["sh", "-c", WARM_SCRIPT]))
    os.environ["COLDBREW_SNAPSHOT_CACHE"] = str(tmp / "snapshot-cache")
    key = f"demo-{os.getpid()}"
    for attempt in ("cold: snapshot at the warm point", "restored from the snapshot"):
        print(f"== run --snapshot {key}, {attempt}", flush=True)
        started = time.perf_counter()
        code = shell([coldbrew, "run", "--snapshot", key, "--snapshot-store", store, "--bundle", str(bundle),
                      f"demo-warm-{os.getpid()}"])
        print(f"== {time.perf_counter() - started:.2f} s", flush=True)
        if code:
            return code
    return 0


def shell(argv: list[str], capture: bool = False) -> str | int:
    """Run a command, showing it first; returns its output (capture) or its exit status."""
    print("$ " + " ".join(argv).replace(str(Path(argv[0]).parent) + "/", ""), flush=True)
    if capture:
        output = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
        print(output, flush=True)
        return output
    return subprocess.run(argv).returncode


if __name__ == "__main__":
    sys.exit(main())

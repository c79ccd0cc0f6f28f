"""The demo: build a busybox-static bundle with resource limits and run it with `coldbrew run`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


def main() -> int:
    coldbrew = str(Path(sys.executable).parent / "coldbrew")
    with tempfile.TemporaryDirectory(prefix="coldbrew-demo-") as tmp:
        rootfs = make_rootfs(Path(tmp) / "rootfs")
        config = busybox_config(rootfs, ["sh", "-c", SCRIPT])
        config["hostname"] = "coldbrew-demo"
        config["linux"]["resources"].update({"memory": {"limit": 64 * 2**20}, "pids": {"limit": 64},
                                             "cpu": {"quota": 50000, "period": 100000}})
        write_bundle(Path(tmp), config)
        print(f"$ coldbrew run --bundle {tmp} demo-{os.getpid()}", flush=True)
        return subprocess.run([coldbrew, "run", "--bundle", tmp, f"demo-{os.getpid()}"]).returncode


if __name__ == "__main__":
    sys.exit(main())

"""OCI bundles from busybox-static: the root filesystem of the demo, the tests and the start-up benchmark."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

BUSYBOX = "/bin/busybox"


def make_rootfs(path: Path) -> Path:
    """A minimal root filesystem: busybox-static and a symlink per applet, /etc/passwd and /etc/group."""
    if not os.path.exists(BUSYBOX):
        raise FileNotFoundError(f"{BUSYBOX} is missing: install Debian's busybox-static (scripts/setup does)")
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)  # every uid in the container must be able to walk from /
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (path / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = path / "bin" / applet
        if applet != "busybox" and not link.is_symlink():
            link.symlink_to("busybox")
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.chmod(path / "tmp", 0o1777)
    return path


def busybox_config(rootfs: Path, args: list[str]) -> dict:
    """`coldbrew spec`'s defaults with a read-only busybox root, no terminal, and `args` to run."""
    from coldbrew.runtime.features import default_spec

    config = copy.deepcopy(default_spec())
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    return config


def write_bundle(bundle: Path, config: dict) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle

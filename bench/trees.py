"""Realistic image trees for the filesystem benchmark, built once and cached outside the repository.

- `torch_tree()`: a Debian bookworm userland (mmdebstrap minbase with Python) with torch and numpy pip-installed in
  it: about 1.2 GB and 36k entries, the tree the lazy-filesystem benchmark mounts.
- `python_env_versions()`: two versions of a smaller Python tree, before and after adding one package, for measuring
  dedupe between image versions.
- `native_working_set(tree, argv)`: bytes of the tree a command reads when run natively (chroot) from a cold page
  cache: the floor for bytes a lazy mount must fetch.

A tree counts as built only when its marker file (`<tree>.complete`, beside it, so the tree itself is not touched)
exists and records the same recipe; a half-built tree from an interrupted run is removed and rebuilt.

pip inside a tree is given the host's CA bundle and pip settings (the registry is reached through a proxy whose CA
only the host's bundle has); local wheel folders and file:// indexes named by the host's settings are bind-mounted
read-only at the same paths for the duration of the install. Every chroot runs in a private mount namespace
(/proc, /sys, /dev and those binds live only in it), so nothing stays mounted when it ends, even after a crash.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

from coldbrew.runtime import libc

DEFAULT_ROOT = "/var/cache/coldbrew-bench"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
# The +cpu local label keeps pip from choosing a CUDA build of the same version from the registry.
TORCH_REQUIREMENTS = ("torch==2.13.0+cpu", "numpy")
ENV_BEFORE_REQUIREMENTS = ("numpy==2.3.5", "requests==2.34.2", "jinja2==3.1.6", "pyyaml==6.0.3", "click==8.5.0")
ENV_ADDED_REQUIREMENT = "pandas==2.3.3"

HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
HOST_PIP_CONFIGS = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"),
                    os.path.expanduser("~/.pip/pip.conf"))
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_DEFAULT_TIMEOUT": "180",
}
_FINCORE_BATCH = 2000


class TreeError(Exception):
    """A tree could not be built or a command in it failed; the message carries the command's output tail."""


def torch_tree(path: str = f"{DEFAULT_ROOT}/torch") -> str:
    """The Debian + Python + torch + numpy tree at `path`, built if it is not there yet (a few minutes)."""
    recipe = {"base": _base_recipe(), "pip": list(TORCH_REQUIREMENTS)}
    with _building(path):
        if not _is_complete(path, recipe):
            base = debian_python_tree()
            _start_building(path)
            _copy_tree(base, path)
            _pip_install(path, TORCH_REQUIREMENTS)
            run_in_tree(path, ["python3", "-c", "import torch, numpy"])
            _mark_complete(path, recipe | {"installed": _pip_freeze(path)})
    return path


def python_env_versions(path: str = f"{DEFAULT_ROOT}/python-env") -> tuple[str, str]:
    """Two versions of one Python image, `path/before` and `path/after`: `after` is a copy of `before` with one
    more package pip-installed into it, as an image rebuilt after adding a dependency."""
    before, after = os.path.join(path, "before"), os.path.join(path, "after")
    recipe_before = {"base": _base_recipe(), "pip": list(ENV_BEFORE_REQUIREMENTS)}
    recipe_after = recipe_before | {"added": ENV_ADDED_REQUIREMENT}
    with _building(path):
        rebuilt = not _is_complete(before, recipe_before)
        if rebuilt:
            base = debian_python_tree()
            _start_building(before)
            _copy_tree(base, before)
            _pip_install(before, ENV_BEFORE_REQUIREMENTS)
            _mark_complete(before, recipe_before | {"installed": _pip_freeze(before)})
        if rebuilt or not _is_complete(after, recipe_after):
            _start_building(after)
            _copy_tree(before, after)
            _pip_install(after, (ENV_ADDED_REQUIREMENT,))
            _mark_complete(after, recipe_after | {"installed": _pip_freeze(after)})
    return before, after


def debian_python_tree(path: str = f"{DEFAULT_ROOT}/debian-python") -> str:
    """mmdebstrap's minbase bookworm with Python, pip and the host's CA bundle and pip settings (20-30 s)."""
    recipe = _base_recipe()
    with _building(path):
        if not _is_complete(path, recipe):
            _start_building(path)
            _run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                  path])
            shutil.copyfile(HOST_CA_BUNDLE, os.path.join(path, HOST_CA_BUNDLE.lstrip("/")))
            with open(os.path.join(path, "etc/pip.conf"), "w") as file:
                _host_pip_config().write(file)
            _mark_complete(path, recipe)
    return path


def drop_caches() -> None:
    """Empty the whole machine's page cache (after writing back what is dirty): the next reads are cold."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as file:
        file.write("3")


def native_working_set(tree: str, argv: Sequence[str]) -> int:
    """Bytes of `tree`'s files resident in the page cache after running `argv` chrooted into it from a cold cache.

    Drops the page cache of the whole machine first. Hard links count once."""
    drop_caches()
    run_in_tree(tree, argv)
    return resident_bytes(tree)


def resident_bytes(tree: str) -> int:
    """Sum of the page-cache-resident bytes of every regular file under `tree` (util-linux `fincore`)."""
    files: list[str] = []
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, names in os.walk(tree):
        for name in names:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            if not stat.S_ISREG(info.st_mode) or info.st_size == 0 or (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            files.append(full)
    total = 0
    for start in range(0, len(files), _FINCORE_BATCH):
        batch = files[start:start + _FINCORE_BATCH]
        output = _run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", "--", *batch])
        total += sum(int(line) for line in output.split())
    return total


def run_in_tree(tree: str, argv: Sequence[str], binds: Sequence[str] = ()) -> str:
    """Run `argv` chrooted into `tree` with /proc, /sys and /dev mounted (and `binds`, host paths mounted read-only
    at the same place) in a private mount namespace; returns its output, raises TreeError on failure."""
    tree = os.path.abspath(tree)
    created: list[str] = []
    for path in binds:
        parts = Path(path).parts[1:]
        for depth in range(1, len(parts) + 1):
            folder = os.path.join(tree, *parts[:depth])
            if not os.path.lexists(folder):
                os.mkdir(folder)
                created.append(folder)
    try:
        return _run(list(argv), preexec_fn=lambda: _enter_tree(tree, binds), env=CHROOT_ENV)
    finally:
        # Only the mount points made here go; the binds themselves vanished with the child's mount namespace.
        for folder in reversed(created):
            os.rmdir(folder)


def _enter_tree(tree: str, binds: Sequence[str]) -> None:
    """In the child after fork: a private mount namespace with the pseudo filesystems and binds, then chroot."""
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    libc.mount("proc", _inside(tree, "/proc"), "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)
    libc.mount("/sys", _inside(tree, "/sys"), None, libc.MS_BIND | libc.MS_REC)
    libc.mount("/dev", _inside(tree, "/dev"), None, libc.MS_BIND | libc.MS_REC)
    # Name resolution for pip, without writing the host's resolver settings into the image.
    resolv = _inside(tree, "/etc/resolv.conf")
    if os.path.exists("/etc/resolv.conf") and os.path.isfile(resolv) and not os.path.islink(resolv):
        libc.mount("/etc/resolv.conf", resolv, None, libc.MS_BIND)
    for path in binds:
        target = _inside(tree, path)
        libc.mount(path, target, None, libc.MS_BIND | libc.MS_REC)
        libc.mount(None, target, None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY)
    os.chroot(tree)
    os.chdir("/")


def _pip_install(tree: str, requirements: Sequence[str]) -> None:
    run_in_tree(tree, ["python3", "-m", "pip", "install", "--quiet", "--no-cache-dir", "--break-system-packages",
                       *requirements], binds=_local_package_sources())


def _pip_freeze(tree: str) -> list[str]:
    return run_in_tree(tree, ["python3", "-m", "pip", "freeze"]).split()


def _host_pip_config() -> configparser.ConfigParser:
    """The host's pip settings merged (global, then user, then PIP_FIND_LINKS), as one /etc/pip.conf."""
    config = configparser.ConfigParser()
    config.read([path for path in HOST_PIP_CONFIGS if os.path.exists(path)])
    if not config.has_section("global"):
        config.add_section("global")
    if os.environ.get("PIP_FIND_LINKS"):
        config.set("global", "find-links", os.environ["PIP_FIND_LINKS"])
    config.set("global", "cert", HOST_CA_BUNDLE)
    return config


def _local_package_sources() -> list[str]:
    """Host folders pip's settings read packages from: find-links folders, and for each file:// simple index the
    folder above it (its pages link to `../../files/...`)."""
    config = _host_pip_config()
    sources: list[str] = []
    for option, above in (("find-links", False), ("index-url", True), ("extra-index-url", True)):
        for location in config.get("global", option, fallback="").split():
            path = urlparse(location).path if location.startswith("file:") else location
            if not path.startswith("/"):
                continue
            folder = os.path.dirname(path.rstrip("/")) if above else path
            if os.path.isdir(folder) and folder not in sources:
                sources.append(folder)
    return sources


def _base_recipe() -> dict:
    return {"suite": SUITE, "variant": "minbase", "include": list(BASE_PACKAGES)}


@contextlib.contextmanager
def _building(path: str) -> Iterator[None]:
    """Hold `<path>.lock`: two benchmark runs never build (or check) the same tree at once."""
    os.makedirs(os.path.dirname(path.rstrip("/")), exist_ok=True)
    with open(path.rstrip("/") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _marker(path: str) -> Path:
    return Path(path.rstrip("/") + ".complete")


def _is_complete(path: str, recipe: dict) -> bool:
    try:
        recorded = json.loads(_marker(path).read_text())
    except (FileNotFoundError, ValueError):
        return False
    return os.path.isdir(path) and all(recorded.get(key) == value for key, value in recipe.items())


def _start_building(path: str) -> None:
    """Forget any earlier (possibly half-built) tree at `path`."""
    _marker(path).unlink(missing_ok=True)
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.makedirs(os.path.dirname(path.rstrip("/")), exist_ok=True)


def _mark_complete(path: str, recipe: dict) -> None:
    _marker(path).write_text(json.dumps(recipe, indent=1) + "\n")


def _copy_tree(source: str, target: str) -> None:
    # cp keeps hard links, xattrs, device nodes and sparseness, which shutil.copytree does not.
    _run(["cp", "-a", "--reflink=auto", source, target])


def _inside(tree: str, path: str) -> str:
    return os.path.join(tree, path.lstrip("/"))


def _run(argv: list[str], **kwargs) -> str:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if result.returncode != 0:
        raise TreeError(f"{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''} exited with {result.returncode}:"
                        f"\n{result.stdout[-3000:]}")
    return result.stdout

"""`coldbrew fs ...`: push a tree, mount an image, make a container root, read a mount's statistics.

Not on a container's start path, so argparse is fine here; the heavy modules are still imported per command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import FsError

DEFAULT_STORE = "/var/lib/coldbrew/store"


def _size(text: str) -> int:
    """A byte count: 1073741824, 512M, 20G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 20G)") from None


def store_option() -> argparse.ArgumentParser:
    """A parent parser with `--store` (default $COLDBREW_STORE, else DEFAULT_STORE), for every command group."""
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=os.environ.get("COLDBREW_STORE", DEFAULT_STORE),
                       help="chunk store: a directory or an http(s) URL (default $COLDBREW_STORE or %(default)s)")
    return store


def _parser() -> argparse.ArgumentParser:
    from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE

    parser = argparse.ArgumentParser(prog="coldbrew fs", description="the lazy, content-addressed image filesystem")
    store = store_option()
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache", default=DEFAULT_CACHE_DIR, help="local chunk cache directory (%(default)s)")
    cache.add_argument("--cache-size", type=_size, default=DEFAULT_CACHE_SIZE, help="cache size limit, e.g. 20G")
    cache.add_argument("--record-profile", action="store_true",
                       help="record the chunks this mount reads and save them as the image's start-up profile")
    cache.add_argument("--no-prefetch", action="store_true", help="do not prefetch the image's start-up profile")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    push = commands.add_parser("push", parents=[store, output], help="store a directory tree, print its reference")
    push.add_argument("tree")
    push.add_argument("--quiet", action="store_true", help="no progress bar")

    mount = commands.add_parser("mount", parents=[store, cache], help="mount an image read-only")
    mount.add_argument("reference")
    mount.add_argument("mountpoint")
    mount.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")

    umount = commands.add_parser("umount", help="unmount an image (saves a recorded profile)")
    umount.add_argument("mountpoint")

    stats = commands.add_parser("stats", parents=[output], help="bytes fetched, cache hits, chunks of a mount")
    stats.add_argument("mountpoint")

    serve = commands.add_parser("serve", help="run this host's mount server: mounts fork from it, ready in ms "
                                              "(runs until SIGTERM; without it each mount starts a new process)")
    serve.add_argument("--socket", default=None, help="where it listens (default $COLDBREW_MOUNT_SERVER or /run/coldbrew/fs/mount-server.sock)")

    rootfs = commands.add_parser("rootfs", parents=[store, cache],
                                 help="a writable container root (overlayfs over the image) in DIR/rootfs")
    rootfs.add_argument("reference")
    rootfs.add_argument("directory")
    rootfs.add_argument("--no-hot-layer", action="store_true",
                        help="do not stack (or build) the local hot layer of the image's start-up profile")
    rootfs.add_argument("--keep-mounted", type=float, metavar="SECONDS",
                        help="stack the root on the host's shared layers of the image, kept mounted SECONDS after "
                             "their last root goes (the next root of the image mounts in a millisecond)")

    remove = commands.add_parser("rm-rootfs", help="take down a container root made by `rootfs`")
    remove.add_argument("directory")
    return parser


class _Progress:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._started = time.monotonic()
        self._shown = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._shown < 0.1 and done < total:
            return
        self._shown = now
        fraction = done / total if total else 1.0
        bar = "#" * int(fraction * 30)
        rate = done / max(now - self._started, 1e-6) / 1e6
        sys.stderr.write(f"\r{self._label} [{bar:<30}] {fraction:4.0%} {done / 1e6:,.0f}/{total / 1e6:,.0f} MB "
                         f"{rate:,.0f} MB/s")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")


def _push(args: argparse.Namespace) -> int:
    from .pushing import push
    from .store import open_store

    progress = _Progress("push") if not args.quiet and not args.json and sys.stderr.isatty() else None
    started = time.monotonic()
    result = push(args.tree, open_store(args.store), progress=progress)
    if progress:
        progress.finish()
    if args.json:
        print(json.dumps(dict(vars(result), seconds=round(time.monotonic() - started, 3), store=args.store)))
    else:
        print(result.reference)
    return 0


def _mount_options(args: argparse.Namespace) -> dict:
    return {"store": args.store, "cache_dir": args.cache, "cache_size": args.cache_size,
            "record_profile": args.record_profile, "prefetch": not args.no_prefetch}


def _mount(args: argparse.Namespace) -> int:
    from .daemon import mount

    mount(args.reference, args.mountpoint, foreground=args.foreground, **_mount_options(args))
    return 0


def _umount(args: argparse.Namespace) -> int:
    from .daemon import unmount

    unmount(args.mountpoint)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .daemon import mount_stats

    stats = mount_stats(args.mountpoint)
    if args.json:
        print(json.dumps(stats))
    else:
        width = max(map(len, stats))
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .daemon import MOUNT_SERVER_SOCKET, serve_mounts

    return serve_mounts(args.socket or MOUNT_SERVER_SOCKET)


def _rootfs(args: argparse.Namespace) -> int:
    from .rootfs import create_root

    print(create_root(args.reference, args.directory, hot=not args.no_hot_layer, keep_mounted=args.keep_mounted,
                      **_mount_options(args)))
    return 0


def _remove_rootfs(args: argparse.Namespace) -> int:
    from .rootfs import remove_root

    remove_root(args.directory)
    return 0


_COMMANDS = {"push": _push, "mount": _mount, "umount": _umount, "stats": _stats, "serve": _serve, "rootfs": _rootfs,
             "rm-rootfs": _remove_rootfs}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except FsError as error:
        sys.stderr.write(f"coldbrew fs: {error}\n")
        return 1
    except OSError as error:
        sys.stderr.write(f"coldbrew fs: {error.strerror or error}" + (f": {error.filename}" if error.filename else "")
                         + "\n")
        return 1
    except KeyboardInterrupt:
        return 130

"""`coldbrew image build|import|ls|bundle|rm-bundle`: build images defined in Python files, import OCI images, list
named images, and make an OCI bundle (a lazily mounted root with a writable layer) that `coldbrew run` takes.

Not on a container's start path: argparse is fine; the builder and the filesystem are imported per command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from coldbrew.fs.cli import store_option


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldbrew image", description="build, import, list and run images")
    store = store_option()
    building = argparse.ArgumentParser(add_help=False)
    building.add_argument("--cache", default=None, help="chunk cache of the steps' mounts (coldbrew fs's default)")
    building.add_argument("--work-dir", default=None, help="where step roots are made (/var/tmp/coldbrew-build)")
    building.add_argument("--log", default=None, help="also write the whole build log (steps' output included) here")
    building.add_argument("--quiet", action="store_true", help="no progress; print only the reference")
    building.add_argument("--json", action="store_true", help="print the result as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", parents=[store, building], help="build FILE.py:NAME (an Image in a file)")
    build.add_argument("target", metavar="FILE.py:NAME")
    build.add_argument("--name", default=None, help="record the image under this name (default NAME)")
    build.add_argument("--force", action="store_true", help="rebuild every step")
    build.add_argument("--step-timeout", type=float, default=None, help="seconds a step's container may run")

    imports = commands.add_parser("import", parents=[store, building],
                                  help="import an OCI image layout directory, oci-archive or docker-archive")
    imports.add_argument("path", help="PATH or PATH:NAME (an image name or tag inside it)")
    imports.add_argument("--name", default=None, help="record the image under this name (default: from PATH)")

    listing = commands.add_parser("ls", parents=[store], help="list named images")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    bundle = commands.add_parser("bundle", parents=[store], help="an OCI bundle in DIR whose root is the image "
                                                                 "mounted lazily with a writable layer")
    bundle.add_argument("image", metavar="REF", help="an image reference or name")
    bundle.add_argument("directory", metavar="DIR")
    bundle.add_argument("--cache", default=None, help="chunk cache of the mount (coldbrew fs's default)")
    bundle.add_argument("--net", choices=("none", "host"), default="none",
                        help="none: loopback only (default); host: the host's network namespace")
    bundle.add_argument("--tty", action="store_true", help="process.terminal (needs a console socket to run)")
    bundle.epilog = "After `--`, a command to run instead of the image's cmd."

    remove = commands.add_parser("rm-bundle", help="take down a bundle made by `bundle`")
    remove.add_argument("directory", metavar="DIR")
    return parser


def _load_image(target: str) -> tuple[object, str]:
    """The Image named NAME in FILE.py (the file is run as a script is, with its directory first on sys.path)."""
    import runpy

    from .image import Image, ImageDefinitionError

    path, separator, name = target.rpartition(":")
    if not separator or not path or not name:
        raise ImageDefinitionError(f"{target!r}: expected FILE.py:NAME")
    if not os.path.isfile(path):
        raise ImageDefinitionError(f"{path}: no such file")
    directory = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, directory)
    cwd = os.getcwd()
    try:
        os.chdir(directory)  # relative paths in the file (add_local_dir("./src")) are the file's
        try:
            namespace = runpy.run_path(os.path.abspath(path), run_name="__coldbrew_image__")
        except ImageDefinitionError as error:
            raise ImageDefinitionError(f"{path}: {error}") from None
        except Exception as error:  # the file is the user's program: report what it raised, in one line
            raise ImageDefinitionError(f"{path} raised {type(error).__name__}: {error}") from None
    finally:
        os.chdir(cwd)
        sys.path.remove(directory)
    if name not in namespace:
        raise ImageDefinitionError(f"{path} defines no {name!r}")
    image = namespace[name]
    if not isinstance(image, Image):
        raise ImageDefinitionError(f"{path}: {name} is a {type(image).__name__}, not an Image")
    return image, name


def _build_options(args: argparse.Namespace, log: object) -> dict:
    options: dict = {"progress": not args.quiet and not args.json, "log": log}
    if args.cache:
        options["cache_dir"] = args.cache
    if args.work_dir:
        options["work_dir"] = args.work_dir
    return options


def _report(args: argparse.Namespace, result: object) -> None:
    from .build import dedupe_report
    from coldbrew.fs.store import open_store

    if args.json:
        from dataclasses import asdict

        print(json.dumps({"reference": result.reference, "name": result.name, "seconds": round(result.seconds, 3),
                          "config": result.config.to_json(), "steps": [asdict(step) for step in result.steps]}))
        return
    print(result.reference)
    if args.quiet:
        return
    dedupe = dedupe_report(open_store(args.store), [step.reference for step in result.steps])
    built = len(result.steps) - result.cached_steps
    sys.stderr.write(f"{len(result.steps)} steps ({built} built, {result.cached_steps} cached) in "
                     f"{result.seconds:.1f} s; the steps' trees hold {dedupe.tree_bytes / 1e6:,.1f} MB together, "
                     f"stored once as {dedupe.unique_bytes / 1e6:,.1f} MB of distinct chunks, "
                     f"{dedupe.stored_bytes / 1e6:,.1f} MB compressed ({dedupe.ratio:.1f}x)\n")


def _run_build(args: argparse.Namespace, image: object, name: str | None, force: bool = False) -> int:
    log = open(args.log, "w") if args.log else None
    try:
        result = image.build(args.store, name=name, force_build=force,
                             step_timeout=getattr(args, "step_timeout", None), **_build_options(args, log))
    finally:
        if log is not None:
            log.close()
    _report(args, result)
    return 0


def _build(args: argparse.Namespace) -> int:
    image, name = _load_image(args.target)
    return _run_build(args, image, args.name or name, args.force)


def _import(args: argparse.Namespace) -> int:
    from .image import Image

    path, inner = args.path, None
    if not os.path.exists(path):  # PATH:NAME, the name possibly holding colons itself (repo:tag)
        for position, character in enumerate(args.path):
            if character == ":" and os.path.exists(args.path[:position]):
                path, inner = args.path[:position], args.path[position + 1:]
                break
    name = args.name or re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.abspath(path)).split(".")[0]
                               + (f"-{inner}" if inner else "")).strip("-._") or None
    return _run_build(args, Image.from_oci(path, name=inner or None), name)


def _ls(args: argparse.Namespace) -> int:
    from coldbrew.fs.store import open_store

    from .cache import StepCache

    images = StepCache(open_store(args.store)).images()
    if args.json:
        print(json.dumps([{"name": image.name, "reference": image.reference, "built_at": image.built_at,
                           "file_bytes": image.file_bytes, "steps": image.steps} for image in images]))
        return 0
    rows = [("NAME", "REFERENCE", "BUILT", "SIZE", "STEPS")]
    for image in images:
        rows.append((image.name, image.reference[:16], time.strftime("%Y-%m-%d %H:%M", time.localtime(image.built_at)),
                     f"{image.file_bytes / 1e6:,.1f} MB", str(len(image.steps))))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from .build import make_bundle

    print(make_bundle(args.store, args.image, args.directory, args=args.args or None, network=args.net,
                      terminal=args.tty, cache_dir=args.cache))
    return 0


def _remove_bundle(args: argparse.Namespace) -> int:
    from .build import remove_bundle

    remove_bundle(args.directory)
    return 0


_COMMANDS = {"build": _build, "import": _import, "ls": _ls, "bundle": _bundle, "rm-bundle": _remove_bundle}


def main(argv: list[str]) -> int:
    argv = list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[: len(argv) - len(command) - 1] if "--" in argv else argv)
    args.args = command
    from coldbrew.fs.errors import FsError

    from .image import ImageBuildError

    try:
        return _COMMANDS[args.command](args)
    except (ImageBuildError, FsError) as error:
        sys.stderr.write(f"coldbrew image: {error}\n")
        return 1
    except OSError as error:
        from coldbrew.runtime.errors import describe_os_error

        sys.stderr.write(f"coldbrew image: {describe_os_error(error)}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

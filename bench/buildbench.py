"""`python -m coldbrew.bench build`: the image builder on the issue's example image.

    Image.debian_slim(python="3.11").apt_install("git", "curl").pip_install("numpy==2.1.*", "torch==2.13.0")
         .env({"HF_HOME": "/cache"}).run_commands("python -c 'import numpy'").add_local_dir(SRC, "/app")
         .workdir("/app")

(torch only where its wheel lies in the local wheel folder, /opt/wheels.) Measured, in a fresh store and chunk
cache under the work directory:
- cold: the whole build from nothing, the Debian base (mmdebstrap) included, each step's time and push time;
- cached: the same build again, every step a cache hit (the target: under 1 s), `--runs` times;
- stored bytes against the sum of the steps' trees: each step's image is a whole tree, unchanged files are stored
  once; the store directory's size on disk beside it;
- push of one step's image both ways (`--compare-push`): the run_commands step over the numpy/torch tree rebuilt
  with its index made from the parent's and the overlay's upper directory ("layer"), and by pushing the whole
  merged tree through the mount ("full").
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import time
from typing import Any, Callable

from .report import Result, Row, render_table

WORKDIR = "/var/cache/coldbrew-bench/buildbench"
CACHED_TARGET_SECONDS = 1.0


def local_torch_requirement(wheels: str = "/opt/wheels") -> str | None:
    """`torch==VERSION` when a CPython 3.11 torch wheel lies in the local wheel folder, else None."""
    for path in sorted(glob.glob(os.path.join(wheels, "torch-*-cp311-cp311-*.whl"))):
        match = re.match(r"torch-([0-9][0-9.]*)", os.path.basename(path))
        if match:
            return f"torch=={match.group(1).rstrip('.')}"
    return None


def example_image(app_dir: str, torch: str | None) -> Any:
    from coldbrew.imagebuild import Image

    packages = ["numpy==2.1.*"] + ([torch] if torch else [])
    return (Image.debian_slim(python="3.11")
            .apt_install("git", "curl")
            .pip_install(*packages)
            .env({"HF_HOME": "/cache"})
            .run_commands("python -c 'import numpy'")
            .add_local_dir(app_dir, "/app")
            .workdir("/app"))


def _make_app(path: str) -> None:
    os.makedirs(os.path.join(path, "pkg"), exist_ok=True)
    with open(os.path.join(path, "main.py"), "w") as file:
        file.write("import numpy\nprint(numpy.__version__)\n")
    with open(os.path.join(path, "pkg", "__init__.py"), "w") as file:
        file.write("VALUE = 1\n")


def _disk_usage(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _forced(image: Any, number: int) -> Any:
    """The image with step `number` (1-based) built again whatever the cache holds."""
    from dataclasses import replace

    from coldbrew.imagebuild import Image

    steps = list(image.steps)
    steps[number - 1] = replace(steps[number - 1], force_build=True)
    return Image(tuple(steps))


def run_buildbench(runs: int = 5, *, torch: bool = True, compare_push: bool = True, workdir: str = WORKDIR,
                   progress: Callable[[str], None] | None = None) -> tuple[Result, str]:
    """Build the example image cold, then cached `runs` times; returns the timing rows and the report text."""
    from coldbrew.fs.store import open_store
    from coldbrew.imagebuild.build import build_image, dedupe_report

    say = progress or (lambda text: None)
    shutil.rmtree(workdir, ignore_errors=True)
    store_dir, cache_dir, work, app = (os.path.join(workdir, name) for name in ("store", "cache", "work", "app"))
    _make_app(app)
    requirement = local_torch_requirement() if torch else None
    image = example_image(app, requirement)
    options = {"cache_dir": cache_dir, "work_dir": work}
    log_path = os.path.join(workdir, "build.log")
    result = Result(bench="build", runs=runs, warmup=0, baseline=("cold", "seconds"))
    try:
        say(f"cold build of the example image ({'with ' + requirement if requirement else 'without torch'}), "
            f"log in {log_path}")
        with open(log_path, "w") as log:
            started = time.monotonic()
            cold = build_image(image, store_dir, log=log, **options)
            cold_seconds = time.monotonic() - started
        result.rows.append(Row("build", "cold", "seconds", "cold (empty store, Debian base included)", "s",
                               [cold_seconds]))
        cached = []
        for run in range(runs):
            started = time.monotonic()
            again = build_image(image, store_dir, **options)
            cached.append(time.monotonic() - started)
            if again.cached_steps != len(again.steps) or again.reference != cold.reference:
                raise RuntimeError(f"cached run {run + 1} rebuilt a step")
        result.rows.append(Row("build", "cached", "seconds", "fully cached (every step a hit)", "s", cached))
        store = open_store(store_dir)
        dedupe = dedupe_report(store, [step.reference for step in cold.steps])
        lines = ["", "cold build, step by step:"]
        width = max(len(step.step) for step in cold.steps)
        for step in cold.steps:
            lines.append(f"  {step.number}. {step.step:<{width}}  {step.seconds:7.1f} s  (push {step.push_seconds:5.1f}"
                         f" s)  tree {step.file_bytes / 1e6:8.1f} MB  {step.entries:6d} entries  "
                         f"+{step.uploaded_bytes / 1e6:7.1f} MB stored")
        on_disk = _disk_usage(store_dir)
        figures = [(f"sum of the {dedupe.steps} steps' trees", dedupe.tree_bytes, ""),
                   ("distinct chunks (each stored once)", dedupe.unique_bytes, ""),
                   ("stored, compressed, with the indexes", dedupe.stored_bytes,
                    f"  ({dedupe.ratio:.1f}x less than the sum of the trees)"),
                   ("the store directory on disk", on_disk, ""),
                   ("the final image's tree alone", cold.steps[-1].file_bytes, "")]
        lines += ["", "stored size against the steps' trees:"]
        lines += [f"  {label:<38} {size / 1e6:10.1f} MB{note}" for label, size, note in figures]
        p50 = result.row("build", "cached", "seconds").p50
        lines.append(f"target: fully cached rebuild under {CACHED_TARGET_SECONDS:.0f} s: p50 {p50 * 1000:.0f} ms "
                     f"{'met' if p50 < CACHED_TARGET_SECONDS else 'MISSED'}")
        if compare_push:
            number = next(step.number for step in cold.steps if step.step.startswith("run_commands"))
            lines += ["", f"push of step {number} ({cold.steps[number - 1].step}) over a "
                          f"{cold.steps[number - 2].file_bytes / 1e6:.0f} MB tree, rebuilt with force_build:"]
            for mode in ("layer", "full"):
                say(f"step {number} again, pushed as {mode}")
                rebuilt = build_image(_forced(image, number), store_dir, push_mode=mode, **options)
                step = rebuilt.steps[number - 1]
                result.rows.append(Row("push", mode, "seconds", f"step {number} push: {mode}", "s",
                                       [step.push_seconds]))
                lines.append(f"  {mode:5s}: step {step.seconds:6.1f} s, of which push {step.push_seconds:6.2f} s")
        result.settings = {"torch": requirement or "no", "cached runs": runs, "store": store_dir}
        return result, "\n".join(lines) + "\n"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_parser(benches: Any) -> argparse.ArgumentParser:
    """The `build` subcommand of `python -m coldbrew.bench`."""
    parser = benches.add_parser("build", help="image build: the example image cold and fully cached, stored bytes "
                                              "against its steps' trees (minutes: mmdebstrap, apt, pip)")
    parser.add_argument("--runs", type=int, default=5, help="fully cached builds timed; default 5")
    parser.add_argument("--no-torch", action="store_true", help="leave torch out even if its wheel is local")
    parser.add_argument("--no-compare-push", action="store_true", help="skip the layer / full push comparison")
    parser.add_argument("--workdir", default=WORKDIR, help=f"store, cache and log (emptied first; {WORKDIR})")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    return parser


def main(args: argparse.Namespace) -> int:
    result, text = run_buildbench(args.runs, torch=not args.no_torch, compare_push=not args.no_compare_push,
                                  workdir=args.workdir, progress=lambda line: sys.stderr.write(line + "\n"))
    sys.stdout.write(render_table(result) + text)
    if args.json:
        result.write_json(args.json)
    return 0 if result.row("build", "cached", "seconds").p50 < CACHED_TARGET_SECONDS else 1


if __name__ == "__main__":
    top = argparse.ArgumentParser(prog="python -m coldbrew.bench.buildbench")
    add_parser(top.add_subparsers(dest="bench", required=True))
    sys.exit(main(top.parse_args(["build", *sys.argv[1:]])))

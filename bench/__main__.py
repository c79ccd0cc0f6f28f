"""`python -m coldbrew.bench startup|fs|chunking|build|restore|gpusnap ...`: benchmarks beside the peers."""

from __future__ import annotations

import argparse
import importlib
import sys

from .report import render_table
from .startup import RUNC, BenchError, coldbrew_binary, default_peers, run_startup


# Benchmarks that bring their own subcommand: `add_parser(subparsers)` and `main(args) -> int`.
_MODULES = {"build": "coldbrew.bench.buildbench", "restore": "coldbrew.bench.restore",
            "gpusnap": "coldbrew.bench.gpusnap"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coldbrew.bench", description="coldbrew's benchmarks, beside peers.")
    benches = p.add_subparsers(dest="bench", required=True)
    s = benches.add_parser("startup", help="start-up of a /bin/true container: runc, coldbrew's CLI, in-process")
    s.add_argument("--runs", type=int, default=50, help="measured rounds (each peer once a round); default 50")
    s.add_argument("--warmup", type=int, default=3, help="rounds run first and not recorded; default 3")
    s.add_argument("--json", metavar="FILE", help="also write every row, with its samples, to FILE")
    s.add_argument("--runc", default=RUNC, help=f"the runc binary (default {RUNC})")
    s.add_argument("--coldbrew", default=None, help=f"the coldbrew console script (default {coldbrew_binary()})")
    s.add_argument("--floors", action="store_true",
                   help="also time a bare `python -I -S -c pass` and `coldbrew --version`")
    s.add_argument("--seed", type=int, default=None, help="seed of the per-round shuffle (default: random)")
    s.add_argument("--gap-ms", type=float, default=0.0,
                   help="idle milliseconds before each sample, so that every start is an isolated one (default 0)")
    s.add_argument("--workdir", default="/run", help="where bundles and state roots go (default /run)")
    c = benches.add_parser("chunking", help="dedupe and start-up fetch of each chunking strategy")
    c.add_argument("before", help="a tree")
    c.add_argument("after", help="the same tree with a change (e.g. one more pip package)")
    c.add_argument("--command", help="a command run chrooted in AFTER from a cold page cache: its working set")
    f = benches.add_parser("fs", help="the lazy image filesystem beside download+unpack and local disk "
                                       "(builds a Debian + PyTorch tree first; minutes)")
    f.add_argument("--runs", type=int, default=3, help="rounds per scenario; default 3")
    f.add_argument("--command", action="append", choices=["print(1)", "import numpy", "import torch"],
                   help="only these start-up commands (repeatable; default all three)")
    f.add_argument("--json", metavar="FILE", help="also write every row, with its samples, to FILE")
    for module in _MODULES.values():
        importlib.import_module(module).add_parser(benches)
    return p


def _fs(args: argparse.Namespace) -> int:
    from .fsbench import run_fsbench

    result = run_fsbench(args.runs, args.command, progress=lambda text: sys.stderr.write(text + "\n"))
    sys.stdout.write(render_table(result))
    if args.json:
        result.write_json(args.json)
    return 0


def _chunking(args: argparse.Namespace) -> int:
    from . import chunking

    pages = chunking.working_set(args.after, args.command) if args.command else None
    sys.stdout.write(chunking.render(chunking.measure(args.before, args.after, pages)))
    return 0


def _progress(done: int, total: int) -> None:
    sys.stderr.write(f"\rround {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.bench == "chunking":
        return _chunking(args)
    if args.bench == "fs":
        return _fs(args)
    if args.bench in _MODULES:
        return importlib.import_module(_MODULES[args.bench]).main(args)
    try:
        peers = default_peers(runc=args.runc, coldbrew=args.coldbrew, floors=args.floors)
        result = run_startup(args.runs, args.warmup, peers=peers, workdir_parent=args.workdir, seed=args.seed,
                             gap=args.gap_ms / 1000, progress=_progress if sys.stderr.isatty() else None)
    except BenchError as e:
        sys.stderr.write(f"coldbrew bench: {e}\n")
        return 1
    sys.stdout.write(render_table(result))
    if args.json:
        result.write_json(args.json)
    return 1 if result.leftovers else 0


if __name__ == "__main__":
    sys.exit(main())

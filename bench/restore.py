"""Restore from a warm-point snapshot beside cold initialisation: `python -m coldbrew.bench restore --runs 3`.

The container: root = the Debian + PyTorch tree (`trees.torch_tree()`, read-only, as the bundle's root: no
coldbrew.fs mount, so the numbers are the snapshot's alone), /tmp and /dev on tmpfs, coldbrew's warmpoint.py bound
read-only at /opt/coldbrew. The program imports torch, builds `torch.nn.Sequential` of 16 `Linear(4096, 4096)` with
a fixed seed (1 GiB of float32 weights), reaches its warm point, runs one forward pass and prints "after-warm".

Measured (every time from starting the `coldbrew` process to the program's first output after its warm point, the
"after-warm" line; p50 over `runs`):
- cold initialisation: `coldbrew run` without a snapshot (the helper answers "none"), page cache warm (after one
  unrecorded run) and dropped (`trees.drop_caches` before each run);
- snapshot: `run --snapshot` with no snapshot yet, in process (for its timings): how long the program was frozen for
  the dump, how long storing it took (while the program ran on), the dump's size and what the store took (zstd,
  deduplicated: a later snapshot of the same program adds only what changed);
- restore: `run --snapshot` with the snapshot in the local cache, page cache warm and dropped; and with an empty
  local cache and a dropped page cache, fetched from the local chunk store.
Targets: restore at least 10x faster than initialisation with warm caches, 3x with cold ones (each against the
initialisation measured in the same state of the page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import Result, Row, Target, render_table
from .trees import drop_caches

WORKDIR = "/var/cache/coldbrew-bench/restore"
KEY = "bench-torch-1g"
LAYERS, WIDTH = 16, 4096
CACHE_LIMIT = 3 << 30  # room for the snapshot and one more: older ones are evicted meanwhile
_PROGRAM = f"""
import sys, time
import torch
sys.path.insert(0, "/opt/coldbrew")
import warmpoint
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear({WIDTH}, {WIDTH}) for _ in range({LAYERS})])
state = warmpoint.ready()
with torch.no_grad():
    out = model(torch.ones(1, {WIDTH}))
print("after-warm", state, round(float(out.sum()), 4), flush=True)
"""


class BenchError(RuntimeError):
    pass


def _bundle(workdir: str, tree: str) -> str:
    from .bundles import busybox_config, write_bundle

    config = busybox_config(Path(tree), ["/usr/bin/python3", "-c", _PROGRAM])
    config["process"]["env"] = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "PYTHONDONTWRITEBYTECODE=1"]
    config["mounts"] += [
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=65536k"]},
        {"destination": "/opt/coldbrew", "type": "bind", "source": str(Path(__file__).resolve().parent.parent
                                                                          / "snapshot"), "options": ["rbind", "ro"]},
    ]
    bundle = os.path.join(workdir, "bundle")
    write_bundle(Path(bundle), config)
    return bundle


def _coldbrew() -> str:
    from .startup import coldbrew_binary

    return coldbrew_binary()


def _timed_run(args: list[str], env: dict[str, str], expect: str) -> float:
    """Seconds from starting `coldbrew args` to its "after-warm" line (which must say `expect`); waits for its end."""
    started = time.perf_counter()
    process = subprocess.Popen([_coldbrew(), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True)
    seen = None
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("after-warm"):
            seen = time.perf_counter() - started
            words = line.split()
            if words[1] != expect:
                process.kill()
                raise BenchError(f"coldbrew {' '.join(args[:4])}: the program's warm point answered {words[1]!r}, "
                                 f"not {expect!r}")
    stderr = process.stderr.read() if process.stderr else ""
    if process.wait() != 0 or seen is None:
        raise BenchError(f"coldbrew {' '.join(args)} exited {process.returncode}: {stderr.strip()[-2000:]}")
    return seen


def run_restore_bench(runs: int = 3, progress=None) -> Result:
    from coldbrew.fs.store import LocalStore
    from coldbrew.runtime.container import Runtime
    from coldbrew.snapshot import warm
    from coldbrew.snapshot.store import SnapshotCache

    from . import trees
    from .startup import host_info

    say = progress or (lambda _text: None)
    tree = trees.torch_tree()
    os.makedirs(WORKDIR, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=WORKDIR, prefix="run-")
    store_dir, cache_dir, state = (os.path.join(workdir, name) for name in ("store", "cache", "state"))
    bundle = _bundle(workdir, tree)
    cid = f"restore-bench-{os.getpid()}"
    env = {**os.environ, warm.CACHE_ENV: cache_dir, warm.CACHE_SIZE_ENV: str(CACHE_LIMIT)}
    plain = ["--root", state, "run", "-b", bundle, cid]
    # one key per snapshot made (each a cold run into the same store); the restores use the last one
    keys = [f"{KEY}-{attempt}" for attempt in range(runs)]
    snapshotted = ["--root", state, "run", "--snapshot", keys[-1], "--snapshot-store", store_dir, "-b", bundle, cid]

    result = Result(bench="restore", runs=runs, warmup=1, baseline=("init", "time"), host=host_info())
    result.settings = {"runs": runs, "tree": tree, "model": f"{LAYERS} x Linear({WIDTH}, {WIDTH}), float32",
                       "root": "the tree read-only, /tmp on tmpfs", "store": "local directory"}

    def row(scenario: str, peer: str, metric: str, label: str, unit: str = "ms") -> Row:
        for existing in result.rows:
            if (existing.scenario, existing.peer, existing.metric) == (scenario, peer, metric):
                return existing
        result.rows.append(Row(scenario, peer, metric, label, unit))
        return result.rows[-1]

    warm_cache, cold_cache, snap = "warm page cache", "dropped page cache", "snapshot"

    def warm_then_cold(what: str, args: list[str], outcome: str, peer: str, label: str) -> None:
        """`runs` timed runs with a warm page cache (after one unrecorded run fills it), then `runs` after
        dropping it."""
        say(f"{what}, warm page cache")
        _timed_run(args, env, outcome)
        for _ in range(runs):
            row(warm_cache, peer, "time", label).samples.append(_timed_run(args, env, outcome) * 1e3)
        say(f"{what}, dropped page cache")
        for _ in range(runs):
            drop_caches()
            row(cold_cache, peer, "time", label).samples.append(_timed_run(args, env, outcome) * 1e3)

    try:
        warm_then_cold("cold initialisation", plain, "none", "init", "cold initialisation")

        say("snapshots")
        runtime = Runtime(state)
        store = LocalStore(store_dir)
        cache = SnapshotCache(cache_dir, CACHE_LIMIT)
        for attempt, key in enumerate(keys):
            with open(os.devnull, "r+b") as null:
                made = warm.run(runtime, cid, bundle, key, store=store, cache=cache,
                                stdio=(null.fileno(), null.fileno(), null.fileno()))
            if made.outcome != "snapshotted" or made.snapshot is None or made.exit_code != 0:
                raise BenchError(f"the snapshot run ended {made.outcome} (exit {made.exit_code}, "
                                 f"refused: {made.refused})")
            row(snap, "dump", "time", "dump (program frozen)").samples.append(made.timings["dump"] * 1e3)
            row(snap, "save", "time", "store (program runs on)").samples.append(made.timings["save"] * 1e3)
            row(snap, "dump", "size", "dump size", "MB").samples.append(made.snapshot.dump_bytes / 1e6)
            if attempt == 0:
                row(snap, "stored", "size", "stored size (zstd, into an empty store)", "MB").samples.append(
                    made.snapshot.uploaded_bytes / 1e6)
                result.scenarios.append({"name": snap, "chunks": made.snapshot.unique_chunks,
                                         "dump_bytes": made.snapshot.dump_bytes})
            else:
                row(snap, "again", "size", "new bytes stored by a later snapshot (dedupe)", "MB").samples.append(
                    made.snapshot.uploaded_bytes / 1e6)

        warm_then_cold("restore", snapshotted, "restored", "restore", "restore (local snapshot cache)")
        say("restore from the store, empty local cache, dropped page cache")
        for _ in range(runs):
            for name in os.listdir(cache_dir):
                if name != "tmp":
                    shutil.rmtree(os.path.join(cache_dir, name))
            drop_caches()
            row(cold_cache, "fetch", "time", "restore (fetched from the local store)").samples.append(
                _timed_run(snapshotted, env, "restored") * 1e3)

        result.targets += [
            Target(warm_cache, "restore", "time", "init", "time", 0.1,
                   "restore at least 10x faster than initialisation, warm cache"),
            Target(cold_cache, "restore", "time", "init", "time", 1 / 3,
                   "restore at least 3x faster than initialisation, cold cache"),
        ]
        leftovers = [n for n in os.listdir(state)] if os.path.isdir(state) else []
        leftovers += [f"/run/{n}" for n in os.listdir("/run") if n.startswith(f"coldbrew-warm-{cid}")]
        result.leftovers = leftovers
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def add_parser(benches: Any) -> None:
    """The `restore` command of `python -m coldbrew.bench` (`benches`: its subparsers)."""
    parser = benches.add_parser("restore", help="restore from a warm-point snapshot beside cold initialisation "
                                                "(a PyTorch program with a 1 GiB model; drops page caches; minutes)")
    parser.add_argument("--runs", type=int, default=3, help="samples per row; default 3")
    parser.add_argument("--json", metavar="FILE", help="also write every row, with its samples, to FILE")


def main(args: argparse.Namespace) -> int:
    result = run_restore_bench(args.runs, progress=lambda text: sys.stderr.write(text + "\n"))
    sys.stdout.write(render_table(result))
    if args.json:
        result.write_json(args.json)
    return 1 if result.leftovers else 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m coldbrew.bench.restore")
    add_parser(_parser.add_subparsers(dest="bench", required=True))
    sys.exit(main(_parser.parse_args(["restore", *sys.argv[1:]])))

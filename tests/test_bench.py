"""The start-up benchmark harness, end to end on the real kernel with runc and coldbrew (shape, not timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from coldbrew.bench.report import Result, Row, Target, percentile, render_table
from coldbrew.bench.startup import (RUNC, BenchError, CommandPeer, InProcessPeer, Scenario, default_peers,
                                    remove_cgroups, run_startup)

pytestmark = pytest.mark.skipif(not os.path.exists(RUNC), reason=f"{RUNC} (Debian's runc) is not installed")

EXPECTED_ROWS = [
    ("runc", "total"), ("coldbrew", "total"), ("inprocess", "total"), ("inprocess-phases", "to_exec"),
    ("inprocess-phases", "create"), ("inprocess-phases", "start"), ("inprocess-phases", "wait"),
    ("inprocess-phases", "delete"),
]


def _bench_cgroups() -> list[str]:
    """Cgroups named like the harness's containers, anywhere in the hierarchy."""
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d.startswith("cbb-")]
    return found


@pytest.fixture
def workdir(tmp_path: Path):
    """The harness's working directory parent: empty again after every run, whatever happened."""
    before = _bench_cgroups()
    yield tmp_path
    assert os.listdir(tmp_path) == [], f"the harness left files behind: {os.listdir(tmp_path)}"
    assert _bench_cgroups() == before


def test_cli_end_to_end(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("out") / "startup.json"
    proc = subprocess.run([sys.executable, "-m", "coldbrew.bench", "startup", "--runs", "3", "--warmup", "1",
                           "--json", str(out), "--workdir", str(workdir), "--seed", "11"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    for label in ("runc run", "coldbrew run (CLI)", "Runtime.run (in-process)", "create+start, to exec (in-process)"):
        assert label in table
    header = table.splitlines()[0].split()
    assert header[:3] == ["scenario", "what", "n"] and "p50" in header and "p90" in header and "mean" in header
    assert "ratios are against runc run (true)" in table
    targets = [line for line in table.splitlines() if line.startswith("target")]
    assert len(targets) == 2
    assert all(line.endswith(" met") or line.endswith(" MISSED") for line in targets)
    assert "coldbrew run (CLI) p50 = " in targets[0] and "(<= 1.00x)" in targets[0]
    assert "Runtime.run (in-process) p50 = " in targets[1] and "(<= 0.50x)" in targets[1]

    doc = json.loads(out.read_text())
    assert doc["schema"] == "coldbrew.bench/1" and doc["bench"] == "startup"
    assert (doc["runs"], doc["warmup"]) == (3, 1)
    assert doc["leftovers"] == []
    assert doc["settings"] == {"order": "shuffled each round", "seed": 11, "gap_ms": 0.0}
    assert [s["name"] for s in doc["scenarios"]] == ["true"]
    assert [(r["peer"], r["metric"]) for r in doc["rows"]] == EXPECTED_ROWS
    for row in doc["rows"]:
        assert row["unit"] == "ms" and row["n"] == 3 and len(row["samples"]) == 3
        assert all(s > 0 for s in row["samples"])
        assert row["min"] <= row["p50"] <= row["p90"] <= row["max"]
        assert row["ratio_p50"] == pytest.approx(row["p50"] / doc["rows"][0]["p50"])
    runc = doc["rows"][0]
    assert runc["ratio_p50"] == runc["ratio_p90"] == 1.0
    assert [(t["peer"], t["max_ratio"]) for t in doc["targets"]] == [("coldbrew", 1.0), ("inprocess", 0.5)]
    for t in doc["targets"]:
        assert isinstance(t["met"], bool) and t["met"] == (t["ratio"] <= t["max_ratio"])
    versions = {p["name"]: p.get("version") for p in doc["peers"]}
    assert versions["runc"].startswith("runc version") and versions["coldbrew"].startswith("coldbrew version")


def test_phases_add_up_and_floors(workdir: Path) -> None:
    result = run_startup(2, 0, peers=default_peers(floors=True), workdir_parent=str(workdir))
    assert result.leftovers == []
    phases = {m: result.row("true", "inprocess-phases", m).samples for m in ("to_exec", "create", "start")}
    for to_exec, create, start in zip(phases["to_exec"], phases["create"], phases["start"]):
        assert to_exec == pytest.approx(create + start)
    assert result.row("true", "python-floor", "total").p50 > 0
    assert result.row("true", "coldbrew-version", "total").p50 > 0


def test_failing_command_is_reported_and_cleaned(workdir: Path) -> None:
    failing = CommandPeer("failing", "sh exits 3", ("/bin/sh", "-c", "echo broken {id} >&2; exit 3"))
    with pytest.raises(BenchError, match=r"failing: .* exited 3: broken cbb-"):
        run_startup(1, 0, peers=[failing], workdir_parent=str(workdir))


def test_failing_container_is_reported_and_cleaned(workdir: Path) -> None:
    missing = Scenario("missing", ("/bin/no-such-program",), "a program the root does not have")
    with pytest.raises(BenchError, match="inprocess: container cbb-.*no-such-program"):
        run_startup(1, 0, peers=[InProcessPeer("inprocess", "Runtime.run")], scenarios=(missing,),
                    workdir_parent=str(workdir))


def test_leftovers_are_found_and_removed(workdir: Path) -> None:
    # `runc create` without start or delete leaves a waiting init, its state and its cgroups.
    leaky = CommandPeer("leaky", "runc create only", (RUNC, "--root", "{root}", "create", "-b", "{bundle}", "{id}"),
                        delete=(RUNC, "--root", "{root}", "delete", "-f", "{id}"))
    result = run_startup(2, 0, peers=[leaky], workdir_parent=str(workdir))
    states = [x for x in result.leftovers if x.startswith("leaky: state ")]
    assert len(states) == 2
    assert "LEFT BEHIND: leaky: state" in render_table(result)
    assert result.targets == []  # no runc/coldbrew rows: no target can be judged
    assert "-" in render_table(result).splitlines()[2].split()  # and no ratio without the baseline row


def test_remove_cgroups_kills_and_removes(tmp_path: Path) -> None:
    hierarchy = "/sys/fs/cgroup/pids" if os.path.isdir("/sys/fs/cgroup/pids") else "/sys/fs/cgroup"
    prefix = f"cbb-test-{uuid.uuid4().hex[:8]}"
    path = os.path.join(hierarchy, prefix, "inner")
    os.makedirs(path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        found = remove_cgroups(prefix)
        assert found == [f"cgroup {os.path.join(hierarchy, prefix)}"]
        assert not os.path.exists(os.path.join(hierarchy, prefix))
        assert sleeper.wait(timeout=5) == -9
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in (path, os.path.dirname(path)):
            if os.path.isdir(d):
                os.rmdir(d)


def test_order_is_shuffled_by_seed(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    trail = tmp_path_factory.mktemp("trail") / "order"

    def orders(seed: int) -> list[str]:
        trail.write_text("")
        peers = [CommandPeer(name, name, ("/bin/sh", "-c", f"echo {name} >> {trail}")) for name in "abc"]
        result = run_startup(8, 0, peers=peers, workdir_parent=str(workdir), seed=seed)
        assert result.settings["seed"] == seed
        names = trail.read_text().split()
        return ["".join(names[i:i + 3]) for i in range(0, len(names), 3)]

    first = orders(7)
    assert len(first) == 8 and all(sorted(o) == ["a", "b", "c"] for o in first)
    assert len(set(first)) > 1  # not one fixed order
    assert orders(7) == first


def test_run_rejects_bad_counts(workdir: Path) -> None:
    with pytest.raises(BenchError, match="runs must be at least 1"):
        run_startup(0, 0, peers=[], workdir_parent=str(workdir))


# ---- report, without containers -----------------------------------------------------------------------------

def _result(base: list[float], other: list[float]) -> Result:
    result = Result(bench="t", runs=len(base), warmup=0, baseline=("base", "total"))
    result.rows = [Row("s", "base", "total", "baseline", samples=base), Row("s", "fast", "total", "fast one",
                                                                             samples=other)]
    return result


def test_table_ratios_and_target_marks() -> None:
    result = _result([10.0, 20.0, 30.0], [5.0, 10.0, 15.0])
    result.targets = [Target("s", "fast", "total", "base", "total", 0.5, "half"),
                      Target("s", "fast", "total", "base", "total", 0.4, "less than half")]
    table = render_table(result)
    fast = next(line for line in table.splitlines() if "fast one" in line)
    assert "10.0 ms" in fast and "0.50x" in fast
    assert "target (s): half: fast one p50 = 0.50x baseline p50 (<= 0.50x) met" in table
    assert "target (s): less than half: fast one p50 = 0.50x baseline p50 (<= 0.40x) MISSED" in table
    doc = result.to_dict()
    assert [t["met"] for t in doc["targets"]] == [True, False]
    result.rows.append(Row("s", "fast", "bytes", "bytes read", unit="B", samples=[4096.0]))
    assert result.ratios(result.rows[-1]) is None  # no ratio across units
    assert "4096 B" in render_table(result)
    assert doc["rows"][1]["ratio_p50"] == 0.5 and doc["rows"][1]["p90"] == pytest.approx(14.0)


def test_percentile_known_values() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([7.0], 90) == 7.0
    assert percentile([1.0, 9.0], 0) == 1.0 and percentile([1.0, 9.0], 100) == 9.0
    with pytest.raises(ValueError):
        percentile([], 50)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50),
       st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
def test_percentile_is_bounded_and_monotonic(values: list[float], q1: float, q2: float) -> None:
    low, high = sorted((q1, q2))
    assert min(values) <= percentile(values, low) <= percentile(values, high) <= max(values)


def test_stale_bytecode_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import compileall

    from coldbrew.bench.startup import stale_bytecode

    package = tmp_path / f"cbbpkg_{uuid.uuid4().hex[:8]}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert sorted(stale_bytecode(package.name)) == [str(package / "__init__.py"), str(package / "mod.py")]
    assert compileall.compile_dir(str(package), quiet=1)
    assert stale_bytecode(package.name) == []
    (package / "mod.py").write_text("X = 12\n")  # a new size: the cached bytecode no longer matches
    assert stale_bytecode(package.name) == [str(package / "mod.py")]

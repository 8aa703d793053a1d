"""Our own CI's leaderboard gate is complete: the smoke sweep runs every registered method, its committed
baseline covers exactly those runs, and .ci/run runs the gate after the tests."""

from __future__ import annotations

import json
from pathlib import Path

from lmms_tokprune.catalog import METHODS
from lmms_tokprune.paths import model_configs_dir
from lmms_tokprune.sweep import load_sweep, shard_runs

ROOT = Path(__file__).resolve().parents[2]
SMOKE = model_configs_dir() / "sweeps" / "ci_smoke.yaml"
BASELINE = ROOT / "leaderboards" / "ci_smoke.baseline.json"


def test_smoke_sweep_runs_every_registered_method_on_the_demo_checkpoint():
    sweep = load_sweep(SMOKE)
    assert {r.model_args["method"] for r in sweep.runs} == {m.name for m in METHODS}
    assert {r.model_args["pretrained"] for r in sweep.runs} == {"demo"}
    assert all(r.limit is not None for r in sweep.runs)  # a fixed subset
    assert sorted(len(shard_runs(sweep.runs, i, 2)) for i in (1, 2)) in ([8, 9], [9, 9], [8, 8])


def test_committed_baseline_covers_the_smoke_runs():
    runs = json.loads(BASELINE.read_text())["runs"]
    assert set(runs) == {r.name for r in load_sweep(SMOKE).runs}
    assert {r["checkpoint"] for r in runs.values()} == {"demo"}
    assert all(len(r["scores"]) == 5 and r["visual_tokens_kept"] for r in runs.values())


def test_ci_runs_the_gate_after_the_tests():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    tests = next(i for i, line in enumerate(ci) if line.startswith("python -m pytest"))
    gate = next(i for i, line in enumerate(ci) if "leaderboard_gate.sh" in line)
    assert gate > tests
    script = (ROOT / ".ci" / "leaderboard_gate.sh").read_text()
    assert "--shard \"$shard/2\"" in script and "--check \"$baseline\"" in script and "rm -rf \"$out\"" in script

"""The shipped CI workflow is valid and safe, checked offline: GitHub's workflow schema (check-jsonschema's vendored
copy) and zizmor's audits with no medium or high findings (pinned actions, least-privilege permissions, no
template injection, no persisted credentials). Each check is shown to fail on a broken copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "leaderboard.yml"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the [test] extra)")
    return found


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=120)


def zizmor_findings(path: Path) -> list:
    done = subprocess.run([_tool("zizmor"), "--offline", "--no-progress", "--format", "json", "--min-severity", "medium", str(path)],
                          capture_output=True, text=True, timeout=120)
    findings = json.loads(done.stdout or "[]")
    assert done.returncode == 0 or findings, done.stderr[-2000:]
    return findings


def test_workflow_matches_githubs_schema():
    done = schema_check(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflow_has_no_medium_or_high_zizmor_findings():
    findings = zizmor_findings(WORKFLOW)
    assert not findings, [(f["ident"], f["desc"]) for f in findings]


def test_the_checks_catch_a_broken_workflow(tmp_path):
    text = WORKFLOW.read_text()
    unpinned = tmp_path / "unpinned.yml"
    unpinned.write_text(text.replace("actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683", "actions/checkout@v4"))
    assert {f["ident"] for f in zizmor_findings(unpinned)} == {"unpinned-uses"}
    data = yaml.safe_load(text)
    data["jobs"]["merge"]["runs-on"] = {"not": "a runner"}
    data["jobs"]["merge"]["steps"][0]["uses"] = 42
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(data))
    assert schema_check(broken).returncode != 0


def test_workflow_shards_merges_and_gates():
    """The jobs the README describes: a matrix of shards on self-hosted GPU runners with the HF cache mounted, a
    merge job that checks against the committed baseline, and a CPU smoke job running the .ci gate."""
    data = yaml.safe_load(WORKFLOW.read_text())
    jobs = data["jobs"]
    assert data["permissions"] == {"contents": "read"}
    shard = jobs["shard"]
    assert shard["runs-on"] == ["self-hosted", "gpu"] and shard["strategy"]["matrix"]["shard"] == [1, 2, 3, 4]
    assert shard["env"]["HF_HOME"] == "/mnt/hf-cache" and str(len(shard["strategy"]["matrix"]["shard"])) == data["env"]["SHARDS"]
    steps = " ".join(s.get("run", "") for s in shard["steps"])
    assert '--shard "$SHARD/$SHARDS"' in steps and "accelerate launch --num_processes" in steps
    merge = " ".join(s.get("run", "") for s in jobs["merge"]["steps"])
    assert jobs["merge"]["needs"] == "shard" and "--check" in merge and "GITHUB_STEP_SUMMARY" in merge
    assert "bash .ci/leaderboard_gate.sh" in " ".join(s.get("run", "") for s in jobs["smoke"]["steps"])
    assert (ROOT / "model_configs" / "sweeps" / "llava15_7b_budgets.yaml").is_file()

"""Packaging: the wheel builds without warnings, carries what an evaluation needs (and not the build-time
recipes), its declared dependencies are what the package imports, and it evaluates from a fresh environment."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Declared but not imported by lmms_tokprune itself, each for a stated reason (see pyproject.toml).
NOT_IMPORTED = {"filelock": "pin: lmms_eval 0.7.3 needs filelock < 4", "torchvision": "transformers' torchvision image backend"}


def _requirement_names() -> set:
    from packaging.requirements import Requirement

    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return {Requirement(m).name.lower().replace("_", "-") for m in re.findall(r'^\s*"([^"]+)"', block, re.M)}


def _imported_distributions() -> set:
    """Distributions that provide the third-party modules imported anywhere in lmms_tokprune/."""
    provided = metadata.packages_distributions()
    found = set()
    for path in (REPO / "lmms_tokprune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "lmms_tokprune":
                    continue
                dists = provided.get(top)
                assert dists, f"{path.relative_to(REPO)} imports {top!r}, which no installed distribution provides"
                found.add(dists[0].lower().replace("_", "-"))
    return found


def test_declared_dependencies_are_what_the_package_imports():
    declared, imported = _requirement_names(), _imported_distributions()
    assert imported - declared == set(), "imported but not declared in pyproject.toml"
    assert declared - imported == set(NOT_IMPORTED), "declared but neither imported nor listed with a reason"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, env=env, cwd=str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("lmms_tokprune-*.whl")
    return path, proc.stdout + proc.stderr


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_carries_the_data(wheel):
    path, log = wheel
    warnings = [line for line in log.splitlines() if "warn" in line.lower()]
    assert not warnings, "\n".join(warnings)
    names = zipfile.ZipFile(path).namelist()
    for needed in ("lmms_tokprune/assets/demo_llava/model.safetensors", "lmms_tokprune/tasks_data/shapes_vqa/data/reading.jsonl",
                   "lmms_tokprune/tasks_data/tokprune_smoke/tokprune_smoke.yaml", "lmms_tokprune/model_configs_data/sweeps/smoke.yaml",
                   "lmms_tokprune-0.1.0.dist-info/licenses/LICENSE"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("recipes/", "tests/")) or "__pycache__" in n]
    entry_points = zipfile.ZipFile(path).read("lmms_tokprune-0.1.0.dist-info/entry_points.txt").decode()
    assert "lmms_tokprune.harness.manifests:manifests" in entry_points


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_evaluates_offline_from_another_folder(wheel, tmp_path):
    """A new virtual environment with only the wheel installed (its dependencies are taken from this
    environment's site-packages, read-only, so nothing is downloaded): lmms-eval finds the plugin, the
    shipped tasks and the demo checkpoint, and writes results, from a folder outside the checkout."""
    path, _ = wheel
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended after the venv's own site-packages
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(path)],
                   check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    where = subprocess.run([str(python), "-c", "import lmms_tokprune.paths as p, lmms_tokprune; print(lmms_tokprune.__file__); print(p.tasks_dir())"],
                           capture_output=True, text=True, cwd=str(work), env=env, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site)), where  # the wheel, not the checkout
    proc = subprocess.run([str(python), "-m", "lmms_eval", "--model", "llava_tokprune", "--model_args", "pretrained=demo,method=topk_cls,budget=32",
                           "--tasks", "shapes_vqa_reading", "--include_path", where[1], "--limit", "3", "--output_path", "out",
                           "--verbosity", "WARNING"], capture_output=True, text=True, cwd=str(work), env=env, timeout=600)
    results = list((work / "out").rglob("*_results.json"))
    assert len(results) == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(results[0].read_text())
    assert data["throughput"]["avg_visual_tokens_kept"] == 32 and data["throughput"]["avg_num_samples"] == 3
    assert "exact_match,none" in data["results"]["shapes_vqa_reading"]

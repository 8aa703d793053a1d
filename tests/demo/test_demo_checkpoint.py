"""The shipped demo checkpoint (pretrained=demo, text_encoder=demo), trained on the shapes_vqa benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmms_tokprune.assets import ASSETS_DIR, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]

# Documented in README ("The demo checkpoint"): exact match of the uncompressed shipped checkpoint on the first
# SUBSET questions of each shapes_vqa family, through lmms-eval. The test asserts a small margin below it.
SUBSET = 10
DOCUMENTED_SUBSET_ACCURACY = json.loads((ASSETS_DIR / "demo_llava" / "EVAL.json").read_text())["subset_accuracy"] \
    if (ASSETS_DIR / "demo_llava" / "EVAL.json").exists() else None


# Generator determinism, the committed test split and task-YAML loading: tests/test_shapes_vqa.py.


# ------------------------------------------------------------------------------------------ checkpoint
def test_demo_names_resolve_to_shipped_folders():
    llava, clip = Path(resolve_checkpoint("demo")), Path(resolve_checkpoint("demo", kind="clip"))
    assert llava == ASSETS_DIR / "demo_llava" and clip == ASSETS_DIR / "demo_clip"
    assert resolve_checkpoint("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    size = sum(p.stat().st_size for d in (llava, clip) for p in d.rglob("*") if p.is_file())
    assert size < 25 * 2**20


def test_demo_checkpoint_loads_offline():
    import torch
    from transformers import CLIPModel

    from lmms_tokprune.llava.loading import check_checkpoint, load_llava

    config = check_checkpoint("demo")
    v = config.vision_config
    assert (v.image_size, v.patch_size, config.vision_feature_layer, config.vision_feature_select_strategy) == (336, 14, -2, "default")
    model, processor = load_llava("demo", torch.device("cpu"), "float32")
    assert next(model.parameters()).dtype == torch.float32
    clip = CLIPModel.from_pretrained(resolve_checkpoint("demo", kind="clip"), dtype=torch.float32)
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    for (name, p), (_, q) in zip(tower.state_dict().items(), clip.vision_model.state_dict().items()):
        assert torch.equal(p, q), name  # text_encoder=demo's visual_projection sees the LLaVA's own ViT


def test_text_encoder_demo_loads():
    import torch

    from lmms_tokprune.llava.loading import load_llava
    from lmms_tokprune.llava.text_guide import load_text_guide

    model, _ = load_llava("demo", torch.device("cpu"), "float32")
    guide = load_text_guide("demo", model, torch.device("cpu"))
    emb, proj = guide.embed(["Is there a red circle in the image?"])
    assert emb.shape[0] == 1 and proj.shape[1] == model.config.vision_config.hidden_size


@pytest.mark.slow
@pytest.mark.skipif(DOCUMENTED_SUBSET_ACCURACY is None, reason="EVAL.json missing next to the shipped checkpoint")
def test_demo_checkpoint_reaches_documented_accuracy():
    """lmms-eval, uncompressed, first SUBSET questions of each family: the documented accuracy."""
    from lmms_tokprune.demo import run_method

    row = run_method("demo", "none", None, batch_size=8, limit=SUBSET)
    assert row.visual_tokens == 576
    assert row.accuracy >= DOCUMENTED_SUBSET_ACCURACY - 0.02, row


@pytest.mark.slow
def test_demo_cli_json_gives_the_trade_off_rows(capsys):
    """`lmms-tokprune demo --json` with a budget list: none once, every other method at every budget."""
    from lmms_tokprune.cli import main

    assert main(["demo", "--methods", "none,topk_cls", "--budget", "64,32", "--limit", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["method"], r["budget"]) for r in rows] == [("none", None), ("topk_cls", 64), ("topk_cls", 32)]
    assert [r["visual_tokens"] for r in rows] == [576, 64, 32]
    for r in rows:  # 2 questions per family: each family scores 0, 0.5 or 1; the row is their unweighted mean
        assert len(r["per_task"]) == 5 and all(v in (0.0, 0.5, 1.0) for v in r["per_task"].values())
        assert r["accuracy"] == pytest.approx(sum(r["per_task"].values()) / 5)


def test_demo_cli_rejects_a_bad_budget_list():
    from lmms_tokprune.cli import main

    with pytest.raises(SystemExit, match="--budget"):
        main(["demo", "--budget", "64,abc"])


@pytest.mark.parametrize("argv", [["--limit", "-1"], ["--batch-size", "0"]])
def test_demo_cli_rejects_negative_limits_and_empty_batches(argv, capsys):
    from lmms_tokprune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo"] + argv)
    assert exit_.value.code == 2 and "must be an integer >=" in capsys.readouterr().err


def test_eval_demo_table_and_plot(tmp_path):
    """The README table and the Pareto plot are made from EVAL.json rows (the shipped file itself)."""
    from lmms_tokprune.demo.evaluate import markdown_table, pareto_plot

    full = json.loads((ASSETS_DIR / "demo_llava" / "EVAL.json").read_text())["full_test"]
    table = markdown_table(full).splitlines()
    assert len(table) == 2 + len(full) and table[2].startswith("| none | - | 576 |")
    png = pareto_plot(full, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_prints_one_line_per_run_then_the_table(tmp_path):
    """The default output a newcomer reads: no progress bars, no load reports; --verbose brings them back."""
    import subprocess
    import sys

    from lmms_eval_runs import offline_env

    cmd = [sys.executable, "-m", "lmms_tokprune.cli", "demo", "--methods", "none,recover", "--budget", "32", "--limit", "1"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=offline_env(), timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    progress, table = quiet.stderr.strip().splitlines(), quiet.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in progress] == ["[1/2] none", "[2/2] recover budget 32"]  # and nothing else
    assert table[0].startswith("| method |") and len(table) == 2 + 2  # table head, two rows
    verbose = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, cwd=str(tmp_path), env=offline_env(), timeout=600)
    assert verbose.returncode == 0 and "%|" in verbose.stderr  # the progress bars are back

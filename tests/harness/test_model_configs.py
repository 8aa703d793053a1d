"""Every shipped model_configs YAML is a valid lmms-eval --config file with valid model_args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmms_tokprune.harness.args import MODEL_IDS, load_config_model_args, parse_model_args

CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "sweeps" not in p.parts)


def _lmms_eval_cli_keys() -> set:
    """The keys lmms-eval's own --config validation accepts (its argparse destinations)."""
    import sys
    from unittest import mock

    from lmms_eval.__main__ import parse_eval_args

    with mock.patch.object(sys, "argv", ["lmms-eval"]):
        parser, _ = parse_eval_args()
    return {action.dest for action in parser._actions} - {"help"}


def test_there_are_configs_for_every_method_and_baseline():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    for method in ("topk_cls", "spatial", "random", "prumerge", "prumerge_plus", "recover", "longtail"):
        for budget in (64, 128, 192):
            assert f"{method}/budget{budget}.yaml" in names
    for method in ("prumerge", "prumerge_plus", "recover"):
        assert {f"{method}/reference.yaml", f"{method}/fixed.yaml"} <= names
    assert {"longtail/fixed.yaml", "none/full.yaml", "none/paper.yaml", "prumerge/ratio_1_8_reference.yaml"} <= names
    assert {"recover/ratio5.yaml", "recover/ratio10.yaml", "recover/ratio50.yaml"} <= names
    for method in ("visionzip", "vispruner", "fastervlm", "divprune", "cdpruner", "fastv", "pdrop", "dart", "sparsevlm"):  # the peers
        assert {f"{method}/reference.yaml", f"{method}/budget64.yaml", f"{method}/budget128.yaml", f"{method}/budget192.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_is_valid(path):
    data = yaml.safe_load(path.read_text())
    unknown = set(data) - _lmms_eval_cli_keys()
    assert not unknown, f"keys lmms-eval --config rejects: {unknown}"
    assert data["model"] in MODEL_IDS
    raw = load_config_model_args(str(path))
    raw.pop("__model__")
    args = parse_model_args(data["model"], raw)
    assert args.method in ("none", "topk_cls", "spatial", "random", "prumerge", "prumerge_plus", "recover", "longtail",
                           "visionzip", "vispruner", "fastervlm", "divprune", "cdpruner", "fastv", "pdrop", "dart", "sparsevlm")


def test_llava_next_configs_exist_for_every_method():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    assert "llava_next/none/full.yaml" in names
    for method in ("topk_cls", "spatial", "random", "prumerge", "prumerge_plus", "recover", "longtail", "visionzip", "vispruner",
                   "fastervlm", "divprune", "cdpruner", "fastv", "pdrop", "dart", "sparsevlm"):
        assert {f"llava_next/{method}/budget{b}.yaml" for b in (640, 320, 160)} <= names, method
    for method in ("visionzip", "vispruner", "fastervlm", "cdpruner", "divprune", "dart", "pdrop"):  # a NeXT release exists
        assert f"llava_next/{method}/reference.yaml" in names
    for method in ("fastv", "sparsevlm", "prumerge", "prumerge_plus", "recover", "longtail"):  # none: reference is refused
        assert f"llava_next/{method}/reference.yaml" not in names
    for release in ("visionzip/per_crop128.yaml", "visionzip/per_crop64.yaml", "visionzip/per_crop32.yaml", "vispruner/per_crop32.yaml",
                    "fastervlm/per_crop29.yaml", "cdpruner/per_crop32.yaml"):
        assert f"llava_next/{release}" in names


@pytest.mark.parametrize("path", [p for p in CONFIGS if "llava_next" in p.parts or p.parent.name in ("fastv", "pdrop", "dart", "sparsevlm")],
                         ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_in_llm_config_passes_its_load_time_check(path):
    """What the engine checks when it loads (a 32-layer LLM of 32 heads): a reachable budget, layers in range."""
    from lmms_tokprune.methods.llm_stages import LLMContext, check_llm

    data = yaml.safe_load(path.read_text())
    raw = load_config_model_args(str(path))
    raw.pop("__model__")
    method = parse_model_args(data["model"], raw).engine.method
    if method.spec.plan is None:
        return
    check_llm(method, LLMContext(32, 576, 32, layout="llava_next" in path.parts))


def test_video_llava_configs_exist_for_prumerge_and_the_peers():
    """PruMerge's video setting (Table 3) and the peers at 256 / 512 visual tokens per video."""
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    assert {"video_llava/none/full.yaml", "video_llava/prumerge/reference.yaml", "video_llava/prumerge/fixed.yaml",
            "video_llava/prumerge_plus/fixed.yaml"} <= names
    assert "video_llava/prumerge_plus/reference.yaml" not in names  # refused on a video
    for method in ("prumerge", "prumerge_plus", "visionzip", "vispruner", "fastervlm", "divprune", "fastv", "pdrop", "dart", "sparsevlm"):
        assert {f"video_llava/{method}/budget{b}.yaml" for b in (256, 512)} <= names, method

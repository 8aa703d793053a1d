"""Entry-point registration and model_args validation (no model is loaded here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmms_tokprune.harness.args import MODEL_IDS, parse_model_args

IDS = ["llava_tokprune", "llava_recover", "llava_prumerge", "llava_prumerge_plus", "llava_longtail"]


def test_all_ids_registered_in_a_fresh_interpreter():
    """lmms_eval.models.list_available_models() sees every plugin id (entry points load cleanly)."""
    code = (
        "import lmms_eval.models as m\n"
        "names = set(m.list_available_models())\n"
        f"missing = [i for i in {IDS!r} if i not in names]\n"
        "assert not missing, missing\n"
        f"for i in {IDS!r}:\n"
        "    cls = m.get_model(i)\n"
        "    assert cls.MODEL_ID == i and cls.is_simple, i\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_manifest_module_does_not_import_lmms_eval_at_top_level():
    code = "import sys, lmms_tokprune.harness.manifests as m; assert 'lmms_eval' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_type_guessed_values_are_coerced():
    args = parse_model_args("llava_tokprune", {"method": "topk_cls", "budget": 64.0, "pad_to_square": "false", "batch_size": "4", "max_new_tokens": 8})
    assert args.method_params == {"budget": 64} and args.pad_to_square is False and args.batch_size == 4
    args = parse_model_args("llava_tokprune", {"method": "random", "ratio": 1, "seed": 3})
    assert args.method_params == {"ratio": 1.0, "seed": 3}


@pytest.mark.parametrize(
    "model_id,raw,message",
    [
        ("llava_tokprune", {"method": "nope"}, "unknown method 'nope'; valid methods: none"),
        ("llava_tokprune", {"method": "topk_cls", "budgett": 3}, "unknown model_args key 'budgett'"),
        ("llava_tokprune", {"method": "topk_cls", "ratio": 1.5}, "must be in \\(0, 1\\]"),
        ("llava_tokprune", {"method": "topk_cls", "ratio": 0.0}, "must be in \\(0, 1\\]"),
        ("llava_tokprune", {"method": "topk_cls", "budget": 0}, "must be an integer >= 1"),
        ("llava_tokprune", {"method": "topk_cls", "budget": 10, "ratio": 0.5}, "either budget or ratio"),
        ("llava_tokprune", {"method": "random", "seed": "abc"}, "must be of type int"),
        ("llava_tokprune", {"prompt_style": "vicuna"}, "choose one of llava_v1, chat_template"),
        ("llava_tokprune", {"pad_to_square": "maybe"}, "must be true or false"),
        ("llava_tokprune", {"batch_size": "auto"}, "batch_size=auto"),
        ("llava_tokprune", {"variant": "paper"}, "choose one of fixed, reference"),
        ("llava_prumerge", {"method": "recover"}, "llava_prumerge runs method 'prumerge'"),
        ("llava_tokprune", {"config": "/nonexistent.yaml"}, "does not exist"),
    ],
)
def test_bad_model_args_are_one_clear_error(model_id, raw, message):
    with pytest.raises(ValueError, match=message):
        parse_model_args(model_id, raw)


def test_presets_match_ids():
    assert MODEL_IDS == {
        "llava_tokprune": None,
        "llava_recover": "recover",
        "llava_prumerge": "prumerge",
        "llava_prumerge_plus": "prumerge_plus",
        "llava_longtail": "longtail",
    }


def test_config_file_model_args_are_merged(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: llava_tokprune\nmodel_args: pretrained=/x,method=topk_cls,budget=64\ntasks: pope\n")
    args = parse_model_args("llava_tokprune", {"config": str(cfg), "budget": 32})
    assert args.pretrained == "/x" and args.method == "topk_cls" and args.method_params == {"budget": 32}


def test_missing_and_non_llava_checkpoints(tmp_path):
    from lmms_tokprune.llava.loading import check_checkpoint

    with pytest.raises(ValueError, match="does not exist"):
        check_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert' checkpoint; lmms_tokprune needs a LLaVA-1.5 checkpoint"):
        check_checkpoint(str(tmp_path / "bert"))

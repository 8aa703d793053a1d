"""Entry-point registration and model_args validation (no model is loaded here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmms_tokprune.harness.args import MODEL_IDS, parse_model_args

IDS = ["llava_tokprune", "llava_recover", "llava_prumerge", "llava_prumerge_plus", "llava_longtail",
       "llava_visionzip", "llava_vispruner", "llava_fastervlm", "llava_divprune", "llava_cdpruner",
       "llava_fastv", "llava_pdrop", "llava_dart", "llava_sparsevlm"]


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
        "llava_visionzip": "visionzip",
        "llava_vispruner": "vispruner",
        "llava_fastervlm": "fastervlm",
        "llava_divprune": "divprune",
        "llava_cdpruner": "cdpruner",
        "llava_fastv": "fastv",
        "llava_pdrop": "pdrop",
        "llava_dart": "dart",
        "llava_sparsevlm": "sparsevlm",
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


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"method": "topk_cls", "budget": ""}, "'budget' is empty"),
        ({"method": "prumerge", "adaptive": "none"}, "'adaptive' must be of type bool, got 'none' \\(none is only allowed where the default is none"),
        ({"method": "recover", "text_weight": "nan"}, "'text_weight'=nan must be a finite number"),
        ({"method": "recover", "text_weight": "inf"}, "'text_weight'=inf must be a finite number"),
        ({"method": "longtail", "alpha": "-inf"}, "'alpha'=-inf must be a finite number"),
        ({"method": "recover", "text_weight": -1.0}, "'text_weight'=-1.0 must be a finite number >= 0"),
        ({"method": "prumerge", "num_neighbors": "none"}, "'num_neighbors' must be of type int, got 'none'"),
        ({"method": "random", "seed": "none"}, "'seed' must be of type int, got 'none'"),
        ({"method": "longtail", "clip_layer": "none"}, "'clip_layer' must be of type int, got 'none'"),
        ({"method": "topk_cls", "budgte": 64}, "unknown model_args key 'budgte' .*\\(did you mean 'budget'\\?\\)"),
        ({"method": "topk_cls", "pretraind": "/x"}, "did you mean 'pretrained'"),
        ({"pretrained": ""}, "pretrained= is empty"),
        ({"dtype": "fp8"}, "dtype='fp8' is not valid; choose one of auto, float32"),
    ],
)
def test_parameters_are_strict_at_load_time(raw, message):
    """Empty values, `none` where the default is not none, non-finite or negative floats and typos: one error each."""
    with pytest.raises(ValueError, match=message):
        parse_model_args("llava_tokprune", raw)


def test_none_is_accepted_only_where_the_default_is_none():
    assert parse_model_args("llava_tokprune", {"method": "topk_cls", "budget": "none"}).engine.method.budget is None
    assert parse_model_args("llava_tokprune", {"max_new_tokens": "none"}).max_new_tokens is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_tokenizer"])
def test_damaged_checkpoints_name_the_folder_and_the_file(tiny_llava, tmp_path, damage):
    import shutil

    import torch

    from lmms_tokprune.llava.loading import load_llava

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava, ckpt)
    weights = ckpt / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        message = f"{weights} is not a readable safetensors file"
    elif damage == "garbage":
        weights.write_bytes(b"this is not a safetensors file")
        message = f"{weights} is not a readable safetensors file"
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (ckpt / name).unlink()
        message = f"the folder {ckpt} has no tokenizer"
    with pytest.raises(ValueError, match=message.replace(".", "\\.")):
        load_llava(str(ckpt), torch.device("cpu"))


def test_damaged_text_encoder_names_the_file(tiny_llava, tiny_clip, tmp_path):
    import shutil

    import torch

    from lmms_tokprune.llava.loading import load_llava
    from lmms_tokprune.llava.text_guide import load_text_guide

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip, clip)
    (clip / "model.safetensors").write_bytes(b"\x00" * 100)
    model, _ = load_llava(str(tiny_llava), torch.device("cpu"))
    with pytest.raises(ValueError, match=f"text_encoder=.*{clip}/model.safetensors is not a readable safetensors file"):
        load_text_guide(str(clip), model, torch.device("cpu"))

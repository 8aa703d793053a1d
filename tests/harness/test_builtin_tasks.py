"""Our model ids receive the prompts the built-in `llava` model receives on LLaVA-1.5's benchmarks.

lmms-eval picks `lmms_eval_specific_kwargs` / `model_specific_generation_kwargs` by the --model
name. This test resolves them with lmms-eval's own code for `llava` and for each of our ids on the
real task YAMLs shipped with lmms-eval, then compares what reaches the model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmms_tokprune.harness.args import MODEL_IDS
from lmms_tokprune.llava.engine import clean_generation_kwargs

BENCHMARKS = {
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "textvqa_val": "textvqa/textvqa_val.yaml",
    "mme": "mme/mme.yaml",
    "vqav2_val": "vqav2/vqav2_val.yaml",
    "pope": "pope/pope.yaml",
    "mmbench_en_dev_static": "mmbench/mmbench_en_dev_static.yaml",
    "gqa": "gqa/gqa.yaml",
    "seedbench": "seedbench/seedbench.yaml",
}


def _task_config(rel: str) -> dict:
    import lmms_eval
    from lmms_eval.utils import load_yaml_config

    path = Path(lmms_eval.__file__).parent / "tasks" / rel
    return load_yaml_config(str(path), mode="simple")


def _resolve(config: dict, model_name: str):
    """Run lmms-eval's own selection code on a stand-in task object."""
    from lmms_eval.api.task import ConfigurableTask

    cfg = SimpleNamespace(
        lmms_eval_specific_kwargs=copy.deepcopy(config.get("lmms_eval_specific_kwargs")),
        model_specific_target_kwargs=copy.deepcopy(config.get("model_specific_target_kwargs")),
        model_specific_generation_kwargs=copy.deepcopy(config.get("model_specific_generation_kwargs")),
        generation_kwargs=copy.deepcopy(config.get("generation_kwargs") or {}),
    )
    task = SimpleNamespace(config=cfg, model_name=model_name)
    ConfigurableTask._prepare_model_specific_config(task)
    prompt_kwargs = task.lmms_eval_specific_kwargs
    scalars = None if prompt_kwargs is None else {k: v for k, v in prompt_kwargs.items() if not isinstance(v, dict)}
    return scalars, cfg.generation_kwargs


@pytest.mark.parametrize("task", sorted(BENCHMARKS))
@pytest.mark.parametrize("model_id", sorted(MODEL_IDS))
def test_same_prompts_and_generation_as_builtin_llava(task, model_id):
    config = _task_config(BENCHMARKS[task])
    llava_prompt, llava_gen = _resolve(config, "llava")
    ours_prompt, ours_gen = _resolve(config, model_id)
    assert ours_prompt == llava_prompt
    # image_aspect_ratio (llava-only for sqa/mmbench) is not a generation option: our wrappers
    # strip it and pad to square by model_args, as LLaVA-1.5's own evaluation does.
    assert clean_generation_kwargs(ours_gen) == clean_generation_kwargs(llava_gen)
    assert ours_gen.get("until") == llava_gen.get("until")

"""The `lmms_eval.models` entry point: one callable returning a manifest per model id of the catalog.

It must not import lmms_eval at module top level: lmms_eval.models imports this module while it is itself
being initialised, and a circular import silently drops the plugin. lmms-eval 0.7.3 accepts an entry point
that returns a list of manifests, so pyproject.toml names this one function and the ids come from
`lmms_tokprune.catalog` (adding a method with a preset id adds its manifest).
"""

from __future__ import annotations

from typing import Dict, List

from ..catalog import class_name, model_ids

MODEL_CLASS_MODULE = "lmms_tokprune.harness.model"


def class_paths() -> Dict[str, str]:
    """model id -> the dotted path of its harness class."""
    return {mid: f"{MODEL_CLASS_MODULE}.{class_name(mid)}" for mid in model_ids()}


def manifests() -> List[object]:
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=mid, simple_class_path=path) for mid, path in class_paths().items()]

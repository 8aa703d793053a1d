"""Entry points of the `lmms_eval.models` group.

These callables must not import lmms_eval at module top level: lmms_eval.models imports this
module while it is itself being initialised, and a circular import silently drops the plugin.
"""

from __future__ import annotations

CLASS_PATHS = {
    "llava_tokprune": "lmms_tokprune.harness.model.LlavaTokPrune",
    "llava_recover": "lmms_tokprune.harness.model.LlavaRecover",
    "llava_prumerge": "lmms_tokprune.harness.model.LlavaPrumerge",
    "llava_prumerge_plus": "lmms_tokprune.harness.model.LlavaPrumergePlus",
    "llava_longtail": "lmms_tokprune.harness.model.LlavaLongtail",
}


def _manifest(model_id: str):
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=model_id, simple_class_path=CLASS_PATHS[model_id])


def llava_tokprune():
    return _manifest("llava_tokprune")


def llava_recover():
    return _manifest("llava_recover")


def llava_prumerge():
    return _manifest("llava_prumerge")


def llava_prumerge_plus():
    return _manifest("llava_prumerge_plus")


def llava_longtail():
    return _manifest("llava_longtail")

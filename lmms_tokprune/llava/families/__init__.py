"""One adapter per LLaVA model family (see `families/base.py`), picked from the checkpoint's `model_type` through the
catalog's family table: the engine holds a family and never reads a model class's internals itself."""

from __future__ import annotations

import importlib
from typing import Any, Optional

import torch

from ...catalog import family_of_model_type
from ..batch import ImageTokens
from .base import BUDGET_SCOPES, BUDGET_SPLITS, Family, FamilyOptions, ImageUnits, UnitBatch, UnitGroup, split_budget

__all__ = ["BUDGET_SCOPES", "BUDGET_SPLITS", "Family", "FamilyOptions", "ImageTokens", "ImageUnits", "UnitBatch", "UnitGroup", "family_class",
           "open_family", "split_budget"]


def family_class(model_type: str) -> type:
    """The adapter class of a transformers model_type (ValueError for an unsupported one)."""
    entry = family_of_model_type(model_type)
    module = importlib.import_module(f"{__name__}.{entry.module}")
    return next(obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, Family) and obj.name == entry.name)


def open_family(model: torch.nn.Module, processor: Any, options: Optional[FamilyOptions] = None) -> Family:
    """The adapter for a loaded model; options that belong to another family and were given explicitly are refused."""
    cls = family_class(getattr(model.config, "model_type", ""))
    options = options or FamilyOptions()
    from ...catalog import MODEL_FAMILIES

    others = set()
    for entry in MODEL_FAMILIES:
        if entry.name != cls.name:
            others |= set(family_class(entry.model_type).own_options) - set(cls.own_options)
    refused = sorted(others & set(options.given))
    if refused:
        raise ValueError(f"model_args {', '.join(refused)} do not apply to {cls.name} checkpoints ({getattr(model.config, 'model_type', '')}); "
                         "leave them out")
    return cls(model, processor, options)

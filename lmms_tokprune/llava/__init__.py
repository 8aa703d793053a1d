"""transformers integration of LLaVA (loading, CLIP capture, the engines, the in-LLM decoder loop).

Public contract (DESIGN.md): ``from lmms_tokprune.llava import prune_prefill``. Resolved on first use, so importing a
submodule (as the lmms-eval plugin does) does not load the decoder loop and transformers' Llama code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prune_prefill", "PrefillResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import llm_pruning

        return getattr(llm_pruning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Pure-torch visual-token compression methods (no transformers / lmms-eval imports here).

Contract (called by checks outside this repo)::

    outs = compress(method, VisionInputs(hidden, q, k, ...), variant="fixed", **params)
    outs[b].features  # [M_b, D] pre-projector features in LLM order
    outs[b].index     # [M_b] source patch index, -1 for a token that is not one patch
"""

from .inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, ROLE_NAMES, ROLE_RECOVERED, CompressedImage, UnitLayout, VisionInputs
from .outliers import iqr_outliers, lof_fraction, lof_outliers
from .registry import METHOD_MODULES, VARIANTS, BoundMethod, MethodSpec, Param, bind, compress, get_method, method_names, resolve_params
from .signals import cls_attention

__all__ = [
    "VisionInputs",
    "UnitLayout",
    "CompressedImage",
    "compress",
    "bind",
    "BoundMethod",
    "lof_outliers",
    "iqr_outliers",
    "lof_fraction",
    "cls_attention",
    "get_method",
    "method_names",
    "resolve_params",
    "MethodSpec",
    "Param",
    "METHOD_MODULES",
    "VARIANTS",
    "ROLE_KEPT",
    "ROLE_RECOVERED",
    "ROLE_MERGED",
    "ROLE_EXTRA",
    "ROLE_NAMES",
]

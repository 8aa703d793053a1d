"""vision_dtype=auto: the CLIP tower in the dtype each method's released evaluation ran it in.

The LLaVA 1.1.x forks (PruMerge, Recoverable Compression, FastV) cast the tower to fp16 in `load_pretrained_model`
unconditionally; LLaVA >= 1.2 (every other release) never casts it (`if device_map != 'auto'` guards the cast, and the
eval scripts load with device_map='auto'). `reference` follows its release, `fixed` runs fp32, explicit values win.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmms_tokprune.catalog import METHODS
from lmms_tokprune.harness.args import parse_model_args
from lmms_tokprune.harness.provenance import provenance
from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.loading import resolve_vision_dtype
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options

HALF_TOWER_RELEASES = {"prumerge", "prumerge_plus", "recover", "fastv"}


def test_the_catalog_names_the_llava_1_1_forks():
    assert {m.name for m in METHODS if m.release_half_tower} == HALF_TOWER_RELEASES


@pytest.mark.parametrize("method", [m.name for m in METHODS])
@pytest.mark.parametrize("variant", ["fixed", "reference"])
def test_auto_resolves_per_method_variant_and_model_dtype(method, variant):
    spec_variants = next(m.variants for m in METHODS if m.name == method)
    if variant not in spec_variants:
        pytest.skip(f"{method} has no {variant} variant")
    params = {"budget": 64} if method in ("vispruner", "fastervlm", "cdpruner") else {}
    bound = engine_options({"method": method, "variant": variant, **params}).method
    half = variant == "reference" and method in HALF_TOWER_RELEASES
    assert bound.release_half_tower == half
    assert resolve_vision_dtype("auto", torch.float16, bound.release_half_tower) == (torch.float16 if half else torch.float32)
    assert resolve_vision_dtype("auto", torch.float32, bound.release_half_tower) == torch.float32  # a CPU run stays fp32
    assert resolve_vision_dtype("auto", torch.bfloat16, bound.release_half_tower) == torch.float32  # the releases cast to fp16 only
    assert resolve_vision_dtype("float32", torch.float16, bound.release_half_tower) == torch.float32  # explicit values win
    assert resolve_vision_dtype("model", torch.float16, bound.release_half_tower) == torch.float16


def test_unknown_vision_dtype_is_refused():
    with pytest.raises(ValueError, match="vision_dtype='float64' is not valid; choose one of auto, float32, model"):
        engine_options({"vision_dtype": "float64"})


@pytest.mark.parametrize("method,variant,args,expected", [
    ("prumerge", "reference", {}, torch.float16),
    ("prumerge", "fixed", {}, torch.float32),
    ("fastv", "reference", {"k": 1}, torch.float16),
    ("visionzip", "reference", {"dominant": 54, "contextual": 10}, torch.float32),
    ("prumerge", "reference", {"vision_dtype": "float32"}, torch.float32),
])
def test_fp16_model_gets_the_releases_tower(tiny_llava, method, variant, args, expected):
    """A half-precision run (what dtype=auto gives on a GPU): the tower's dtype follows the release, the pipeline runs,
    and every sample's provenance says which dtype the tower ran in."""
    raw = {"pretrained": str(tiny_llava), "method": method, "variant": variant, "dtype": "float16", **args}
    engine = open_engine(engine_options(raw), torch.device("cpu"))
    assert engine.vision_dtype == expected
    assert engine.model.model.language_model.embed_tokens.weight.dtype == torch.float16
    tokens, stats = engine.generate([Sample("What colour is the circle?", [Image.new("RGB", (40, 30), (200, 10, 10))], [0])],
                                    {"max_new_tokens": 3})
    assert stats[0].visual_tokens_in == 576 and len(tokens) == 1
    prov = provenance(parse_model_args("llava_tokprune", raw), str(engine.vision_dtype).removeprefix("torch."))
    assert prov["vision_dtype"] == {torch.float16: "float16", torch.float32: "float32"}[expected]


def test_fp32_tower_sees_pixels_rounded_to_the_model_dtype(tiny_llava):
    """As LLaVA's eval (images.to(float16)) and llava_hf hand pixels over: in the model's dtype, then the tower's."""
    engine = open_engine(engine_options({"pretrained": str(tiny_llava), "dtype": "float16"}), torch.device("cpu"))
    pixels = torch.randn(1, 3, 336, 336)
    moved = engine.pixels_on_device(pixels)
    assert moved.dtype == torch.float16 and torch.equal(moved.float(), pixels.half().float())

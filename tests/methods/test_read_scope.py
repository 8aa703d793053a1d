"""The NaN / inf check covers what a method reads (registry.MethodSpec.reads), no more and no less.

`fixed` top-k methods check their keys through the CLS logits they make and `hidden` at the rows they keep, instead
of scanning every input tensor on every call (issue 23 item 8: a top-k method should cost about a top-k). These
tests pin both halves: a NaN / inf where the method reads is still a ValueError naming the tensor, and a NaN where
it does not read cannot change its output (documented sane behaviour: the output is the clean input's).
"""

from __future__ import annotations

import pytest
import torch

from lmms_tokprune.bench.compress_bench import clip_like_inputs
from lmms_tokprune.methods import VisionInputs, compress

TOPK_FAMILY = [("topk_cls", "k"), ("fastervlm", "feature_k"), ("visionzip", "feature_k"), ("vispruner", "feature_k")]


def _inputs(n: int = 64, dim: int = 32, heads: int = 4) -> VisionInputs:
    inp = clip_like_inputs(2, n=n, dim=dim, text_dim=16, llm_dim=24, heads=heads, seed=3)
    inp.text_embeds = inp.visual_projection = None
    return inp


def _params(method: str) -> dict:
    return {"visionzip": {"dominant": 10, "contextual": 4}}.get(method, {"budget": 12})


def _kept(outs) -> list:
    return [o.index.tolist() for o in outs]


@pytest.mark.parametrize("method,key_name", TOPK_FAMILY)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("variant", ["fixed", "reference"])
def test_a_bad_key_anywhere_is_an_error_naming_it(method, key_name, value, variant):
    """fixed checks the keys through its logits: every key entry enters one logit, so no bad key escapes."""
    for row in (0, 1, 37):  # the CLS key, a patch key, another patch key
        inp = _inputs()
        getattr(inp, key_name)[1, row, 5] = value
        with pytest.raises(ValueError, match=f"VisionInputs.{key_name} contains NaN or inf"):
            compress(method, inp, variant=variant, **_params(method))


@pytest.mark.parametrize("method,query_name", [("topk_cls", "q"), ("fastervlm", "feature_q"), ("visionzip", "feature_q")])
def test_a_bad_cls_query_is_an_error(method, query_name):
    inp = _inputs()
    getattr(inp, query_name)[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=f"VisionInputs.{query_name} contains NaN or inf"):
        compress(method, inp, variant="fixed", **_params(method))


@pytest.mark.parametrize("method", ["fastervlm", "visionzip"])
def test_a_nan_in_a_patch_query_row_is_not_read(method):
    """Only the CLS query row enters the CLS attention: a NaN in a patch's query cannot change the picks."""
    clean = _inputs()
    dirty = _inputs()
    dirty.feature_q[0, 9, 3] = float("nan")
    assert _kept(compress(method, dirty, variant="fixed", **_params(method))) == _kept(
        compress(method, clean, variant="fixed", **_params(method)))


@pytest.mark.parametrize("method", ["topk_cls", "fastervlm"])
def test_hidden_is_checked_at_the_kept_rows_only(method):
    clean = _inputs()
    outs = compress(method, clean, variant="fixed", budget=12)
    kept, dropped = int(outs[0].index[0]), next(i for i in range(64) if i not in set(outs[0].index.tolist()))
    hit = _inputs()
    hit.hidden[0, 1 + kept, 0] = float("nan")  # hidden row 0 is CLS: patch i is row 1 + i
    with pytest.raises(ValueError, match="hidden contains NaN or inf"):
        compress(method, hit, variant="fixed", budget=12)
    miss = _inputs()
    miss.hidden[0, 1 + dropped, 0] = float("nan")
    got = compress(method, miss, variant="fixed", budget=12)
    assert _kept(got) == _kept(outs)
    assert all(torch.equal(a.features, b.features) for a, b in zip(got, outs))
    # reference runs the released code unchanged, so every tensor it reads is scanned up front
    with pytest.raises(ValueError, match="hidden contains NaN or inf"):
        compress(method, miss, variant="reference", budget=12)

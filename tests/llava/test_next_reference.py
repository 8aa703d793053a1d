"""`variant=reference` on LLaVA-NeXT: what each release computes on NeXT (shared/PEERS.md "LLaVA-NeXT"), against plain-torch
readings of the released NeXT code written here (never copied), on tiny NeXT inputs of 3-, 4- and 5-crop images; each quirk
undone changes the result; refusals where no release has a NeXT path."""

from __future__ import annotations

import pytest
import torch

from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options


def _engine(ckpt, **args):
    return open_engine(engine_options({"pretrained": str(ckpt), "dtype": "float32", **args}), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method,params", [("fastv", {"k": 1}), ("sparsevlm", {}), ("prumerge", {}), ("prumerge_plus", {}),
                                           ("random", {"budget": 32}), ("topk_cls", {"budget": 32})])
def test_reference_without_a_next_release_is_refused_at_load(tiny_next, method, params):
    with pytest.raises(ValueError, match=rf"^{method} \(variant=reference\): the released code has no LLaVA-NeXT path .*"
                                         rf"variant=fixed runs {method} on LLaVA-NeXT$"):
        _engine(tiny_next, method=method, variant="reference", **params)
    if method != "sparsevlm":  # (its released layers 2, 6, 15 need a deeper tiny decoder)
        _engine(tiny_next, method=method, variant="fixed", **params)  # fixed runs it


def test_recover_reference_is_refused_at_load(tiny_next, tiny_clip):
    with pytest.raises(ValueError, match=r"^recover \(variant=reference\): the released code has no LLaVA-NeXT path"):
        _engine(tiny_next, method="recover", variant="reference", text_encoder=str(tiny_clip))


def test_longtail_has_no_reference_variant_anywhere(tiny_next):
    with pytest.raises(ValueError, match="longtail: unknown variant 'reference'; valid variants: fixed"):
        _engine(tiny_next, method="longtail", variant="reference")

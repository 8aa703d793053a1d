"""The compress contract, its validation, and the baselines (none, random, topk_cls, spatial)."""

from __future__ import annotations

import math

import pytest
import torch

from lmms_tokprune.methods import VisionInputs, cls_attention, compress, method_names
from lmms_tokprune.methods.baselines import grid_indices


def _inputs(b=3, n=576, d=32, seed=0, keys=None):
    g = torch.Generator().manual_seed(seed)
    h, q, k = (torch.randn(b, 1 + n, d, generator=g) for _ in range(3))
    return VisionInputs(h, q, k, image_keys=keys)


def test_cls_attention_is_one_head_cls_row_without_cls_column():
    inp = _inputs(b=2, n=16, d=8)
    full = torch.softmax(inp.q @ inp.k.transpose(1, 2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(cls_attention(inp.q, inp.k), full[:, 0, 1:])


def test_none_returns_everything_in_order():
    inp = _inputs()
    outs = compress("none", inp)
    assert len(outs) == 3
    for b, out in enumerate(outs):
        assert torch.equal(out.index, torch.arange(576))
        assert torch.equal(out.features, inp.hidden[b, 1:])


def test_topk_cls_keeps_the_highest_attention_in_spatial_order():
    inp = _inputs()
    attn = cls_attention(inp.q, inp.k)
    outs = compress("topk_cls", inp, budget=10)
    for b, out in enumerate(outs):
        expected = torch.sort(torch.topk(attn[b], 10).indices).values
        assert torch.equal(out.index, expected)
        assert torch.equal(out.features, inp.hidden[b, 1:][expected])
    assert [o.num_tokens for o in compress("topk_cls", inp, ratio=0.1)] == [57] * 3


@pytest.mark.parametrize("m", [1, 2, 5, 24, 64, 100, 128, 192, 300, 575, 576])
def test_spatial_grid_is_exact_distinct_and_spread(m):
    idx = grid_indices(576, m, torch.device("cpu"))
    assert idx.numel() == m and idx.unique().numel() == m
    assert int(idx.min()) >= 0 and int(idx.max()) < 576
    if m >= 4:
        rows, cols = idx // 24, idx % 24
        assert int(rows.max() - rows.min()) >= 12 and int(cols.max() - cols.min()) >= 12
    if m == 64:  # an 8 x 8 grid centred in its strata
        assert sorted(set((idx // 24).tolist())) == [1, 4, 7, 10, 13, 16, 19, 22]


def test_random_depends_on_image_key_not_on_batch():
    inp = _inputs(b=3, keys=[11, 22, 33])
    outs = compress("random", inp, budget=50)
    for b in range(3):
        single = VisionInputs(inp.hidden[b:b + 1], image_keys=[inp.image_keys[b]])
        assert torch.equal(compress("random", single, budget=50)[0].index, outs[b].index)
    assert not torch.equal(outs[0].index, outs[1].index)
    assert not torch.equal(compress("random", inp, budget=50, seed=1)[0].index, outs[0].index)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda i: compress("nope", i), "unknown method 'nope'; valid methods: none, random"),
        (lambda i: compress("topk_cls", i, budgett=3), "unknown parameter\\(s\\) budgett; valid parameters: budget, ratio"),
        (lambda i: compress("topk_cls", i, variant="paper"), "unknown variant 'paper'"),
        (lambda i: compress("topk_cls", i, ratio=0.0), "must be in \\(0, 1\\]"),
        (lambda i: compress("topk_cls", i, ratio=1.01), "must be in \\(0, 1\\]"),
        (lambda i: compress("topk_cls", i, ratio=float("nan")), "must be in \\(0, 1\\]"),
        (lambda i: compress("topk_cls", i, budget=0), "must be an integer >= 1"),
        (lambda i: compress("topk_cls", i, budget=577), "budget=577 is outside \\[1, 576\\]"),
        (lambda i: compress("spatial", i, budget=3.5), "must be of type int"),
        (lambda i: compress("topk_cls", VisionInputs(i.hidden)), "needs the last CLIP block's q and k"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(_inputs(b=1))


def test_nan_and_inf_inputs_are_rejected():
    inp = _inputs(b=1)
    inp.q[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="VisionInputs.q contains NaN or inf"):
        compress("topk_cls", inp, budget=4)
    inp = _inputs(b=1)
    inp.hidden[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="hidden contains NaN or inf"):
        compress("none", inp)


def test_registry_lists_every_method():
    assert method_names() == ["none", "random", "topk_cls", "spatial", "prumerge", "prumerge_plus", "recover", "longtail",
                              "visionzip", "vispruner", "fastervlm", "divprune", "cdpruner", "fastv", "pdrop", "dart", "sparsevlm"]

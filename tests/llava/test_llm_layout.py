"""The in-LLM methods on LLaVA-NeXT-shaped sequences (llava/llm_pruning.py's loop, methods/{fastv,pdrop,dart,sparsevlm,
longtail}.py): layout tokens (a newline after every grid row) are never pruned, never visual, never text; budgets
resolve image by image from the per-image patch counts (LLMContext.image_tokens); batch == one by one.

A synthetic NeXT-like image of a UNIT-patch CLIP unit: the base unit's UNIT patches, then a rows x cols grid of patches
read row by row with one layout token after every row (HF's pack_image_features). A tiny random Llama runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from lmms_tokprune.llava.decoder import decoder_parts
from lmms_tokprune.llava.llm_pruning import prune_prefill, run_prefill
from lmms_tokprune.methods import bind
from lmms_tokprune.methods.dart import resolve_truncation
from lmms_tokprune.methods.fastv import resolve_rank
from lmms_tokprune.methods.llm_stages import LLMContext, check_llm, planned_equivalent
from lmms_tokprune.methods.pdrop import resolve_ratios, stage_counts

L, D, UNIT = 8, 32, 16  # decoder layers, width, patches of one CLIP unit (LLaVA-NeXT: 576)

# fixed runs of every in-LLM method on an 8-layer decoder, aggressive enough that every cut prunes
METHODS = {
    "fastv": {"k": 2, "rank": 5},
    "pdrop": {"layer_list": (2, 4, 6), "image_token_ratio_list": (0.5, 0.25, 0.125)},
    "dart": {"k": 2, "max_num_trunction": 8, "pivot_image_token": 2, "pivot_text_token": 2},
    "sparsevlm": {"prune_layers": (1, 3, 5), "retain": 64},
    "sparsevlm2": {"version": "2.0", "prune_layers": (1, 3, 5), "retain": 64},
}


def _method(name: str) -> Tuple[str, dict]:
    return ("sparsevlm", METHODS[name]) if name.startswith("sparsevlm") else (name, METHODS[name])


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=L,
                         vocab_size=8, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for layer in model.layers:  # peaked attention: clear rank gaps
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


@dataclass
class Batch:
    x: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T] long, left padding
    image: torch.Tensor  # [B, T] bool: patch tokens
    layout: torch.Tensor  # [B, T] bool: newline tokens
    image_tokens: Tuple[Tuple[int, ...], ...]  # per row, per image patch tokens
    patches: List[List[int]]  # per row: original positions of patch tokens
    newlines: List[List[int]]  # per row: original positions of layout tokens

    def inputs(self):
        return self.x, self.mask, self.image

    def row(self, b: int) -> "Batch":
        keep = self.mask[b].bool()
        return Batch(self.x[b:b + 1, keep], self.mask[b:b + 1, keep], self.image[b:b + 1, keep], self.layout[b:b + 1, keep],
                     self.image_tokens[b:b + 1], self.patches[b:b + 1], self.newlines[b:b + 1])


def image_kinds(rows: int, cols: int) -> List[str]:
    """One NeXT-like image: the base unit's patches, then the grid row by row, a newline after every row."""
    kinds = ["p"] * UNIT
    for _ in range(rows):
        kinds += ["p"] * cols + ["n"]
    return kinds


def make_batch(*layouts, seed: int = 0) -> Batch:
    """One row per layout: a list of segments, an int = that many text tokens, a (rows, cols) pair = one image."""
    g = torch.Generator().manual_seed(seed)
    kinds_rows, image_tokens = [], []
    for layout in layouts:
        kinds, sizes = [], []
        for seg in layout:
            if isinstance(seg, int):
                kinds += ["t"] * seg
            else:
                kinds += image_kinds(*seg)
                sizes.append(UNIT + seg[0] * seg[1])
        kinds_rows.append(kinds)
        image_tokens.append(tuple(sizes))
    t = max(len(k) for k in kinds_rows)
    b = len(layouts)
    x = torch.zeros(b, t, D)
    mask = torch.zeros(b, t, dtype=torch.long)
    image = torch.zeros(b, t, dtype=torch.bool)
    layout = torch.zeros(b, t, dtype=torch.bool)
    for row, kinds in enumerate(kinds_rows):
        pad = t - len(kinds)
        x[row, pad:] = torch.randn(len(kinds), D, generator=g)
        mask[row, pad:] = 1
        image[row, pad:] = torch.tensor([k == "p" for k in kinds])
        layout[row, pad:] = torch.tensor([k == "n" for k in kinds])
    patches = [[i for i, k in enumerate(kinds) if k == "p"] for kinds in kinds_rows]
    newlines = [[i for i, k in enumerate(kinds) if k == "n"] for kinds in kinds_rows]
    return Batch(x, mask, image, layout, tuple(image_tokens), patches, newlines)


# two rows of different image sizes (left padding), and a row with two images
ROWS = [[5, (3, 4), 7], [3, (2, 5), 9], [4, (3, 4), 3, (1, 6), 6]]


def _prefill(model, batch: Batch, name: str, **extra):
    method, params = _method(name)
    return prune_prefill(method, model, *batch.inputs(), variant="fixed", layout_mask=batch.layout, image_tokens=batch.image_tokens,
                         num_patches=UNIT, **{**params, **extra})


def _kept(res):
    return [[p.tolist() for p in stages] for stages in res.kept_positions]


def _cut_layers(plan) -> List[int]:
    return [c.layer for c in plan.cuts]


def _assert_layout_kept_and_visual_counted(res, batch: Batch, cut_layers: List[int]) -> None:
    for b in range(len(batch.patches)):
        patches = set(batch.patches[b])
        for stage in res.kept_positions[b]:
            assert set(batch.newlines[b]) <= set(stage.tolist())  # no cut ever drops a layout slot
        for layer in range(L):
            done = sum(c <= layer for c in cut_layers)
            if done == 0:
                expected = len(patches)
            else:
                kept = res.kept_positions[b][done - 1].tolist()
                expected = sum(p in patches or p == -1 for p in kept)  # patches (and recycled tokens), never newlines
            assert res.visual_per_layer[b][layer] == expected
        if 0 not in cut_layers:
            assert res.visual_per_layer[b][0] == sum(batch.image_tokens[b])


# ------------------------------------------------------------------------------------------------ layout slots
@pytest.mark.parametrize("name", list(METHODS))
def test_no_cut_drops_a_layout_slot_and_visual_counts_patches_only(llama, name):
    batch = make_batch(*ROWS)
    res = _prefill(llama, batch, name)
    _assert_layout_kept_and_visual_counted(res, batch, _cut_layers(res.plan))
    for b in range(len(ROWS)):
        assert not set(batch.patches[b]) <= set(res.kept_positions[b][-1].tolist())  # it pruned patches


def test_h2o_never_prunes_a_layout_slot(llama):
    """longtail's H2O stage prunes visual + text tokens: the newline tokens stay (and are not in its budget base)."""
    batch = make_batch(*ROWS)
    parts = decoder_parts(llama)
    for llm_layer in (0, 3):
        bound = bind("longtail", llm_layer=llm_layer, heavy_ratio=0.2, recent_ratio=0.1)
        plan = bound.llm_plan(LLMContext(L, UNIT, 4, image_tokens=batch.image_tokens, layout=True))
        done = run_prefill(parts, *batch.inputs(), plan, layout_mask=batch.layout)
        _assert_layout_kept_and_visual_counted(done, batch, [llm_layer])
        assert done.decode is not None and not bool((done.decode.prunable & done.final.layout).any())  # nor while decoding
        assert done.final.layout.sum(dim=1).tolist() == [len(n) for n in batch.newlines]
        for b in range(len(ROWS)):
            visual = sum(batch.image_tokens[b])
            assert plan.notes["heavy"][b] == int(0.2 * visual) and plan.notes["recent"][b] == max(1, int(0.1 * visual))
            assert done.visual_per_layer[b][-1] < visual


def test_image_mask_covering_the_layout_slots_counts_them_as_layout(llama):
    """A caller may mark the whole image span (newlines included) in image_mask: layout wins, the counts are the same."""
    batch = make_batch(*ROWS[:2])
    spans = make_batch(*ROWS[:2])
    spans.image = spans.image | spans.layout
    a, b = _prefill(llama, batch, "fastv"), _prefill(llama, spans, "fastv")
    assert a.visual_per_layer == b.visual_per_layer and _kept(a) == _kept(b)


# ------------------------------------------------------------------------------------------------ batch == one by one
@pytest.mark.parametrize("name", list(METHODS))
def test_fixed_batch_equals_one_by_one(llama, name):
    batch = make_batch(*ROWS)
    both = _prefill(llama, batch, name)
    for b in range(len(ROWS)):
        alone = _prefill(llama, batch.row(b), name)
        assert both.layer_lengths[b] == alone.layer_lengths[0]
        assert both.visual_per_layer[b] == alone.visual_per_layer[0]
        assert _kept(both)[b] == _kept(alone)[0]
        torch.testing.assert_close(both.last_hidden[b], alone.last_hidden[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ per-image budgets
def _nearest(values, target):
    return min(range(len(values)), key=lambda i: (abs(values[i] - target), values[i]))


@pytest.mark.parametrize("budget", [9, 14, 40])
def test_fastv_budget_resolves_per_image(llama, budget):
    """rank_i = the nearest (k*N_i + (L-k)*rank_i)/L to the budget (clamped into 1..N_i); the row keeps sum_i rank_i
    and its achieved equivalent is sum_i of the per-image definition."""
    batch = make_batch(*ROWS)
    res = prune_prefill("fastv", llama, *batch.inputs(), variant="fixed", layout_mask=batch.layout, image_tokens=batch.image_tokens,
                        num_patches=UNIT, k=2, budget=budget)
    k = 2
    for b, sizes in enumerate(batch.image_tokens):
        ranks = [1 + _nearest([(k * n + (L - k) * r) / L for r in range(1, n + 1)], budget) for n in sizes]
        assert res.plan.notes["per_row"][b]["rank"] == ranks == [resolve_rank(budget, k, n, L, clamp=True) for n in sizes]
        definition = sum((k * n + (L - k) * r) / L for n, r in zip(sizes, ranks))
        assert res.visual_tokens_equivalent[b] == pytest.approx(definition)
        assert res.plan.notes["per_row"][b]["visual_tokens_equivalent"] == pytest.approx(definition)
        assert res.visual_per_layer[b][k:] == [sum(ranks)] * (L - k)


def test_dart_budget_resolves_per_image(llama):
    """M_i = P * t_i with (k*N_i + (L-k)*(p_img + P*t_i))/L nearest to the budget; one set of pivots per row."""
    batch = make_batch(*ROWS)
    params = {"k": 2, "pivot_image_token": 2, "pivot_text_token": 2}
    res = prune_prefill("dart", llama, *batch.inputs(), variant="fixed", layout_mask=batch.layout, image_tokens=batch.image_tokens,
                        num_patches=UNIT, budget=12, **params)
    for b, sizes in enumerate(batch.image_tokens):
        picks = [resolve_truncation(12, 2, n, L, 2, 2, clamp=True) for n in sizes]
        assert res.plan.notes["per_row"][b]["max_num_trunction"] == picks
        kept = 2 + 4 * (sum(picks) // 4)
        assert res.visual_per_layer[b][2:] == [kept] * (L - 2)
        assert res.visual_tokens_equivalent[b] == pytest.approx(planned_equivalent([2], [kept], sum(sizes), L))
        if len(sizes) == 1:  # one image: exactly the per-image definition
            t = picks[0] // 4
            assert res.visual_tokens_equivalent[b] == pytest.approx((2 * sizes[0] + (L - 2) * (2 + 4 * t)) / L)
            values = [(2 * sizes[0] + (L - 2) * (2 + 4 * s)) / L for s in range(0, (sizes[0] - 2) // 4 + 1)]
            assert t == _nearest(values, 12)


def test_pdrop_budget_resolves_per_row_from_the_mean_image(llama):
    """One λ per row, resolved as for one image of the row's mean size; counts int(N_row * λ^s) of the row's patches."""
    batch = make_batch(*ROWS)
    layer_list = (2, 4, 6)
    res = prune_prefill("pdrop", llama, *batch.inputs(), variant="fixed", layout_mask=batch.layout, image_tokens=batch.image_tokens,
                        num_patches=UNIT, layer_list=layer_list, budget=12)
    for b, sizes in enumerate(batch.image_tokens):
        ratios = resolve_ratios(12, layer_list, sum(sizes) / len(sizes), L, clamp=True)
        counts = stage_counts(sum(sizes), ratios)
        assert res.plan.notes["per_row"][b]["image_token_ratio_list"] == [round(r, 6) for r in ratios]
        assert res.visual_per_layer[b] == [sum(sizes)] * 2 + [counts[0]] * 2 + [counts[1]] * 2 + [counts[2]] * 2
        assert res.visual_tokens_equivalent[b] == pytest.approx(planned_equivalent(layer_list, counts, sum(sizes), L))


def test_sparsevlm_lists_scale_per_image(llama):
    """The released lists count an image of N = num_patches tokens; image i keeps round(list_s * N_i / N) and a row the
    sum over its images (then min(., v - 1)): with N = 576 and N_i = 2880 that is SparseVLM's NeXT 5x."""
    from lmms_tokprune.methods.sparsevlm import RETAIN, scaled_lists

    assert scaled_lists(RETAIN["1.5"][64], 2880, 576) == (330, 150, 85) and scaled_lists((66, 30, 17), 576, 576) == (66, 30, 17)
    ctx = LLMContext(32, 576, 32, image_tokens=((2880,), (1176, 2928)), layout=True)
    notes = bind("sparsevlm", retain=64).llm_plan(ctx).notes["per_row"]
    assert notes[0]["lists"] == [330, 150, 85]
    assert notes[1]["lists"] == [a + b for a, b in zip(scaled_lists((66, 30, 17), 1176, 576), scaled_lists((66, 30, 17), 2928, 576))]
    budgeted = bind("sparsevlm", budget=192).llm_plan(ctx).notes["per_row"]
    assert all(r in (192, 128, 96, 64) for row in budgeted for r in row["retain"])


def test_reference_on_next_is_refused_where_no_release_has_a_next_path(llama):
    batch = make_batch(*ROWS[:1])
    for name in ("fastv", "sparsevlm"):
        method, params = _method(name)
        no_path = f"{name} \\(variant=reference\\): the released code has no LLaVA-NeXT path .*variant=fixed runs {name} on LLaVA-NeXT"
        with pytest.raises(ValueError, match=no_path):
            prune_prefill(method, llama, *batch.inputs(), variant="reference", layout_mask=batch.layout, image_tokens=batch.image_tokens,
                          num_patches=UNIT, **params)
        with pytest.raises(ValueError, match=no_path):  # a layout mask alone
            prune_prefill(method, llama, *batch.inputs(), variant="reference", layout_mask=batch.layout, **params)
        with pytest.raises(ValueError, match=no_path):  # the load-time check of a NeXT engine
            check_llm(bind(method, "reference", **params), LLMContext(L, UNIT, 4, layout=True))


# ------------------------------------------------------------------------------------------------ load-time checks
def test_load_time_check_builds_no_plan():
    ctx = LLMContext(32, 576, 32)
    check_llm(bind("fastv", budget=128), ctx)
    with pytest.raises(ValueError, match="k=40 must be within 1..31"):
        check_llm(bind("fastv", k=40), ctx)
    with pytest.raises(ValueError, match="outside the reachable range"):
        check_llm(bind("fastv", budget=600), ctx)  # 576-patch images: at most 576
    check_llm(bind("fastv", budget=600), LLMContext(32, 576, 32, layout=True))  # NeXT images have more patches
    with pytest.raises(ValueError, match="below 36.94, the least an image of 576 or more patch tokens reaches"):
        check_llm(bind("fastv", budget=30), LLMContext(32, 576, 32, layout=True))
    with pytest.raises(ValueError, match="llm_layer=32 is outside"):
        check_llm(bind("longtail", llm_layer=32), ctx)
    with pytest.raises(ValueError, match="pdrop: layer_list"):
        check_llm(bind("pdrop", layer_list=(8, 16, 40)), ctx)
    with pytest.raises(ValueError, match="14 hard-coded heads"):
        check_llm(bind("sparsevlm", "reference", version="2.0"), LLMContext(32, 576, 8))
    with pytest.raises(ValueError, match="does not prune inside the LLM"):
        check_llm(bind("visionzip", budget=64), ctx)
    for name in ("fastv", "pdrop", "dart", "sparsevlm"):  # BoundMethod.llm_plan keeps working (check + plan)
        assert bind(name).llm_plan(ctx).cuts


# ------------------------------------------------------------------------------------------------ LLaVA-1.5 rows
@pytest.mark.parametrize("name, params", [("fastv", {"budget": 9}), ("pdrop", {"layer_list": (2, 4, 6), "budget": 9}),
                                          ("dart", {"budget": 9, "pivot_image_token": 2, "pivot_text_token": 2})])
def test_unit_sized_images_give_what_they_gave_without_image_tokens(llama, name, params):
    """Rows of one or two UNIT-patch images, no layout: image_tokens=(UNIT, ...) gives exactly the derived result."""
    g = torch.Generator().manual_seed(1)
    rows = [(3, 2, 5), (5, 1, 7)]  # (prefix, images, question)
    t = max(p + UNIT * m + q for p, m, q in rows)
    x = torch.randn(len(rows), t, D, generator=g)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    image = torch.zeros(len(rows), t, dtype=torch.bool)
    for b, (p, m, q) in enumerate(rows):
        pad = t - (p + UNIT * m + q)
        mask[b, pad:] = 1
        image[b, pad + p: pad + p + UNIT * m] = True
    derived = prune_prefill(name, llama, x, mask, image, variant="fixed", num_patches=UNIT, **params)
    given = prune_prefill(name, llama, x, mask, image, variant="fixed", image_tokens=((UNIT, UNIT), (UNIT,)), num_patches=UNIT, **params)
    assert derived.plan.notes["visual_tokens_equivalent"] == given.plan.notes["visual_tokens_equivalent"]
    assert derived.layer_lengths == given.layer_lengths and _kept(derived) == _kept(given)
    assert torch.equal(derived.last_hidden, given.last_hidden)


def test_image_tokens_must_add_up(llama):
    batch = make_batch(*ROWS[:1])
    with pytest.raises(ValueError, match=r"image_tokens\[0\] = \[27\] sums to 27 patch tokens; the row has 28"):
        prune_prefill("fastv", llama, *batch.inputs(), variant="fixed", layout_mask=batch.layout, image_tokens=((27,),), num_patches=UNIT)


# ------------------------------------------------------------------------------------------------ longtail stage 1 per unit
def _qk_for(weights: torch.Tensor):
    """q, k [B, 1+N, 16] whose CLS attention over the patches is exactly weights[:, 1:] / weights.sum()."""
    b, n1 = weights.shape
    q, k = torch.zeros(b, n1, 16), torch.zeros(b, n1, 16)
    q[:, 0, 0] = 4.0
    k[:, :, 0] = torch.log(weights)
    return q, k


def test_longtail_stage1_keeps_only_valid_patches_per_unit():
    """Units (a NeXT base image and its crops) with unpadded patches: the split runs on each unit's valid patches and
    an invalid patch is never kept, even when it draws the most attention; budgets are per unit."""
    from lmms_tokprune.methods.longtail import longtail_counts, stage1_keep

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(3, 1 + 24, generator=g).pow(6) + 1e-3
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[1, 16:] = False  # a crop whose last rows were padding
    valid[2] = False  # a crop of padding only
    weights[1, 1 + 16:] = 10.0  # the invalid patches draw the most attention
    q, k = _qk_for(weights)
    attn, kept = stage1_keep(q, k, valid=valid)
    assert all(bool(valid[b, idx].all()) for b, idx in enumerate(kept)) and kept[2].numel() == 0
    counts = longtail_counts(attn[1:2, :16])  # unit 1's curve is its 16 valid patches
    assert kept[1].numel() == counts[0]
    assert torch.equal(stage1_keep(q[:1], k[:1], valid=valid[:1])[1][0], stage1_keep(q[:1], k[:1])[1][0])  # all valid: as before
    _, by_budget = stage1_keep(q, k, valid=valid, budgets=[5, 20, 3])
    assert [int(i.numel()) for i in by_budget] == [5, 16, 0]  # capped by the valid patches
    assert all(bool(valid[b, idx].all()) for b, idx in enumerate(by_budget))
    _, by_ratio = stage1_keep(q, k, valid=valid, ratio=0.5)
    assert [int(i.numel()) for i in by_ratio] == [12, 8, 0]

"""Units (issue 23): every pre-projector method reads the units' layout (rows x cols, CLS prefix) from VisionInputs,
never 576, a square or "row 0 is CLS". On LLaVA-1.5's layout every output stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from lmms_tokprune.methods import UnitLayout, VisionInputs, compress
from lmms_tokprune.methods.baselines import grid_cells

D, DT, DL, HEADS = 32, 24, 40, 4

# every pre-projector method with a parameter set that exercises its selection (and its merge, where it has one)
METHODS = {
    "none": {},
    "random": {"budget": 40},
    "topk_cls": {"budget": 40},
    "spatial": {"budget": 40},
    "prumerge": {},
    "prumerge_plus": {},
    "recover": {},
    "visionzip": {"budget": 40},
    "vispruner": {"budget": 40},
    "fastervlm": {"budget": 40},
    "divprune": {"budget": 40},
    "cdpruner": {"budget": 40},
}
BATCH_ONE = {"prumerge_plus", "recover", "vispruner", "cdpruner"}  # reference runs one image per call
CLS_READERS = {"topk_cls", "prumerge", "prumerge_plus", "recover", "visionzip", "vispruner", "fastervlm"}


def make(b: int = 3, n: int = 576, seed: int = 0, layout: UnitLayout | None = None, keys=None) -> VisionInputs:
    """CLIP-shaped random signals for b units of n patches ([CLS +] n tokens), every tensor a method may read."""
    g = torch.Generator().manual_seed(seed)
    t = n + (1 if layout is None or layout.cls else 0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    q = r(b, t, D)
    k = r(b, t, D)
    q[:, 0] = 2.0 * k[:, 1 : 1 + 9].mean(dim=1) if t > n else q[:, 0]  # a peaked CLS attention (IQR / LOF outliers)
    return VisionInputs(r(b, t, D), q, k, last_hidden=r(b, t, D), text_embeds=r(b, DT), visual_projection=r(DT, D) * 0.2,
                        image_keys=list(range(11, 11 + b)) if keys is None else keys, feature_q=r(b, t, D), feature_k=r(b, t, D),
                        num_heads=HEADS, projected=r(b, n, DL), patch_embeds=r(b, n, DT),
                        text_segments=[r(1 + i % 2, DT) for i in range(b)], layout=layout)


def with_layout(inp: VisionInputs, layout: UnitLayout | None) -> VisionInputs:
    return VisionInputs(**{**vars(inp), "layout": layout})


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.features, y.features) and torch.equal(x.index, y.index) and torch.equal(x.role, y.role)
                                    for x, y in zip(a, b))


def run(method: str, inp: VisionInputs, variant: str = "fixed", **params):
    params = {**METHODS[method], **params}
    if variant == "reference" and method in BATCH_ONE:
        return [out for b in range(inp.batch_size) for out in compress(method, inp.image(b), variant=variant, **params)]
    return compress(method, inp, variant=variant, **params)


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("variant", ["reference", "fixed"])
@pytest.mark.parametrize("method", list(METHODS))
def test_llava15_layout_given_explicitly_changes_nothing(method, variant):
    inp = make()
    assert same(run(method, with_layout(inp, UnitLayout(24, 24)), variant), run(method, inp, variant))


@pytest.mark.parametrize("rows,cols", [(16, 16), (24, 12), (12, 24), (1, 40)])
@pytest.mark.parametrize("method", list(METHODS))
def test_any_grid_shape_runs_with_in_range_indices(method, rows, cols):
    n = rows * cols
    inp = make(n=n, layout=UnitLayout(rows, cols))
    outs = run(method, inp, budget=min(n, 24)) if "budget" in METHODS[method] else run(method, inp)
    for b, out in enumerate(outs):
        idx = out.index[out.index >= 0]
        assert int(idx.max()) < n and idx.unique().numel() == idx.numel()
        if method not in ("prumerge", "prumerge_plus", "recover", "visionzip"):  # selection only: rows of the patches
            assert torch.equal(out.features, inp.patches[b, out.index])


@pytest.mark.parametrize("method", list(METHODS))
def test_units_without_cls(method):
    inp = make(n=256, layout=UnitLayout(16, 16, cls=False))
    assert torch.equal(inp.patches, inp.hidden)
    if method in CLS_READERS:
        with pytest.raises(ValueError, match=rf"{method}.*CLS.*cls=False"):
            run(method, inp)
        return
    outs = run(method, inp, budget=30) if "budget" in METHODS[method] else run(method, inp)
    for b, out in enumerate(outs):
        assert torch.equal(out.features, inp.hidden[b, out.index])  # no row is taken for a CLS token


def test_layout_must_match_the_tokens():
    inp = make(n=576)
    with pytest.raises(ValueError, match="hidden has 577 tokens per unit; layout 24 x 12 needs a CLS token"):
        compress("none", with_layout(inp, UnitLayout(24, 12)))
    with pytest.raises(ValueError, match="rows and cols must be integers >= 1"):
        compress("none", with_layout(inp, UnitLayout(0, 576)))


def test_spatial_spreads_over_the_layout_grid():
    inp = make(n=24 * 12, layout=UnitLayout(24, 12))
    out = compress("spatial", inp, budget=32)[0]
    rows, cols = out.index // 12, out.index % 12
    assert out.num_tokens == 32 and int(rows.min()) <= 1 and int(rows.max()) >= 22 and int(cols.min()) <= 1 and int(cols.max()) >= 10
    assert torch.equal(out.index, torch.sort(grid_cells(24, 12, 32, torch.device("cpu"))).values)
    # a lattice shaped like the grid: about twice as many sampled rows as columns
    assert 1.5 <= rows.unique().numel() / cols.unique().numel() <= 2.5


# ------------------------------------------------------------------------------------- valid patches, budgets

FIXED = list(METHODS)  # every pre-projector method takes valid masks and per-unit budgets in its fixed variant
BUDGETED = [m for m in FIXED if m != "none"]
MERGING = ("prumerge", "prumerge_plus", "recover", "visionzip")  # outputs that are not one patch each


def rect(rows: int, cols: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """[rows * cols] bool: the rectangle rows [top, bottom) x cols [left, right) is valid (what unpadding leaves)."""
    grid = torch.zeros(rows, cols, dtype=torch.bool)
    grid[top:bottom, left:right] = True
    return grid.reshape(-1)


# 24 x 24 units: one whole, one 24 x 13 band (a tall image's crop), one 9 x 24 band (a wide image's crop)
VALID_24 = torch.stack([torch.ones(576, dtype=torch.bool), rect(24, 24, 0, 24, 5, 18), rect(24, 24, 7, 16, 0, 24)])
MIXED = [64, 30, 17]  # per-unit budgets, each within its unit's valid patches (576, 312, 216)
SHAPES = [(UnitLayout(24, 24), VALID_24),
          (UnitLayout(16, 16), torch.stack([rect(16, 16, 0, 16, 0, 16), rect(16, 16, 2, 14, 0, 16), rect(16, 16, 0, 16, 3, 9)])),
          (UnitLayout(24, 12), torch.stack([rect(24, 12, 0, 24, 0, 12), rect(24, 12, 0, 10, 0, 12), rect(24, 12, 0, 24, 1, 11)]))]


def units_input(layout: UnitLayout = UnitLayout(24, 24), valid: torch.Tensor = VALID_24, budgets=None, seed: int = 0) -> VisionInputs:
    inp = make(b=valid.shape[0], n=layout.num_patches, seed=seed, layout=layout)
    return VisionInputs(**{**vars(inp), "valid": valid.clone(), "budgets": budgets})


def fixed_params(method: str, **extra) -> dict:
    """The method's parameters without its budget (budgets / ratio / adaptive rules come from the test)."""
    params = {k: v for k, v in METHODS[method].items() if k != "budget"}
    if method in ("vispruner", "fastervlm", "cdpruner"):  # a required budget (per-unit budgets replace it)
        params["budget"] = 1
    if method == "visionzip":  # its own parameters (the defaults, 191 + 30, exceed the 9 x 24 unit)
        params.update(dominant=54, contextual=10)
    return {**params, **extra}


def check_valid_only(outs, valid: torch.Tensor) -> None:
    for b, out in enumerate(outs):
        idx = out.index[out.index >= 0]
        assert idx.unique().numel() == idx.numel(), f"unit {b}: a patch twice"
        assert bool(valid[b, idx].all()), f"unit {b}: an invalid patch {idx[~valid[b, idx]].tolist()} in the output"


@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("method", BUDGETED)
def test_mixed_budgets_exact_and_valid_only(method, shape):
    layout, valid = SHAPES[shape]
    budgets = [min(m, int(v)) for m, v in zip(MIXED, valid.sum(dim=1))]
    inp = units_input(layout, valid, budgets)
    outs = compress(method, inp, **fixed_params(method))
    assert [o.num_tokens for o in outs] == budgets
    check_valid_only(outs, valid)
    if method not in MERGING:
        for b, out in enumerate(outs):
            assert torch.equal(out.features, inp.patches[b, out.index]) and bool((out.index.diff() > 0).all())


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus", "recover", "visionzip", "topk_cls", "cdpruner"])
def test_budget_one_units_mixed_with_others(method):
    budgets = [1, 40, 2]
    outs = compress(method, units_input(budgets=budgets), **fixed_params(method))
    assert [o.num_tokens for o in outs] == budgets
    check_valid_only(outs, VALID_24)


@pytest.mark.parametrize("method", FIXED)
def test_adaptive_and_ratio_counts_over_valid_patches(method):
    """Without budgets: each method's own count rule, with N replaced by the unit's valid count."""
    params = fixed_params(method)
    if method in ("random", "topk_cls", "spatial"):
        params["ratio"] = 0.1
    if method == "divprune":
        params["ratio"] = 0.1
    outs = compress(method, units_input(), **params)
    check_valid_only(outs, VALID_24)
    counts = VALID_24.sum(dim=1).tolist()
    if method == "none":
        assert [o.num_tokens for o in outs] == counts
        assert all(torch.equal(o.index, torch.nonzero(VALID_24[b]).flatten()) for b, o in enumerate(outs))
    if method in ("random", "topk_cls", "spatial"):
        assert [o.num_tokens for o in outs] == [int(v * 0.1) for v in counts]
    if method == "divprune":
        assert [o.num_tokens for o in outs] == [int(round(0.1 * v)) for v in counts]
    if method == "visionzip":
        assert [o.num_tokens for o in outs] == [64] * 3


def marked(inp: VisionInputs, value: float) -> VisionInputs:
    """Every per-patch feature of the invalid patches set to `value` (hidden, last_hidden, projected, patch_embeds);
    CLIP's keys / queries stay as CLIP computed them (their CLS softmax runs over all keys)."""
    out = VisionInputs(**vars(inp))
    off = 1 if inp.grid.cls else 0
    hidden, last = inp.hidden.clone(), inp.last_hidden.clone()
    projected, embeds = inp.projected.clone(), inp.patch_embeds.clone()
    for b in range(inp.batch_size):
        bad = torch.nonzero(~inp.valid[b]).flatten()
        hidden[b, off + bad] = value
        last[b, off + bad] = value
        projected[b, bad] = value
        embeds[b, bad] = value
    out.hidden, out.last_hidden, out.projected, out.patch_embeds = hidden, last, projected, embeds
    return out


@pytest.mark.parametrize("budgets", [None, MIXED])
@pytest.mark.parametrize("method", FIXED)
def test_invalid_patches_contribute_nothing(method, budgets):
    if method == "none" and budgets is not None:
        return
    inp = units_input(budgets=budgets)
    params = fixed_params(method)
    big = compress(method, marked(inp, 1e6), **params)
    other = compress(method, marked(inp, -3e5), **params)
    assert same(big, other)  # what an invalid patch holds changes nothing, bit for bit
    assert max(float(o.features.abs().max()) for o in big) < 1e3  # and no output carries it, weighted or not


@pytest.mark.parametrize("budgets", [None, MIXED])
@pytest.mark.parametrize("method", FIXED)
def test_batch_equals_one_by_one(method, budgets):
    if method == "none" and budgets is not None:
        return
    inp = units_input(budgets=budgets)
    params = fixed_params(method)
    batched = compress(method, inp, **params)
    for b, out in enumerate(batched):
        single = compress(method, inp.image(b), **params)[0]
        assert torch.equal(out.index, single.index) and torch.equal(out.role, single.role)
        if method in MERGING:  # sums over padded lists may round differently (as batched merges always could)
            torch.testing.assert_close(out.features, single.features, rtol=1e-6, atol=1e-6)
        else:  # rows of the patches
            assert torch.equal(out.features, single.features)


@pytest.mark.parametrize("method", FIXED)
def test_all_valid_mask_is_no_mask(method):
    inp = make(b=3)
    params = {"budget": 48} if "budget" in METHODS[method] else fixed_params(method)
    plain = compress(method, inp, **params)
    assert same(compress(method, with_valid(inp, torch.ones(3, 576, dtype=torch.bool)), **params), plain)
    if "budget" in METHODS[method]:  # per-unit budgets all equal to `budget` == `budget`
        assert same(compress(method, with_valid(inp, None, budgets=[48] * 3), **params), plain)


def with_valid(inp: VisionInputs, valid, budgets=None) -> VisionInputs:
    return VisionInputs(**{**vars(inp), "valid": valid, "budgets": budgets})


def test_spatial_spreads_over_the_valid_rectangle():
    out = compress("spatial", units_input(), budget=40)
    for b, (top, bottom, left, right) in enumerate([(0, 24, 0, 24), (0, 24, 5, 18), (7, 16, 0, 24)]):
        rows, cols = out[b].index // 24, out[b].index % 24
        assert int(rows.min()) >= top and int(rows.max()) < bottom and int(cols.min()) >= left and int(cols.max()) < right
        assert int(rows.min()) <= top + 2 and int(rows.max()) >= bottom - 3 and int(cols.min()) <= left + 2 and int(cols.max()) >= right - 3
        h, w = bottom - top, right - left
        cells = grid_cells(h, w, 40, torch.device("cpu"))
        assert torch.equal(out[b].index, torch.sort((top + cells // w) * 24 + left + cells % w).values)


def test_spatial_needs_a_valid_rectangle():
    valid = VALID_24.clone()
    valid[1, 0] = True  # one patch outside the band: no longer a rectangle
    with pytest.raises(ValueError, match="313 valid patches of unit 1 do not fill their 24 x 18 bounding box"):
        compress("spatial", units_input(valid=valid), budget=10)


def test_iqr_fence_over_the_valid_patches_matches_numpy():
    np = pytest.importorskip("numpy")
    from lmms_tokprune.methods import iqr_outliers

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 50, generator=g) ** 4
    mask = torch.rand(6, 50, generator=g) > 0.4
    mask[0] = True
    mask[1] = False
    mask[1, 7] = True  # a single valid patch
    mask[2, :2] = True
    mask[2, 2:] = False
    got = iqr_outliers(scores, mask=mask)
    for b in range(6):
        row = scores[b, mask[b]].numpy().astype("float32")
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        expected = torch.zeros(50, dtype=torch.bool)
        expected[mask[b]] = torch.from_numpy(row > q3 + 1.5 * (q3 - q1))
        assert torch.equal(got[b], expected)
    assert torch.equal(iqr_outliers(scores, mask=torch.ones_like(mask)), iqr_outliers(scores))


# ------------------------------------------------------------------------------------------------ errors


def test_valid_and_budgets_are_validated():
    inp = units_input()
    with pytest.raises(ValueError, match=r"budgets\[2\]=217 must be an integer in \[1, 216\]: unit 2 has 216 valid patches"):
        compress("topk_cls", with_valid(inp, VALID_24, budgets=[5, 5, 217]))
    with pytest.raises(ValueError, match=r"budgets\[0\]=0 must be an integer"):
        compress("topk_cls", with_valid(inp, VALID_24, budgets=[0, 5, 5]))
    with pytest.raises(ValueError, match=r"budgets\[1\]=True must be an integer"):
        compress("topk_cls", with_valid(inp, VALID_24, budgets=[5, True, 5]))
    with pytest.raises(ValueError, match="budgets must be a sequence of 3 integers"):
        compress("topk_cls", with_valid(inp, VALID_24, budgets=[5, 5]))
    with pytest.raises(ValueError, match=r"valid must be a bool tensor \[B, N\] = \[3, 576\]"):
        compress("topk_cls", with_valid(inp, VALID_24.long()), budget=5)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor \[B, N\] = \[3, 576\]"):
        compress("topk_cls", with_valid(inp, VALID_24[:, :100]), budget=5)
    empty = VALID_24.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="unit 1 has no valid patch"):
        compress("topk_cls", with_valid(inp, empty), budget=5)
    with pytest.raises(ValueError, match="budget=300 is more than unit 2's 216 valid patches"):
        compress("topk_cls", with_valid(inp, VALID_24), budget=300)
    with pytest.raises(ValueError, match="none keeps every valid patch"):
        compress("none", with_valid(inp, VALID_24, budgets=[576, 300, 216]))
    assert [o.num_tokens for o in compress("none", with_valid(inp, VALID_24, budgets=[576, 312, 216]))] == [576, 312, 216]


@pytest.mark.parametrize("method", FIXED)
def test_reference_refuses_valid_masks_and_budgets(method):
    inp = units_input()
    params = {k: v for k, v in METHODS[method].items()}
    for given in ({"valid": VALID_24}, {"valid": None, "budgets": [5, 5, 5]}):
        one = with_valid(inp.image(0), **{k: (v[:1] if k == "valid" and v is not None else v[:1] if k == "budgets" else v) for k, v in given.items()})
        with pytest.raises(ValueError, match=rf"{method} \(reference\): the released code has no .*(valid-patch masks|per-unit budgets).*variant=fixed"):
            compress(method, one, variant="reference", **params)


def test_methods_that_do_not_take_units_refuse_them():
    import dataclasses

    from lmms_tokprune.methods import get_method
    from lmms_tokprune.methods.registry import BoundMethod

    plain = BoundMethod(dataclasses.replace(get_method("none"), unit_aware=False), "fixed", {})
    with pytest.raises(ValueError, match="method 'none' does not take valid-patch masks"):
        plain(units_input())


# --------------------------------------------------------------------------- each rule over the valid patches


def fixed_attention(inp: VisionInputs) -> torch.Tensor:
    from lmms_tokprune.methods.signals import FIXED_DTYPE, cls_attention

    return cls_attention(inp.q, inp.k, FIXED_DTYPE)  # what fixed ranks (settled float64)


def test_prumerge_fence_over_the_valid_patches():
    np = pytest.importorskip("numpy")
    inp = units_input()
    attn = fixed_attention(inp).float()
    outs = compress("prumerge", inp)
    for b, out in enumerate(outs):
        row = attn[b, VALID_24[b]].numpy()
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        k = max(1, int((row > q3 + 1.5 * (q3 - q1)).sum()))
        assert out.num_tokens == k + 1
        assert set(out.index[:-1].tolist()) == set(torch.nonzero(VALID_24[b]).flatten()[torch.topk(attn[b, VALID_24[b]], k).indices].tolist())


def test_prumerge_plus_stride_runs_over_the_valid_list():
    from lmms_tokprune.methods import ROLE_KEPT, ROLE_MERGED

    outs = compress("prumerge_plus", units_input(), adaptive=False, ratio=0.05)
    for b, out in enumerate(outs):
        patches = torch.nonzero(VALID_24[b]).flatten().tolist()  # the valid list, raster order
        v = len(patches)
        k = max(1, int(v * 0.05))
        stride = max(1, int(int(1 / (k / v)) / 3))
        kept = out.index[out.role == ROLE_KEPT].tolist()
        assert len(kept) == k
        assert out.index[out.role == ROLE_MERGED].tolist() == sorted({patches[p] for p in range(0, v - 1, stride)} - set(kept))


def test_visionzip_targets_stride_over_the_remaining_valid_patches():
    from lmms_tokprune.methods import ROLE_KEPT, ROLE_MERGED
    from lmms_tokprune.methods.visionzip import split_budget

    outs = compress("visionzip", units_input(budgets=MIXED))
    for b, out in enumerate(outs):
        dominant, contextual = split_budget(MIXED[b])
        kept = out.index[out.role == ROLE_KEPT].tolist()
        assert len(kept) == dominant - 1
        rest = [p for p in torch.nonzero(VALID_24[b]).flatten().tolist() if p not in kept]
        step = max(1, len(rest) // contextual)
        assert out.index[out.role == ROLE_MERGED].tolist() == [rest[i * step] for i in range(contextual)]


def test_recover_lof_fractions_over_the_valid_patches():
    pytest.importorskip("sklearn")
    from sklearn.neighbors import LocalOutlierFactor

    from lmms_tokprune.methods import ROLE_KEPT

    inp = units_input()
    attn = fixed_attention(inp)
    outs = compress("recover", inp)
    for b, out in enumerate(outs):
        row = attn[b, VALID_24[b]].float().numpy().reshape(-1, 1)
        fraction = float((LocalOutlierFactor(n_neighbors=20).fit_predict(row) == -1).mean())
        assert int((out.role == ROLE_KEPT).sum()) == int(len(row) * fraction)


@pytest.mark.parametrize("important_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("rows,cols,bands,budgets", [
    (6, 7, [(0, 5, 0, 1), (1, 6, 2, 3)], [4, 2]),  # equal lists, different budgets: the units' rounds part ways
    (24, 24, [(0, 24, 0, 24), (0, 24, 5, 18), (7, 16, 0, 24), (3, 4, 0, 24)], [64, 30, 17, 24]),
    (16, 16, [(0, 16, 0, 16), (0, 16, 0, 16), (2, 14, 0, 16)], [5, 150, 1]),
])
def test_vispruner_rounds_per_unit(rows, cols, bands, budgets, important_ratio):
    valid = torch.stack([rect(rows, cols, *band) for band in bands])
    inp = units_input(UnitLayout(rows, cols), valid, budgets)
    outs = compress("vispruner", inp, budget=1, important_ratio=important_ratio)
    assert [o.num_tokens for o in outs] == budgets
    check_valid_only(outs, valid)
    for b, out in enumerate(outs):
        assert torch.equal(out.index, compress("vispruner", inp.image(b), budget=1, important_ratio=important_ratio)[0].index)

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

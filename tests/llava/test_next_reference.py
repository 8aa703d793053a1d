"""`variant=reference` on LLaVA-NeXT: what each release computes on NeXT (shared/PEERS.md "LLaVA-NeXT"), against plain-torch
readings of the released NeXT code written here (never copied), on tiny NeXT inputs of 3-, 4- and 5-crop images; each quirk
undone changes the result; refusals where no release has a NeXT path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options
from lmms_tokprune.llava.vision import run_clip


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


# ------------------------------------------------------------------------------ per-crop releases: readings of their NeXT code
# (from visionzip/clip_encoder.py + llava_arch.py::restore_image_features_sorted, and the encode_images +
# prepare_inputs_labels_for_multimodal of VisPruner / FasterVLM / CDPruner with '_unpad' stripped: written here from reading
# them). Inputs are the CLIP states the engine captures (one row per unit: base, then the crops in raster order).
SIZES = {3: (336, 336), 4: (1000, 300), 5: (640, 480)}  # units (base + crops) -> an image of that grid
SIDE = 24


def _image(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _captured(engine, image, question="What is in the picture?"):
    """The unit batch of one image, the method's inputs as the engine captures them, and the LLM's visual span."""
    sample = Sample(question, [image], [0])
    batch = engine.family.units([image])
    states = run_clip(engine.vision_tower, engine.pixels_on_device(batch.pixel_values), feature_layer=engine.feature_layer,
                      need_feature_qk=True)
    units = batch.images[0].units
    texts = engine.guidance_texts([sample], [engine.prompt_text(sample)])
    inputs = engine.method_inputs(states, list(range(units)), texts * units)
    prepared = engine.prepare([sample])
    span = prepared.llm.inputs_embeds[0][prepared.llm.image_mask[0] | _layout(prepared)]
    return batch.images[0], inputs, span, prepared


def _layout(prepared):
    mask = prepared.llm.layout_mask
    return torch.zeros_like(prepared.llm.image_mask[0]) if mask is None else mask[0]


def _cls_rows(fq, fk, heads):
    """[U, H, N]: each unit's CLS query row of its feature block's attention over all keys, CLS column dropped."""
    u, t, d = fq.shape
    hd = d // heads
    q = fq[:, :1].reshape(u, 1, heads, hd).transpose(1, 2)
    k = fk.reshape(u, t, heads, hd).transpose(1, 2)
    return torch.softmax((q * hd**-0.5) @ k.transpose(-1, -2), dim=-1)[:, :, 0, 1:]


def _grid_rows(x, rows, cols):
    """Grid crops' per-patch rows [rows*cols, 576, ...] -> the stitched map in global raster order (no unpadding)."""
    tail = x.shape[2:]
    return x.reshape(rows, cols, SIDE, SIDE, *tail).transpose(1, 2).reshape(rows * SIDE * cols * SIDE, *tail)


def read_visionzip(inp, dominant, contextual, rows, cols, cls_tokens=True):
    """Released VisionZip on a NeXT image: per unit CLS + dominant (head-summed block attention) + contextual tokens;
    base output whole, grid dominant patches in global raster order, grid CLS tokens, grid contextual tokens."""
    h, fk = inp.hidden, inp.feature_k
    u, t, d = h.shape
    hd = d // inp.num_heads
    top = _cls_rows(inp.feature_q, fk, inp.num_heads).sum(dim=1).topk(dominant - 1, dim=1).indices + 1
    index = torch.cat([torch.zeros(u, 1, dtype=torch.long), top], dim=1)
    rest = torch.ones(u, t, dtype=torch.bool).scatter_(1, index, False)
    dom = h[~rest].view(u, dominant, d)
    metric = fk.view(u, t, inp.num_heads, hd).mean(dim=2)[rest].view(u, t - dominant, hd)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    others = h[rest].view(u, t - dominant, d)
    step = max(1, metric.shape[1] // contextual)
    targets = torch.arange(0, metric.shape[1], step)[:contextual]
    members = ~torch.isin(torch.arange(metric.shape[1]), targets)
    assign = torch.zeros(u, int(members.sum()), contextual).scatter_(2, (metric[:, members] @ metric[:, targets].transpose(1, 2)).argmax(2, keepdim=True), 1.0)
    ctx = others[:, targets] + assign.transpose(1, 2) @ others[:, members] / assign.sum(dim=1).clamp(min=1)[..., None]
    out = torch.cat([dom, ctx], dim=1)
    base, grid, kept = out[0], out[1:], torch.zeros(u - 1, t - 1, dtype=torch.bool)
    kept.scatter_(1, index[1:, 1:] - 1, True)
    placed = torch.zeros(u - 1, t - 1, d)
    placed[kept] = grid[:, 1:dominant].reshape(-1, d)
    parts = [base, _grid_rows(placed, rows, cols)[_grid_rows(kept, rows, cols)]]
    parts += [grid[:, 0]] if cls_tokens else []
    return torch.cat(parts + [grid[:, dominant:].reshape(-1, d)])


def read_spatial(inp, masks, rows, cols):
    """The spatial layout of VisPruner / FasterVLM / CDPruner ('_unpad' stripped): base[mask], then the stitched grid's
    kept patches in global raster order; no newline."""
    h = inp.hidden[:, 1:]
    return torch.cat([h[0][masks[0]], _grid_rows(h[1:], rows, cols)[_grid_rows(masks[1:], rows, cols)]])


def read_fastervlm_masks(inp, budget):
    a = _cls_rows(inp.feature_q, inp.feature_k, inp.num_heads).mean(dim=1)
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(budget, dim=1).indices, True)


def read_vispruner_masks(inp, budget, ratio=0.5):
    """encode_images over the image's units as one batch: important by attention, then rounds of even/odd matching."""
    a = _cls_rows(inp.feature_q, inp.feature_k, inp.num_heads).mean(dim=1)
    b = a.shape[0]
    imp, div = int(budget * ratio), budget - int(budget * ratio)
    order = a.argsort(dim=-1, descending=True)
    important, residual = order[:, :imp], order[:, imp:]
    x = inp.hidden[:, 1:] / inp.hidden[:, 1:].norm(dim=-1, keepdim=True)
    while div > 0:
        r_len = residual.shape[1]
        r = min(8, r_len - div)
        if r <= 0:
            break
        tokens = x[torch.arange(b)[:, None], residual]
        scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(1, 2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[:, ::2][torch.arange(b)[:, None], distinct], residual[:, 1::2]], dim=-1)
    chosen = torch.cat([important, residual], dim=-1) if div > 0 else important
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, chosen, True)


def read_cdpruner_masks(inp, budget, joint=True):
    """encode_images with all of the image's units as the batch: relevance min-maxed over all of them (joint)."""
    p = inp.projected / inp.projected.norm(dim=-1, keepdim=True)
    sim = (p.float() @ p.float().transpose(1, 2))
    e = inp.patch_embeds / inp.patch_embeds.norm(dim=-1, keepdim=True)
    t = inp.text_segments[0] / inp.text_segments[0].norm(dim=-1, keepdim=True)
    rel = (-(e @ t.t())).mean(dim=-1)
    lo, hi = (rel.min(), rel.max()) if joint else (rel.min(1, keepdim=True).values, rel.max(1, keepdim=True).values)
    rel = (rel - lo + 1e-6) / (hi - lo)
    kernel = rel[:, :, None] * sim * rel[:, None, :]
    b, n = rel.shape
    rows = torch.arange(b)
    cis, gains, picks = torch.zeros(budget, b, n), torch.diagonal(kernel, dim1=1, dim2=2).clone(), []
    for i in range(budget):
        j = gains.argmax(dim=-1)
        picks.append(j)
        e_i = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / gains[rows, j].sqrt()[:, None]
        cis[i] = e_i
        gains = gains - e_i**2
        gains[rows, j] = -float("inf")
    return torch.zeros(b, n, dtype=torch.bool).scatter_(1, torch.stack(picks, dim=1), True)


def _project(engine, feats):
    with torch.no_grad():
        return engine.projector(feats)


@pytest.fixture(scope="module")
def reference_engines(tiny_next, tiny_clip):
    return {name: _engine(tiny_next, method=name, variant="reference", **params, **({"text_encoder": str(tiny_clip)} if name == "cdpruner" else {}))
            for name, params in [("visionzip", {"budget": 32}), ("fastervlm", {"budget": 29}), ("vispruner", {"budget": 32}),
                                 ("cdpruner", {"budget": 32})]}


@pytest.mark.parametrize("units", sorted(SIZES))
@pytest.mark.parametrize("method", ["visionzip", "fastervlm", "vispruner", "cdpruner"])
def test_per_crop_reference_is_the_released_next_code(reference_engines, method, units):
    engine = reference_engines[method]
    image, inp, span, prepared = _captured(engine, _image(SIZES[units], seed=units))
    grid = image.placement
    assert image.units == units and (grid.rows * grid.cols) == units - 1
    budget = engine.method.budget
    if method == "visionzip":
        feats = read_visionzip(inp, budget - 5 * budget // 32, 5 * budget // 32, grid.rows, grid.cols)
    else:
        masks = {"fastervlm": read_fastervlm_masks, "vispruner": read_vispruner_masks, "cdpruner": read_cdpruner_masks}[method](inp, budget)
        feats = read_spatial(inp, masks, grid.rows, grid.cols)
    torch.testing.assert_close(span, _project(engine, feats), rtol=1e-5, atol=1e-5)
    st = prepared.stats[0]
    assert st.layout_tokens == 0 and st.units == units and st.visual_tokens_in == image.visual_tokens_in  # no newline
    assert st.visual_tokens_kept == feats.shape[0] and (method == "cdpruner" or feats.shape[0] == units * budget)  # per crop


def test_visionzip_quirks_cls_tokens_and_no_unpadding(reference_engines):
    engine = reference_engines["visionzip"]
    image, inp, span, _ = _captured(engine, _image(SIZES[5], seed=5))
    grid, budget = image.placement, engine.method.budget
    dom, ctx = budget - 5 * budget // 32, 5 * budget // 32
    without_cls = read_visionzip(inp, dom, ctx, grid.rows, grid.cols, cls_tokens=False)
    assert without_cls.shape[0] == span.shape[0] - (image.units - 1)  # the grid crops' CLS tokens are LLM tokens
    fixed = _engine(engine_path(engine), method="visionzip", budget=budget, budget_scope="unit")
    _, _, fixed_span, _ = _captured(fixed, _image(SIZES[5], seed=5))
    assert fixed_span.shape != span.shape or not torch.allclose(fixed_span, span)  # unpadding + newlines: another sequence
    kept_outside = _kept_outside_box(engine, _image(SIZES[5], seed=5))
    assert kept_outside > 0, "the release keeps grid patches that unpadding would remove"


def engine_path(engine):
    return engine.model.config._name_or_path


def _kept_outside_box(engine, image):
    sample = Sample("q", [image], [0])
    prepared = engine.prepare([sample])
    grid = engine.family.plan_image(image).placement
    outside = 0
    for crop, comp in enumerate(prepared.compressed[0][1:]):
        patch = comp.index[comp.index >= 0]
        row = (crop // grid.cols) * grid.side + patch // grid.side
        col = (crop % grid.cols) * grid.side + patch % grid.side
        outside += int(((row < grid.top) | (row >= grid.bottom) | (col < grid.left) | (col >= grid.right)).sum())
    return outside


def test_spatial_quirks_no_unpadding_no_newline(reference_engines, tiny_next):
    # 500 per crop: more than the 432 patches a top crop of a 640x480 image has inside the unpadded box
    assert _kept_outside_box(_engine(tiny_next, method="fastervlm", variant="reference", budget=500), _image(SIZES[5], seed=5)) > 0
    engine = reference_engines["fastervlm"]
    newline = engine.family.image_newline.detach()
    _, _, span, prepared = _captured(engine, _image(SIZES[5], seed=5))
    assert not any(torch.equal(row, newline) for row in span) and prepared.llm.layout_mask is None


def test_cdpruner_min_max_over_all_crops_of_the_call(reference_engines):
    engine = reference_engines["cdpruner"]
    changed = 0
    for units, size in SIZES.items():
        image, inp, span, _ = _captured(engine, _image(size, seed=units))
        grid = image.placement
        per_crop = read_spatial(inp, read_cdpruner_masks(inp, engine.method.budget, joint=False), grid.rows, grid.cols)
        changed += int(per_crop.shape != span.shape or not torch.allclose(_project(engine, per_crop), span, atol=1e-5))
    assert changed, "min-max per crop instead of over the call must change some image's tokens"


def test_per_crop_reference_counts_and_budget_scope(tiny_next):
    with pytest.raises(ValueError, match="budget_scope=image does not apply to visionzip variant=reference on LLaVA-NeXT"):
        _engine(tiny_next, method="visionzip", variant="reference", budget=32, budget_scope="image")
    with pytest.raises(ValueError, match="budget=600 is outside"):
        _engine(tiny_next, method="fastervlm", variant="reference", budget=600)
    engine = _engine(tiny_next, method="visionzip", variant="reference", budget=64)
    _, stats = engine.generate([Sample("q", [_image(SIZES[3])], [0]), Sample("q", [_image(SIZES[5])], [1])], {"max_new_tokens": 1})
    assert [st.visual_tokens_kept for st in stats] == [3 * 64, 5 * 64]  # batch > 1 runs (per image, as released)


# --------------------------------------------------------------- in-LLM releases over NeXT's packed span: DART, PyramidDrop
# Readings of modeling_llama_self.py's '1.6' path (DART: image_token_length = the sequence minus text_length, TOKEN_TOPK =
# int(min(retain_token_num_for_llava_next, L - 4) // 8)) and of modeling_llama_pdrop.py (image_tokens = the packed length
# per sample), on a small random Llama; the visual span is what LLaVA-NeXT packs for a 3-, 4- or 5-unit image.
LAYERS, WIDTH, SYS, QUESTION = 5, 64, 35, 12


def packed_layout(size):
    """(L, newline mask [L]) of the packed span of a (width, height) image: 576 base tokens, the unpadded H' x W' grid
    read row by row with a newline after every row."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    from lmms_tokprune.llava.families.llava_next import unpadded_box
    from lmms_tokprune.offline_processors import GRID_PINPOINTS

    rows, cols = get_anyres_image_grid_shape((size[1], size[0]), [list(p) for p in GRID_PINPOINTS], 336)
    top, bottom, left, right = unpadded_box(size[1], size[0], rows * SIDE, cols * SIDE)
    h, w = bottom - top, right - left
    newline = torch.zeros(SIDE * SIDE + h * (w + 1), dtype=torch.bool)
    newline[SIDE * SIDE + w::w + 1] = True
    return newline.numel(), newline


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=WIDTH, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=LAYERS,
                         vocab_size=8, max_position_embeddings=4096)
    model = LlamaModel(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    path = tmp_path_factory.mktemp("next-llama")
    model.save_pretrained(path)
    return tuple(LlamaModel.from_pretrained(path, attn_implementation=impl).eval() for impl in ("sdpa", "eager"))


def packed_rows(sizes, seed=0):
    """One unpadded row per image size (all of one length when the sizes agree): SYS prefix, the packed span (newline
    rows share one vector, as image_newline does), QUESTION text tokens. -> inputs_embeds, attention_mask, image_mask,
    layout_mask, newline masks per row."""
    g = torch.Generator().manual_seed(seed)
    spans = [packed_layout(s) for s in sizes]
    t = max(SYS + span + QUESTION for span, _ in spans)
    x, mask = torch.zeros(len(sizes), t, WIDTH), torch.zeros(len(sizes), t, dtype=torch.long)
    image, layout = torch.zeros(len(sizes), t, dtype=torch.bool), torch.zeros(len(sizes), t, dtype=torch.bool)
    newline = torch.randn(WIDTH, generator=g)
    for b, (span, nl) in enumerate(spans):
        n = SYS + span + QUESTION
        pad = t - n
        x[b, pad:] = torch.randn(n, WIDTH, generator=g)
        x[b, pad + SYS:pad + SYS + span][nl] = newline
        mask[b, pad:] = 1
        image[b, pad + SYS:pad + SYS + span] = ~nl
        layout[b, pad + SYS:pad + SYS + span] = nl
    return x, mask, image, layout


def _eager(model, i, h, pos, cache=None):
    """Eager layer i with the causal mask the released loops pass; returns (output, its attention map)."""
    maps = []
    hook = model.layers[i].self_attn.register_forward_hook(lambda mod, args, out: maps.append(out[1]))
    t = h.shape[1]
    try:
        out = model.layers[i](h, attention_mask=torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None], position_ids=pos,
                              past_key_values=cache, use_cache=cache is not None, position_embeddings=model.rotary_emb(h, pos))
    finally:
        hook.remove()
    return out, maps[0]


@torch.no_grad()
def dart_next_release(model, x, span, newline, k=2, retain=320, p_img=4, p_txt=4, newline_candidates=True, cap=True):
    """DART's '1.6' prefill at batch 1: image span [SYS, SYS + L) with L = the sequence minus its text (newlines inside);
    TOKEN_TOPK = int(min(retain, L - p_img) // (p_img + p_txt)); L1-norm pivots of layer k-1's keys, the set order of their
    positions, least-cosine picks of model.norm(layer k-1's output); original positions. newline_candidates=False and
    cap=False undo the quirks (newlines always kept and never picked; no retain cap)."""
    from transformers import DynamicCache

    t = x.shape[1]
    cache, pos, h, kept = DynamicCache(config=model.config), torch.arange(t)[None], x, None
    for i in range(LAYERS):
        if i == k:
            feats = model.norm(h)[0]
            keys = cache.layers[k - 1].keys.permute(0, 2, 1, 3).reshape(1, t, -1)[0]
            image = [SYS + j for j in range(span) if newline_candidates or not bool(newline[j])]
            per = int((min(retain, span - p_img) if cap else span - p_img) // (p_img + p_txt))
            l1 = keys.norm(p=1, dim=-1)
            image_piv = [image[j] for j in l1[image].topk(p_img).indices.tolist()]
            text_piv = (l1[SYS + span:].topk(p_txt).indices + SYS + span).tolist()
            chosen, pool = set(image_piv + text_piv), set(image) - set(image_piv)
            for pivot in list(set(image_piv + text_piv)):
                cands = list(pool)
                picks = [cands[j] for j in (-F.cosine_similarity(feats[pivot], feats[cands], dim=-1)).topk(per).indices.tolist()]
                chosen.update(picks)
                pool.difference_update(picks)
            chosen.difference_update(text_piv)
            always = [SYS + j for j in range(span) if not newline_candidates and bool(newline[j])]
            keep = torch.tensor(sorted(set(range(SYS)) | chosen | set(always) | set(range(SYS + span, t))))
            h, pos, kept = h[:, keep], keep[None], keep.tolist()
        h = _eager(model, i, h, pos, cache)[0]
    return kept, model.norm(h[:, -1])


@torch.no_grad()
def pdrop_next_release(model, x, span, newline, layer_list=(1, 2, 4), ratios=(0.5, 0.25, 0.125), newline_candidates=True):
    """PDrop's prefill per row: image_tokens = the packed length L; before layer l_s its own q/k on the current tokens,
    the last token's row, fp32 softmax, head mean, columns [SYS, SYS + int(L * r_s)); topk(int(L * r_{s+1})), sorted;
    positions renumbered. newline_candidates=False: the newlines always stay and the counts are of the patches."""
    rs = [1.0, *ratios]
    t = x.shape[1]
    keepers = [j for j in range(span) if not bool(newline[j])] if not newline_candidates else list(range(span))
    n = len(keepers)
    h, orig, kept = x, torch.arange(t), []
    cand = torch.tensor([SYS + j for j in keepers])
    for i in range(LAYERS):
        pos = torch.arange(h.shape[1])[None]
        if i in layer_list:
            s = list(layer_list).index(i)
            attn = _eager(model, i, h, pos)[1][0].mean(dim=0)[-1]
            where = torch.tensor([int(torch.nonzero(orig == c)[0]) for c in cand.tolist()])
            top = cand[attn[where].topk(int(n * rs[s + 1])).indices]
            cand = top.sort().values
            stay = [p for p in orig.tolist() if not SYS <= p < SYS + span or (not newline_candidates and bool(newline[p - SYS]))]
            keep_orig = sorted(set(stay) | set(cand.tolist()))
            index = torch.tensor([int(torch.nonzero(orig == p)[0]) for p in keep_orig])
            h, orig = h[:, index], orig[index]
            kept.append(orig.tolist())
            pos = torch.arange(h.shape[1])[None]
        h = _eager(model, i, h, pos)[0]
    return kept, model.norm(h[:, -1])


@pytest.mark.parametrize("units", sorted(SIZES))
def test_dart_reference_on_next_is_the_released_packed_path(small_llama, units):
    from lmms_tokprune.llava.llm_pruning import prune_prefill

    sdpa, eager = small_llama
    x, mask, image, layout = packed_rows([SIZES[units]], seed=units)
    span, newline = packed_layout(SIZES[units])
    retain = 320 if units != 3 else 96
    res = prune_prefill("dart", sdpa, x, mask, image, "reference", layout_mask=layout, k=2, retain_token_num_for_llava_next=retain)
    kept, last = dart_next_release(eager, x, span, newline, k=2, retain=retain)
    assert res.kept_positions[0][0].tolist() == kept
    torch.testing.assert_close(res.last_hidden, last, rtol=1e-4, atol=1e-4)
    picks = len(kept) - SYS - QUESTION
    assert picks == 4 + 8 * (min(retain, span - 4) // 8)  # 4 pivots + 8 * TOKEN_TOPK, newlines included
    kept_newlines = sum(bool(newline[p - SYS]) for p in kept if SYS <= p < SYS + span)
    assert res.visual_per_layer[0][-1] == picks - kept_newlines  # a kept newline is not a visual token
    # the quirks undone change the kept set
    assert dart_next_release(eager, x, span, newline, k=2, retain=retain, newline_candidates=False)[0] != kept
    if units == 5:
        assert dart_next_release(eager, x, span, newline, k=2, retain=retain, cap=False)[0] != kept


@pytest.mark.parametrize("units", sorted(SIZES))
def test_pdrop_reference_on_next_is_the_released_packed_path(small_llama, units):
    from lmms_tokprune.llava.llm_pruning import prune_prefill

    sdpa, eager = small_llama
    x, mask, image, layout = packed_rows([SIZES[units]], seed=10 + units)
    span, newline = packed_layout(SIZES[units])
    res = prune_prefill("pdrop", sdpa, x, mask, image, "reference", layout_mask=layout, layer_list=(1, 2, 4),
                        image_token_ratio_list=(0.5, 0.25, 0.125))
    kept, last = pdrop_next_release(eager, x, span, newline)
    assert [p.tolist() for p in res.kept_positions[0]] == kept
    torch.testing.assert_close(res.last_hidden, last, rtol=1e-4, atol=1e-4)
    assert [len(k) - SYS - QUESTION for k in kept] == [int(span * r) for r in (0.5, 0.25, 0.125)]  # int(L * ratio), L with newlines
    assert pdrop_next_release(eager, x, span, newline, newline_candidates=False)[0] != kept


def test_in_llm_next_reference_batch_rules(small_llama):
    from lmms_tokprune.llava.llm_pruning import prune_prefill

    sdpa, eager = small_llama
    x, mask, image, layout = same = packed_rows([SIZES[3], SIZES[3]], seed=7)
    res = prune_prefill("pdrop", sdpa, x, mask, image, "reference", layout_mask=layout, layer_list=(1, 2, 4))  # unpadded rows: each row its own ranking
    span, newline = packed_layout(SIZES[3])
    for b in range(2):
        assert [p.tolist() for p in res.kept_positions[b]] == pdrop_next_release(eager, same[0][b:b + 1], span, newline)[0]
    x, mask, image, layout = packed_rows([SIZES[3], SIZES[4]], seed=7)
    with pytest.raises(ValueError, match="pdrop \\(reference\\): the released code's mask preparation crashes on padded rows"):
        prune_prefill("pdrop", sdpa, x, mask, image, "reference", layout_mask=layout, layer_list=(1, 2, 4))
    with pytest.raises(ValueError, match="dart \\(reference\\): the released code asserts batch size 1"):
        prune_prefill("dart", sdpa, *same[:3], "reference", layout_mask=same[3])
    x, mask, image, layout = packed_rows([SIZES[3]])
    with pytest.raises(ValueError, match="dart \\(reference\\) on LLaVA-NeXT: .*give retain_token_num_for_llava_next"):
        prune_prefill("dart", sdpa, x, mask, image, "reference", layout_mask=layout, budget=200)


# ----------------------------------------------------------------------- DivPrune over the packed sequence of sample 0
def divprune_release(window, ratio):
    """DivPrune(...) of vbdi/divprune's llava_arch.py on the image window [L, D]: int(round(ratio * L)) picks, the first by
    the second-smallest cosine distance of each column, then the max of the min distance to the picks (picks not masked)."""
    count = int(round(ratio * window.shape[0]))
    unit = window / window.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    picks = []
    for i in range(count):
        scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :] if i == 0 else dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return torch.tensor(picks)


def packed_row_after_divprune(row, span, picks):
    """The release's keep_indexs: the prefix, the picks (sorted, repeats kept) inside the window, the rest."""
    start, end = int(torch.nonzero(span)[0]), int(torch.nonzero(span)[-1]) + 1
    keep = torch.cat([torch.arange(start), picks + start, torch.arange(end, row.shape[0])]).sort().values
    return row[keep]


def _rows(prepared):
    llm = prepared.llm
    span = llm.image_mask | (llm.layout_mask if llm.layout_mask is not None else torch.zeros_like(llm.image_mask))
    return [(llm.inputs_embeds[b][llm.attention_mask[b].bool()], span[b][llm.attention_mask[b].bool()]) for b in range(span.shape[0])]


@pytest.fixture(scope="module")
def packed_engines(tiny_next):
    return _engine(tiny_next, method="none"), _engine(tiny_next, method="divprune", variant="reference", ratio=0.098)


@pytest.mark.parametrize("units", sorted(SIZES))
def test_divprune_reference_on_next_selects_over_the_packed_sequence(packed_engines, units):
    none, ref = packed_engines
    sample = Sample("What is in the picture?", [_image(SIZES[units], seed=units)], [0])
    (row, span), = _rows(none.prepare([sample]))
    prepared = ref.prepare([sample])
    (ours, _), = _rows(prepared)
    window = row[span]
    picks = divprune_release(window, 0.098)
    torch.testing.assert_close(ours, packed_row_after_divprune(row, span, picks))
    newline = none.family.image_newline.detach()
    is_newline = torch.tensor([torch.equal(w, newline) for w in window])
    st = prepared.stats[0]
    assert st.visual_tokens_kept + sum(bool(is_newline[p]) for p in picks.tolist()) == int(round(0.098 * window.shape[0]))
    units = prepared.compressed[0]  # what each unit holds of the selection (token maps)
    assert sum(u.num_tokens for u in units) == st.visual_tokens_kept
    assert sorted(units[0].index.tolist()) == sorted(p for p in picks.tolist() if p < SIDE * SIDE)
    grid = ref.family.plan_image(sample.images[0]).placement
    for crop, unit in enumerate(units[1:]):
        patch = unit.index
        row, col = (crop // grid.cols) * SIDE + patch // SIDE, (crop % grid.cols) * SIDE + patch % SIDE
        packed = SIDE * SIDE + (row - grid.top) * (grid.width + 1) + (col - grid.left)
        assert sorted(packed.tolist()) == sorted(p for p in picks.tolist() if p >= SIDE * SIDE and not bool(is_newline[p])
                                                 and _crop_of(p, grid) == crop)
    # newline tokens are candidates: leaving them out gives another selection
    patches = torch.nonzero(~is_newline).flatten()
    assert not torch.equal(patches[divprune_release(window[~is_newline], 0.098)].sort().values, picks.sort().values)


def _crop_of(p, grid):
    """The crop of packed position p (a grid patch, not a newline)."""
    q = p - SIDE * SIDE
    row, col = grid.top + q // (grid.width + 1), grid.left + q % (grid.width + 1)
    return (row // SIDE) * grid.cols + col // SIDE


def test_divprune_reference_on_next_uses_sample_0s_window(packed_engines):
    none, ref = packed_engines
    samples = [Sample("What is in the picture?", [_image(SIZES[5], seed=s)], [s]) for s in (1, 2)]
    rows = _rows(none.prepare(samples))
    ours = _rows(ref.prepare(samples))
    picks = divprune_release(rows[0][0][rows[0][1]], 0.098)
    for (row, span), (mine, _) in zip(rows, ours):
        torch.testing.assert_close(mine, packed_row_after_divprune(row, span, picks))  # sample 0's positions in every row
    own = divprune_release(rows[1][0][rows[1][1]], 0.098)
    assert not torch.equal(own.sort().values, picks.sort().values)  # its own window would choose otherwise
    with pytest.raises(ValueError, match="divprune \\(reference\\): the release selects over sample 0's packed window"):
        ref.prepare([Sample("q", [_image(SIZES[5])], [0]), Sample("q", [_image(SIZES[3])], [1])])

"""PyramidDrop (Xing et al., CVPR'25; released code: Cooperx521/PyramidDrop @ 6444f30,
llava/model/modeling_llama_pdrop.py pdrop_forward / pdrop_rank_drop). Cuts before each layer of `layer_list`:

With r_0 = 1 prepended, the cut before layer l_s keeps int(N * r_s) of the int(N * r_{s-1}) current image tokens
(counts come from the ratios, not from the sequence: int(576 * 0.0676) = 38).
1. At cut l_s, before that layer runs: ITS input norm and q / k on its input, rotary at the current positions;
   row = the last prompt token; softmax over the keys, head mean; columns = the current image span; topk,
   kept in sequence order. System and text tokens stay.
2. Positions are RENUMBERED 0..T'-1 after every cut; each layer caches what it processed (641 / 353 / 209 / 137
   for a 30-token question); a decoded token's position at a layer = that layer's prefill length + t.

N = the row's image tokens (576 per image; the counts are ratios of the row's whole visual span, as the release
computes them over the packed span on LLaVA-NeXT). `budget=n` (equivalent visual tokens, input counting): keeps
`layer_list` and sets the ratios to [λ, λ², λ³, ...], λ on a 0.001 grid, every stage >= 1 token, the nearest
equivalent (the smallest λ on ties): [8,16,24] reaches 163.5..576 (192 -> λ 0.254: 146/37/9); [2,6,12] reaches
46.75..576 (128 -> 0.463, 64 -> 0.240). No official 192/128/64 settings exist (PyramidDrop issues #10, #27).
Images of other sizes (LLaVA-NeXT, `LLMContext.image_tokens`): the ratios stay ratios of the row's patch tokens
N_row = sum_i N_i (layout tokens never count nor drop); `budget=n` (per image) resolves one λ per row as for one
image of the row's mean size N_row / m (m images; = 576 for LLaVA-1.5 rows, so the same λ), clamped into the
reachable range of that size; the achieved equivalent is reported.

LLaVA-NeXT, `reference` (the release's `image_tokens` = the packed length per sample): each stage keeps int(L * r_s) of
the packed span of L tokens (base, unpadded grid, a newline per row -- the newlines are ordinary candidates), positions
renumbered; `budget=` is refused (the release's NeXT setting is the ratio list). Kept newlines count as layout tokens.

Variants: `reference` = the release: per row, the softmax in fp32 cast to the model dtype with the heads averaged
in it, torch.topk; a padded row (the release's mask preparation crashes on it), or a stage asking for more tokens than the previous one
left (its topk crashes) -> ValueError. `fixed` = per row
with left padding (renumbered over the valid slots, decoded per row), fp32 scores, stable ties; the ratios must
be non-increasing in (0, 1].
In model_args a list is written with '/': layer_list=8/16/24,image_token_ratio_list=0.5/0.25/0.125.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .llm_stages import (
    Cut,
    CutDecision,
    InLLMMethod,
    LLMContext,
    LLMPlan,
    budget_error,
    check_rows,
    floor_error,
    in_llm_only,
    nearest_index,
    on_next,
    planned_equivalent,
    refuse_reference_layout,
    refuse_reference_next,
    top_slots,
)
from .registry import EQUIVALENT_BUDGET, MethodSpec, Param, register

LAMBDA_GRID = 1000  # λ in steps of 0.001


EXTEND = "earlier cuts in layer_list lower the floor, e.g. layer_list=2/6/12 reaches 46.75"


def stage_counts(n: float, ratios: Sequence[float]) -> List[int]:
    return [int(n * r) for r in ratios]


@lru_cache(maxsize=256)
def _options(layer_list: Tuple[int, ...], n: float, layers: int) -> Tuple[Tuple[tuple, float], ...]:
    """(ratios [λ, λ², ...], equivalent) for every λ on the grid that leaves every stage >= 1 of n tokens."""
    options = []
    for step in range(1, LAMBDA_GRID + 1):
        lam = step / LAMBDA_GRID
        ratios = tuple(lam ** (s + 1) for s in range(len(layer_list)))
        counts = stage_counts(n, ratios)
        if min(counts) >= 1:
            options.append((ratios, planned_equivalent(layer_list, counts, n, layers)))
    return tuple(options)


def resolve_ratios(budget: int, layer_list: Sequence[int], n: float, layers: int, clamp: bool = False) -> tuple:
    """The geometric ratios [λ, λ², ...] whose equivalent is nearest to the budget (smallest λ on ties); outside the
    reachable range a ValueError, or with `clamp` the nearest end."""
    options = _options(tuple(layer_list), n, layers)
    values = [o[1] for o in options]
    if not options or (not clamp and not min(values) <= budget <= max(values)):
        low = min(values) if values else n
        raise budget_error("pdrop", budget, low, n, EXTEND)
    return options[nearest_index(values, budget)][0]  # values grow with λ: ties to the smaller value = the smaller λ


def _check_lists(layer_list: Sequence[int], ratios: Sequence[float], layers: int, n: int, variant: str) -> None:
    if len(layer_list) != len(ratios):
        raise ValueError(f"pdrop: layer_list has {len(layer_list)} layers but image_token_ratio_list {len(ratios)} ratios")
    if list(layer_list) != sorted(set(layer_list)) or not all(0 < l < layers for l in layer_list):
        raise ValueError(f"pdrop: layer_list={list(layer_list)} must be increasing layers within 1..{layers - 1}")
    if variant == "fixed" and (any(not 0.0 < r <= 1.0 for r in ratios) or any(b > a for a, b in zip(ratios, ratios[1:]))):
        raise ValueError(f"pdrop: image_token_ratio_list={list(ratios)} must be non-increasing ratios in (0, 1]")
    counts = [n, *stage_counts(n, ratios)]
    if variant == "reference" and any(b > a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"pdrop (reference): image_token_ratio_list={list(ratios)} asks a stage for more image tokens than the "
                         f"previous one left ({counts[1:]} of {n}); the release's topk crashes there; use non-increasing ratios")


def _check(context: LLMContext, variant: str = "fixed", layer_list: Sequence[int] = (8, 16, 24),
           image_token_ratio_list: Sequence[float] = (0.5, 0.25, 0.125), budget: Optional[int] = None) -> None:
    layers, n = context.num_layers, context.num_patches
    if variant == "reference" and on_next(context):  # the release's LLaVA-NeXT path: ratios of the packed span (module doc)
        if budget is not None:
            raise ValueError("pdrop (reference) on LLaVA-NeXT: the release keeps int(L * ratio) of the packed span per stage; give "
                             "image_token_ratio_list, or use variant=fixed for a budget")
        _check_lists(layer_list, tuple(image_token_ratio_list), layers, n, variant)
        return
    refuse_reference_next("pdrop", variant, context)
    ratios = tuple(image_token_ratio_list)
    if budget is not None:
        if context.varied:  # images of N or more patches: only a budget below the smallest image's floor fails them all
            options = _options(tuple(layer_list), n, layers)
            floor = min(o[1] for o in options) if options else n
            if not options or budget < floor:
                raise floor_error("pdrop", budget, floor, n, EXTEND)
            ratios = options[0][0]
        else:
            ratios = resolve_ratios(budget, layer_list, n, layers)
    _check_lists(layer_list, ratios, layers, n, variant)


def _plan(context: LLMContext, variant: str = "fixed", layer_list: Sequence[int] = (8, 16, 24),
          image_token_ratio_list: Sequence[float] = (0.5, 0.25, 0.125), budget: Optional[int] = None) -> LLMPlan:
    layers, n = context.num_layers, context.num_patches
    ratios = tuple(image_token_ratio_list)
    packed = variant == "reference" and on_next(context)  # over the packed span, newlines as candidates (the loop's image slots)
    if budget is not None and not context.varied:
        ratios = resolve_ratios(budget, layer_list, n, layers)
    row_ratios: Optional[List[tuple]] = None
    per_row: Optional[List[dict]] = None
    if context.image_tokens is not None and not packed:
        row_ratios, per_row = [], []
        for images in context.image_tokens:
            total = sum(images)
            mine = ratios
            if budget is not None and images:
                mine = resolve_ratios(budget, layer_list, total / len(images), layers, clamp=True)
            row_ratios.append(mine)
            per_row.append({"image_token_ratio_list": [round(r, 6) for r in mine],
                            "visual_tokens_equivalent": planned_equivalent(layer_list, stage_counts(total, mine), total, layers)})

    def cut(stage: int) -> Cut:
        def decide(view: Any) -> CutDecision:
            refuse_reference_layout("pdrop", variant, view)
            if variant == "reference" and not bool(view.valid.all()):
                raise ValueError("pdrop (reference): the released code's mask preparation crashes on padded rows; run batch_size=1 "
                                 "or variant=fixed")
            images = view.image & view.valid
            rows = torch.full((view.hidden.shape[0], 1), view.hidden.shape[1] - 1, dtype=torch.long, device=view.hidden.device)
            probs = view.attention("own", rows)[:, :, 0]  # [B, H, W] float32
            scores = probs.to(view.model_dtype).mean(dim=1) if variant == "reference" else probs.mean(dim=1)
            if row_ratios is None:
                counts = [int(start * ratios[stage]) for start in view.initial_images.tolist()]  # from the ratios, not the sequence
            else:
                check_rows(context, view)
                counts = [int(start * row_ratios[b][stage]) for b, start in enumerate(view.initial_images.tolist())]
            chosen = top_slots(scores, images, [min(c, int(m)) for c, m in zip(counts, images.sum(dim=1).tolist())], variant)
            return CutDecision((view.valid & ~view.image) | chosen, renumber=True)
        return Cut(layer_list[stage], decide)

    notes: dict = {"layer_list": list(layer_list)}
    if packed:
        notes["image_token_ratio_list"] = [round(r, 6) for r in ratios]
        return LLMPlan([cut(s) for s in range(len(layer_list))], "cache", notes=notes, layout_candidates=True)
    if not (context.varied and budget is not None):
        notes.update(image_token_ratio_list=[round(r, 6) for r in ratios],
                     visual_tokens_equivalent=planned_equivalent(layer_list, stage_counts(n, ratios), n, layers))
    if per_row is not None:
        notes["per_row"] = per_row  # per batch row: its ratios, the row's planned equivalent
    return LLMPlan([cut(s) for s in range(len(layer_list))], "cache", notes=notes)


def _layers(value: Any) -> Optional[str]:
    return None if all(isinstance(v, int) and v >= 1 for v in value) else "must be decoder layer indices >= 1"


def _ratios(value: Any) -> Optional[str]:
    return None if all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in value) else "must be ratios in [0, 1]"


register(
    MethodSpec(
        "pdrop",
        in_llm_only("pdrop"),
        "PyramidDrop: image tokens dropped in stages before the layers of layer_list, ranked by the last token's attention",
        params={
            "layer_list": Param((8, 16, 24), tuple, "decoder layers before which a stage drops (released default 8/16/24)", _layers, item=int),
            "image_token_ratio_list": Param((0.5, 0.25, 0.125), tuple, "image tokens kept per stage, as a fraction of N (released 0.5/0.25/0.125)",
                                            _ratios, item=float),
            "budget": EQUIVALENT_BUDGET,
        },
        budget_sets=("image_token_ratio_list",),
        plan=InLLMMethod(_check, _plan),
        reference_batch_one=True,
    )
)

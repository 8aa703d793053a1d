"""Long-tail split + H2O pruning ("Balancing Performance and Efficiency", Yu, Chen, Xu).

RE-IMPLEMENTATION, NO REFERENCE CODE: the authors released no code. Every point the paper leaves
open is a parameter below whose default is our stated reading of the paper; results must be
labelled "re-implementation, no reference code".

Stage 1 (this module, pure torch; also what the engine runs inside CLIP after block `clip_layer`):

1. d = CLS attention of the block (`signals.cls_attention`: one head over all D dims of the raw
   q_proj / k_proj outputs, softmax over all 1+N keys, CLS row without the CLS column), paper eq. 1;
   logits in float64 and settled (signals.settle), so the split and the kept set do not depend on
   the BLAS summation order.
2. Sort descending, d_1 >= ... >= d_n (stable: equal values keep ascending patch order).
3. Split objective (eq. 2-3), 1-based i as in the paper:
       f(i) = (n - i) * (d_1 - d_i) / (d_1 - d_n),   i in {1, ..., n-1},   i* = argmax f
   (first maximum on ties; computed in float64). c = d_1 - d_n is a per-image constant, so it only
   matters for the guard: a flat curve (d_1 == d_n exactly) has no head and no tail; `flat_curve`
   says what to keep then ("keep_all", default: nothing is less similar than anything else, so
   nothing is dropped; "keep_one": the objective is 0 everywhere, its first argmax is i = 1).
4. Head size h = i* (`include_split=true`: the split point d_{i*} is the last kept token; on a
   step-shaped curve the argmax lands on the first low value, so `include_split=false`, h = i* - 1,
   keeps exactly the high plateau).
5. The smoothing coefficient alpha ("i* is multiplied by a smoothing coefficient alpha", 0.075).
   How alpha enters is not specified; `alpha_mode`:
     "expand" (default): round(h * (1 + alpha))   -- keep alpha more than the split
     "scale":             round(h * alpha)         -- the literal "multiplied by alpha"
     "offset":            h + round(alpha * n)
     "none":              h
   Why "expand": the paper reports 195 / 251 / 200 visual tokens on POPE / TextVQA / MME (Table 1)
   and 127 on average over six benchmarks. h <= n - 1 = 575, so "scale" keeps at most
   round(575 * 0.075) = 43 tokens and cannot produce any of those counts; "expand" (and "offset")
   can. "expand" keeps the multiplicative form the paper names ("multiplied by a smoothing
   coefficient"), with the coefficient acting as a small safety margin (7.5 % more tokens) that the
   motivation ("to prevent gradient collapse during training") suggests. Rounding is half-up;
   the count is clamped to [1, n].
6. Kept = the top-count patches of d, returned in spatial (raster) order, features = the given
   `hidden` (in the engine: LLaVA's penultimate-layer features of the kept patches, computed by the
   later CLIP blocks over the kept tokens only).

`budget=N` replaces the dynamic split by exactly the top-N of d; `ratio=r` by the top
max(1, int(N * r)) (matched budgets; alpha is not applied then).

Units (LLaVA-NeXT: the base image and every crop is one CLIP pass): stage 1 runs per unit, and its counts are per
unit. `valid` [B, N] marks the patches that exist (NeXT unpadding removes the others): the curve, the split and
the counts are over a unit's valid patches only (n = its valid count) and an invalid patch is never kept (a unit
without valid patches keeps none). `budgets` (one int per unit, the engine's split of a per-image budget) replace
`budget` unit by unit, capped by the unit's valid patches; `ratio` takes max(1, int(n_valid * r)).

Stage 2 (in the LLM, H2O-style heavy hitters + recent window over visual + text tokens) and the
in-CLIP placement are run by `llava.longtail_engine.LongtailLlava`; their parameters are declared
here so that one validated parameter set describes the method (see `llava/llm_pruning.py` for the
readings behind `heavy_ratio`, `recent_ratio`, `budget_base`, `llm_layer`, `exempt_system_prompt`
and `decode_eviction`). `compress("longtail", VisionInputs(hidden, q, k))` applies stage 1 to the
given q / k (whatever block they come from) and ignores the stage-2 parameters.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .inputs import CompressedImage, VisionInputs
from .llm_stages import Cut, CutDecision, DecodeEviction, InLLMMethod, LLMPlan
from .registry import BUDGET, RATIO, MethodSpec, Param, non_negative, positive_int, register
from .signals import FIXED_DTYPE, cls_attention, ranked, top_indices
from .units import FLOOR, keep_count

ALPHA_MODES = ("expand", "scale", "offset", "none")
FLAT_CURVE = ("keep_all", "keep_one")
BUDGET_BASES = ("visual", "span", "sequence")

PAPER_ALPHA = 0.075
PAPER_CLIP_LAYER = 3
PAPER_HEAVY_RATIO = 0.5
PAPER_RECENT_RATIO = 0.5


def _non_negative_int(value: Any) -> Optional[str]:
    return None if isinstance(value, int) and value >= 0 else "must be an integer >= 0"


def sort_descending(attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, n] -> (values, patch order), descending; equal values keep ascending patch order (`signals.ranked`, the
    fixed tie rule every method ranks with)."""
    order = ranked(attn, "fixed")
    return torch.gather(attn, -1, order), order


def split_objective(d_sorted: torch.Tensor) -> torch.Tensor:
    """f(i) = (n - i)(d_1 - d_i)/(d_1 - d_n) for 1-based i = 1..n-1 -> [B, n-1] float64.

    Column j holds f(j + 1). A flat row (d_1 == d_n) gives NaN (0 / 0); see `split_point`.
    """
    d = d_sorted.double()
    n = d.shape[-1]
    i = torch.arange(1, n, device=d.device, dtype=torch.float64)  # 1 .. n-1
    c = d[:, :1] - d[:, -1:]
    return (n - i) * (d[:, :1] - d[:, : n - 1]) / c


def split_point(d_sorted: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """i* (1-based, first maximum of f over i = 1..n-1) and a flat-curve flag, per row.

    Rows with n == 1 give i* = 1. Flat rows (d_1 == d_n exactly) give i* = 1 and flat = True.
    """
    b, n = d_sorted.shape
    flat = d_sorted[:, 0] == d_sorted[:, -1]
    if n < 2:
        return torch.ones(b, dtype=torch.long, device=d_sorted.device), flat
    f = split_objective(d_sorted)
    f = torch.where(flat[:, None], torch.zeros_like(f), f)
    istar = torch.argmax(f, dim=-1) + 1  # torch.argmax returns the first maximal index
    return istar, flat


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def scaled_count(head: int, n: int, alpha: float, alpha_mode: str) -> int:
    """Tokens to keep for a head of `head` tokens out of n, with alpha entering as `alpha_mode`."""
    if alpha_mode == "expand":
        count = _round_half_up(head * (1.0 + alpha))
    elif alpha_mode == "scale":
        count = _round_half_up(head * alpha)
    elif alpha_mode == "offset":
        count = head + _round_half_up(alpha * n)
    elif alpha_mode == "none":
        count = head
    else:
        raise ValueError(f"longtail: unknown alpha_mode {alpha_mode!r}; valid: {', '.join(ALPHA_MODES)}")
    return max(1, min(n, count))


def _split_count(values: torch.Tensor, alpha: float, alpha_mode: str, include_split: bool, flat_curve: str) -> int:
    """The dynamic count of one unit from its sorted curve values [n] (n >= 1)."""
    n = int(values.shape[0])
    istar, flat = split_point(values[None])
    if bool(flat[0]):
        if flat_curve == "keep_all":
            return n
        if flat_curve != "keep_one":
            raise ValueError(f"longtail: unknown flat_curve {flat_curve!r}; valid: {', '.join(FLAT_CURVE)}")
    head = int(istar[0]) if include_split else int(istar[0]) - 1
    return scaled_count(max(1, head), n, alpha, alpha_mode)


def longtail_counts(
    attn: torch.Tensor,
    alpha: float = PAPER_ALPHA,
    alpha_mode: str = "expand",
    include_split: bool = True,
    flat_curve: str = "keep_all",
    budget: Optional[int] = None,
    ratio: Optional[float] = None,
    valid: Optional[torch.Tensor] = None,
    budgets: Optional[Sequence[int]] = None,
) -> List[int]:
    """Per-unit number of patches stage 1 keeps, from the CLS attention attn [B, n] (only the `valid` patches count:
    module doc)."""
    b, n = attn.shape
    if valid is not None:
        return _valid_counts(attn, valid, alpha, alpha_mode, include_split, flat_curve, budget, ratio, budgets)
    if budgets is not None:
        return [min(int(c), n) for c in budgets]
    if budget is not None:
        return [int(budget)] * b
    if ratio is not None:
        return [keep_count(n, None, ratio, default_ratio=ratio, rounding=FLOOR)] * b
    values, _ = sort_descending(attn)
    istar, flat = split_point(values)
    counts = []
    for row in range(b):
        if bool(flat[row]):
            if flat_curve == "keep_all":
                counts.append(n)
                continue
            if flat_curve != "keep_one":
                raise ValueError(f"longtail: unknown flat_curve {flat_curve!r}; valid: {', '.join(FLAT_CURVE)}")
        head = int(istar[row]) if include_split else int(istar[row]) - 1
        counts.append(scaled_count(max(1, head), n, alpha, alpha_mode))
    return counts


def _valid_counts(attn: torch.Tensor, valid: torch.Tensor, alpha: float, alpha_mode: str, include_split: bool, flat_curve: str,
                  budget: Optional[int], ratio: Optional[float], budgets: Optional[Sequence[int]]) -> List[int]:
    """longtail_counts over each unit's valid patches: the curve of the valid ones, counts capped by their number."""
    if valid.shape != attn.shape:
        raise ValueError(f"longtail: valid has shape {tuple(valid.shape)}, the attention {tuple(attn.shape)}")
    counts = []
    for row in range(attn.shape[0]):
        values = attn[row][valid[row].to(attn.device)]
        n = int(values.shape[0])
        if n == 0:
            counts.append(0)
        elif budgets is not None:
            counts.append(min(int(budgets[row]), n))
        elif budget is not None:
            counts.append(min(int(budget), n))
        elif ratio is not None:
            counts.append(keep_count(n, None, ratio, default_ratio=ratio, rounding=FLOOR))
        else:
            counts.append(_split_count(sort_descending(values[None])[0][0], alpha, alpha_mode, include_split, flat_curve))
    return counts


def kept_patches(attn: torch.Tensor, counts: Sequence[int], valid: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Per unit: the top-counts[b] patches of attn [B, n] (stable ties), in ascending patch order; with `valid`, of
    its valid patches only."""
    if valid is not None:
        attn = attn.masked_fill(~valid.to(attn.device), float("-inf"))  # softmax values are >= 0: invalid ones sort last
        counts = [min(int(c), int(v)) for c, v in zip(counts, valid.sum(dim=1).tolist())]
    _, order = sort_descending(attn)
    return [torch.sort(order[row, : int(c)]).values for row, c in enumerate(counts)]


def stage1_keep(q: torch.Tensor, k: torch.Tensor, valid: Optional[torch.Tensor] = None, budgets: Optional[Sequence[int]] = None,
                **params: Any) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """CLS attention of q / k [B, 1+N, D] (one row per CLIP unit) and the kept patch indices per unit (spatial order).

    valid [B, N] bool: the patches that exist (LLaVA-NeXT unpadding); None = all. budgets: one count per unit,
    replacing `budget` unit by unit. `params` are the stage-1 parameters (alpha, alpha_mode, include_split,
    flat_curve, budget, ratio); others are ignored. Used both by `compress` and by the engine inside CLIP.
    """
    attn = cls_attention(q, k, FIXED_DTYPE)
    keys = ("alpha", "alpha_mode", "include_split", "flat_curve", "budget", "ratio")
    if budgets is not None and len(budgets) != attn.shape[0]:
        raise ValueError(f"longtail: {len(budgets)} budgets for {attn.shape[0]} units")
    counts = longtail_counts(attn, **{key: params[key] for key in keys if key in params}, valid=valid, budgets=budgets)
    return attn, kept_patches(attn, counts, valid)


def h2o_budgets(base: int, heavy_ratio: float, recent_ratio: float) -> Tuple[int, int]:
    """(heavy N, recent M) for a budget base: N = int(heavy_ratio * base), M = max(1, int(recent_ratio * base))."""
    return int(heavy_ratio * base), max(1, int(recent_ratio * base))


def h2o_keep(scores: torch.Tensor, valid: torch.Tensor, prunable: torch.Tensor, heavy: Sequence[int], recent: Sequence[int]) -> torch.Tensor:
    """Which slots survive [B, T] bool.

    Per row: the valid non-prunable slots always; of the prunable ones (in slot order), all when
    they are at most heavy + recent, else the last `recent` plus the `heavy` highest-scoring of
    the others (equal scores: the earlier slot wins).
    """
    keep = valid & ~prunable
    for row in range(scores.shape[0]):
        cand = torch.nonzero(valid[row] & prunable[row]).flatten()
        n, m, h = int(cand.numel()), int(recent[row]), int(heavy[row])
        if n <= h + m:
            keep[row, cand] = True
            continue
        keep[row, cand[n - m:]] = True
        rest = cand[: n - m]
        top = top_indices(scores[row, rest], min(h, int(rest.numel())), "fixed")
        keep[row, rest[top]] = True
    return keep


def h2o_span(valid: torch.Tensor, image: torch.Tensor, exempt_system_prompt: bool, layout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T] bool: the prunable slots -- rows with an image only; from the first image token on when the system
    prompt (and 'USER:') is exempt; never a layout slot (LLaVA-NeXT newlines: kept, and not counted in `span`)."""
    has_image = image.any(dim=1)
    first = torch.where(has_image, image.float().argmax(dim=1), torch.full_like(has_image, valid.shape[1], dtype=torch.long))
    prunable = valid & has_image[:, None]
    if exempt_system_prompt:
        prunable &= torch.arange(valid.shape[1], device=valid.device)[None, :] >= first[:, None]
    if layout is not None:
        prunable &= ~layout
    return prunable


def h2o_check(context: Any, variant: str = "fixed", **params: Any) -> None:
    """What the decoder depth decides: llm_layer within its layers."""
    if not 0 <= params["llm_layer"] < context.num_layers:
        raise ValueError(f"longtail: llm_layer={params['llm_layer']} is outside the language model's layers 0..{context.num_layers - 1}")


def h2o_build(context: Any, variant: str = "fixed", **params: Any) -> LLMPlan:
    """Stage 2 on the decoder loop: one cut before layer `llm_layer` ranking by the attention every token receives
    at that layer (all query rows, accumulated), evicting the pruned tokens from the layers that ran before. Layout
    tokens are never pruned and never count in a budget base (visual = patch tokens, span = prunable slots)."""
    plan = LLMPlan([], notes={"llm_layer": params["llm_layer"]})

    def decide(view: Any) -> CutDecision:
        prunable = h2o_span(view.valid, view.image, params["exempt_system_prompt"], view.layout)
        bases = {"visual": view.image.sum(dim=1), "span": prunable.sum(dim=1), "sequence": view.valid.sum(dim=1)}[params["budget_base"]]
        budgets = [h2o_budgets(int(n), params["heavy_ratio"], params["recent_ratio"]) for n in bases.tolist()]
        heavy, recent = [h for h, _ in budgets], [m for _, m in budgets]
        plan.notes.update(heavy=heavy, recent=recent)
        scores = view.attention_sum("own")
        keep = h2o_keep(scores, view.valid, prunable, heavy, recent)
        decode = DecodeEviction(params["llm_layer"], scores, prunable, heavy, recent) if params["decode_eviction"] else None
        return CutDecision(keep, evict_earlier=True, decode=decode)

    plan.cuts.append(Cut(params["llm_layer"], decide))
    return plan


h2o_plan = InLLMMethod(h2o_check, h2o_build)  # h2o_plan(context, **params): checks, then the plan


def _longtail(inp: VisionInputs, variant: str, **params: Any) -> List[CompressedImage]:
    _, kept = stage1_keep(inp.q, inp.k, valid=inp.valid, budgets=inp.budgets, **params)
    return [CompressedImage(features=inp.patches[b, idx], index=idx) for b, idx in enumerate(kept)]


PARAMS = {
    "alpha": Param(PAPER_ALPHA, float, "smoothing coefficient alpha applied to the split point i* (paper: 0.075)", non_negative),
    "alpha_mode": Param(
        "expand",
        str,
        "how alpha enters: expand = round(i*(1+alpha)) (default; the only multiplicative reading that can give the "
        "paper's ~127-251 tokens), scale = round(i* alpha) (literal, <= 43 tokens), offset = i* + round(alpha n), none = i*",
        choices=ALPHA_MODES,
    ),
    "include_split": Param(True, bool, "the split point d_i* itself is kept (head = d_1..d_i*); false: head = d_1..d_(i*-1)"),
    "flat_curve": Param("keep_all", str, "what a flat curve (d_1 == d_n, objective 0/0) keeps: keep_all (default) or keep_one", choices=FLAT_CURVE),
    "budget": BUDGET,
    "ratio": RATIO,
    "clip_layer": Param(
        PAPER_CLIP_LAYER,
        int,
        "stage 1 runs on the CLS attention of this CLIP block (1-based) and only the kept tokens enter later blocks "
        "(paper: 'added after the third layer of the CLIP visual encoder' -> 3)",
        positive_int,
    ),
    "heavy_ratio": Param(PAPER_HEAVY_RATIO, float, "H2O heavy-hitter budget N = int(heavy_ratio * base) (paper: 0.5)", non_negative),
    "recent_ratio": Param(PAPER_RECENT_RATIO, float, "H2O recent window M = int(recent_ratio * base), at least 1 (paper: 0.5)", non_negative),
    "budget_base": Param(
        "visual",
        str,
        "what the H2O ratios multiply: visual = visual tokens after stage 1 (default), span = the prunable span "
        "(first image token to the end), sequence = the whole prompt; span/sequence with 0.5 + 0.5 prune nothing at prefill",
        choices=BUDGET_BASES,
    ),
    "llm_layer": Param(
        0,
        int,
        "decoder layer whose attention ranks the heavy hitters: 0 = before the first decoder layer, using layer 0's q/k "
        "(paper: 'a second round of token pruning before feeding into LLM'); K > 0 = after K full layers, pruned tokens "
        "evicted from the KV cache of layers < K",
        _non_negative_int,
    ),
    "exempt_system_prompt": Param(True, bool, "tokens before the first image (system prompt, 'USER:') are never pruned and do not count in the budgets"),
    "decode_eviction": Param(
        True,
        bool,
        "keep evicting during generation, H2O-style: whenever the prunable tokens exceed M + N, drop the lowest "
        "accumulated-attention token outside the recent window (paper: 'Once the number of tokens X > M + N, continue')",
    ),
}

register(
    MethodSpec(
        "longtail",
        _longtail,
        "long-tail split of the CLS attention inside CLIP + H2O heavy-hitter/recent pruning in the LLM "
        "(re-implementation, no reference code)",
        params=PARAMS,
        needs=frozenset({"qk", "cls"}),
        plan=h2o_plan,
    )
)

"""DART (Wen et al., EMNLP'25; code read at xqy1111111/DART @ 5a19452, the upstream ZichenWen1/DART's last code
commit: llava/model/language_model/modeling_llama_self.py). One cut before decoder layer `k`, no attention:

1. Keys: layer k-1's post-rotary keys (its cache entries), heads concatenated; features f = the decoder's final
   RMSNorm (with its weight) of layer k-1's output.
2. Pivots: the top `pivot_image_token` image tokens by the L1 norm of their keys, and the top `pivot_text_token`
   of the tokens after the image span (question and " ASSISTANT:") by the same, as original prompt positions.
3. t = max_num_trunction // (p_img + p_txt). Pool = the image tokens minus the image pivots, ascending.
4. Visit the pivots in the order of `list(set(image_pivots + text_pivots))` (CPython's set order of those ints:
   hash-slot order, neither sorted nor insertion); each pivot takes the t pool tokens of LOWEST cosine(f_pivot, f_j)
   (topk of the negated cosine), which leave the pool. The order matters: sorted order keeps a different set.
5. Kept image tokens = image pivots + picks = p_img + P * t (132 for "128"); text pivots are text and stay.
   Sequence order; original positions; layers < k cache everything; decoding at original length + t.

`max_num_trunction` counts one image; a document with m images takes m times as many picks (the same pivots).
`budget=n` (equivalent visual tokens): kept = p_img + P * t, eq = (k*N + (L-k)*kept) / L, the nearest t in
[0, (N - p_img) // P]: 192 / 128 / 64 -> max_num_trunction 160 / 96 / 24 (kept 164 / 100 / 28). The paper's
"DART 128" keeps 132 = 159.75 equivalent tokens. (The scripts' reduction ratio 0.778 is used only when
max_num_trunction is None, never from their CLI: not exposed.)

Variants: `reference` = the release: batch 1 only (it asserts it: ValueError for more), torch.topk, the set order;
where the release crashes (fewer text tokens than text pivots, P * t above the pool) -> ValueError.
`fixed` = per row, pivots visited in selection order (image pivots by descending L1 norm, then text), ties to the
lower position, and guards: fewer text tokens than pivots takes what there is, a pool that runs out stops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .llm_stages import Cut, CutDecision, LLMContext, LLMPlan, budget_error, in_llm_only, nearest_index, planned_equivalent
from .registry import EQUIVALENT_BUDGET, MethodSpec, Param, positive_int, register
from .signals import top_indices


def resolve_truncation(budget: int, k: int, n: int, layers: int, p_img: int, p_txt: int) -> int:
    pivots = p_img + p_txt
    ts = list(range(0, (n - p_img) // pivots + 1))
    values = [planned_equivalent([k], [p_img + pivots * t], n, layers) for t in ts]
    if not values[0] <= budget <= values[-1]:
        raise budget_error("dart", budget, values[0], values[-1], "a smaller k or fewer pivot_image_token lower the floor")
    return ts[nearest_index(values, budget)] * pivots


def _top(scores: torch.Tensor, count: int, variant: str) -> torch.Tensor:
    return top_indices(scores, min(count, int(scores.numel())), variant)


def row_selection(keys: torch.Tensor, feats: torch.Tensor, slots_image: torch.Tensor, slots_text: torch.Tensor, orig: torch.Tensor,
                  p_img: int, p_txt: int, per_pivot: int, variant: str) -> torch.Tensor:
    """One row: the image slots kept (pivots + picks). keys / feats [W, *]; slots_* the candidate slots ascending."""
    l1 = keys.float().abs().sum(dim=-1) if variant != "reference" else keys.norm(p=1, dim=-1)
    image_piv = slots_image[_top(l1[slots_image], p_img, variant)]
    text_piv = slots_text[_top(l1[slots_text], p_txt, variant)]
    if variant == "reference":  # CPython's set order of the original positions, as the release iterates it
        by_pos = {int(orig[s]): int(s) for s in torch.cat([image_piv, text_piv]).tolist()}
        order = [by_pos[p] for p in list(set(int(orig[s]) for s in image_piv.tolist() + text_piv.tolist()))]
    else:
        order = image_piv.tolist() + text_piv.tolist()
    chosen = set(image_piv.tolist())
    pool = [int(s) for s in slots_image.tolist() if int(s) not in chosen]
    f = feats if variant == "reference" else feats.float()
    for pivot in order:
        if not pool or per_pivot <= 0:
            break
        candidates = torch.tensor(pool, device=feats.device)
        similarity = F.cosine_similarity(f[pivot][None, :], f[candidates], dim=-1)
        take = _top(-similarity, per_pivot, variant)
        picked = set(candidates[take].tolist())
        chosen |= picked
        pool = [s for s in pool if s not in picked]
    return torch.tensor(sorted(chosen), dtype=torch.long, device=feats.device)


def _plan(context: LLMContext, variant: str = "fixed", k: int = 2, max_num_trunction: int = 128, pivot_image_token: int = 4,
          pivot_text_token: int = 4, budget: Optional[int] = None) -> LLMPlan:
    layers, n = context.num_layers, context.num_patches
    if not 1 <= k < layers:
        raise ValueError(f"dart: k={k} must be within 1..{layers - 1} (a cut before decoder layer k of the {layers})")
    if budget is not None:
        max_num_trunction = resolve_truncation(budget, k, n, layers, pivot_image_token, pivot_text_token)
    pivots = pivot_image_token + pivot_text_token
    if variant == "fixed" and pivot_image_token + max_num_trunction > n:
        raise ValueError(f"dart: pivot_image_token + max_num_trunction = {pivot_image_token + max_num_trunction} exceeds the {n} image tokens")

    def check_pool(m: int) -> None:
        """The release's last pivot takes topk(t) of what is left: a pool shorter than t crashes there, so refuse."""
        per_pivot = (max_num_trunction * m) // pivots
        if variant == "reference" and pivots * per_pivot > m * n - pivot_image_token:
            raise ValueError(f"dart (reference): {pivots} pivots x {per_pivot} picks exceed the {m * n - pivot_image_token} image tokens "
                             f"left after the pivots (the release's topk crashes); lower max_num_trunction or use variant=fixed")

    check_pool(1)

    def decide(view: Any) -> CutDecision:
        batch = view.hidden.shape[0]
        if variant == "reference" and batch > 1:
            raise ValueError("dart (reference): the released code asserts batch size 1; run batch_size=1 or variant=fixed")
        keys = view.keys("prev")
        feats = view.final_norm(view.hidden)
        keep = view.valid & ~view.image
        slots = torch.arange(view.hidden.shape[1], device=view.hidden.device)
        for b in range(batch):
            images = slots[view.image[b] & view.valid[b]]
            if not images.numel():
                continue
            after = slots[view.valid[b] & ~view.image[b] & (slots > images[-1])]
            m = -(-int(images.numel()) // n)  # images in this document
            if variant == "reference" and after.numel() < pivot_text_token:
                raise ValueError(f"dart (reference): only {after.numel()} text tokens after the image for pivot_text_token="
                                 f"{pivot_text_token}; use variant=fixed")
            check_pool(m)
            per_pivot = (max_num_trunction * m) // pivots
            keep[b, row_selection(keys[b], feats[b], images, after, view.orig[b], pivot_image_token, pivot_text_token, per_pivot, variant)] = True
        return CutDecision(keep)

    kept = pivot_image_token + pivots * (max_num_trunction // pivots)
    return LLMPlan([Cut(k, decide)], "original", notes={"k": k, "max_num_trunction": max_num_trunction,
                                                        "visual_tokens_equivalent": planned_equivalent([k], [kept], n, layers)})


register(
    MethodSpec(
        "dart",
        in_llm_only("dart"),
        "DART: one cut before decoder layer k keeping pivots (key L1 norm) and the tokens least similar to each pivot",
        params={
            "k": Param(2, int, "the cut is before decoder layer k (released default 2)", positive_int),
            "max_num_trunction": Param(128, int, "picks over all pivots per image (released default 128)", positive_int),
            "pivot_image_token": Param(4, int, "image pivots (released default 4)", positive_int),
            "pivot_text_token": Param(4, int, "text pivots after the image (released default 4)", positive_int),
            "budget": EQUIVALENT_BUDGET,
        },
        budget_sets=("max_num_trunction",),
        plan=_plan,
        reference_batch_one=True,
    )
)

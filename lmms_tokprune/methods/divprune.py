"""DivPrune (Alvar et al., CVPR'25; released code: vbdi/divprune @ 799e2d9, LLaVA/llava/model/llava_arch.py).

A max-min diversity selection on the projector outputs (`projected`, what the LLM receives), n tokens:
1. D_ij = 1 - cos(P_i, P_j), rows L2-normalised (in P's dtype: fp16 in real runs).
2. First pick: per token, the second-smallest entry of its column of D (its own ~0 is the smallest); argmax.
3. Next picks: score_j = min over the picked s of D_sj; argmax (ties: the lowest index).
4. Kept = the picked set in ascending patch order; features = hidden rows (the projector is per token).

n = budget, else int(round(ratio * N)) (released SUBSET_RATIO 0.098 -> 56; budgets 64 / 128 / 192 are the
released interface's ratio n/576).

Variants: `reference` = the release: image 0 decides for the batch (it reads the LLM input embeddings of
sample 0 at hard-coded positions and applies those indices to every image), picked tokens are NOT masked, so
once everything left is a duplicate a picked token (score ~0) is picked again: the release sorts its keep
indices with the repeats and indexes the embeddings with them, so the LLM gets n tokens of which fewer are
distinct (a re-picked token sits at several consecutive positions; reproduced: `index` repeats). Not reproduced: the release's windows when the image does not start
at position 35, and its unpruned labels (a loglikelihood-only crash). `fixed` = per image, picked tokens masked
(exactly n), ties to the lowest index, distances from settled float64 cosines (signals.cosine_gram): the max-min
ranking then does not depend on the BLAS summation order, and exact duplicates are exactly at distance 0.

Units (fixed; methods/units.py): with valid patches `ratio` keeps int(round(ratio * V)) of the unit's V valid patches,
and only they are candidates or count as distances (a column's second-smallest entry over the valid rows).
budgets[b] replaces `budget` / `ratio` unit by unit.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from . import units
from .baselines import gather_sorted
from .inputs import CompressedImage, VisionInputs
from .registry import BUDGET, MethodSpec, Param, register, unit_interval
from .signals import FIXED_DTYPE, cosine_gram

DEFAULT_RATIO = 0.098  # the release's SUBSET_RATIO


def cosine_distance(p: torch.Tensor, variant: str) -> torch.Tensor:
    """[B, N, d] -> [B, N, N] 1 - cosine; reference in P's own dtype (normalised rows, as released), fixed from
    settled float64 cosines."""
    if variant != "reference":
        return cosine_gram(p, dtype=FIXED_DTYPE).neg_().add_(1.0)
    unit = p / p.norm(dim=-1, keepdim=True)
    return 1.0 - torch.bmm(unit, unit.transpose(1, 2))


def max_min_picks(dist: torch.Tensor, count: int, mask_picked: bool, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy max-min over [B, N, N] distances, all images at once -> [B, count] picks (repeats possible unless masked).

    valid [B, N] (fixed): only valid tokens are candidates and only their distances count (a column's
    second-smallest entry over the valid rows; invalid columns never picked)."""
    b, n, _ = dist.shape
    rows = torch.arange(b, device=dist.device)
    if valid is None:
        first = torch.topk(dist, 2, dim=1, largest=False).values[:, 1]  # per column: the second-smallest entry
    else:
        first = torch.topk(dist.masked_fill(~valid[:, :, None], float("inf")), min(2, n), dim=1, largest=False).values[:, -1]
        first = first.masked_fill(~valid, float("-inf"))
    picks = [torch.argmax(first, dim=1)]
    score = dist[rows, picks[0]]  # min over the picked of D_sj, with one pick: that row
    if valid is not None:
        score = score.masked_fill(~valid, float("-inf"))  # stays -inf: min(-inf, d) = -inf
    for _ in range(count - 1):
        if mask_picked:
            score = score.index_put((rows, picks[-1]), torch.tensor(float("-inf"), dtype=score.dtype, device=score.device))
        picks.append(torch.argmax(score, dim=1))
        score = torch.minimum(score, dist[rows, picks[-1]])
    return torch.stack(picks, dim=1)


def _divprune(inp: VisionInputs, variant: str, ratio: Optional[float] = None, budget: Optional[int] = None) -> List[CompressedImage]:
    counts = units.unit_counts(inp, budget, ratio, default_ratio=DEFAULT_RATIO, rounding=units.NEAREST, minimum=0)
    if min(counts) < 1:
        short = counts.index(min(counts))
        v = units.valid_counts(inp)[short]
        where = "" if inp.valid is None else f" of unit {short}'s {v} valid patches"
        raise ValueError(f"divprune: ratio={ratio} keeps int(round(ratio * {v})) = 0 tokens{where}; give a larger ratio or budget")
    if variant == "reference":
        picks = max_min_picks(cosine_distance(inp.projected[:1], variant), counts[0], mask_picked=False)
        return gather_sorted(inp, picks.expand(inp.batch_size, -1))  # sorted with the repeats, as released
    picks = max_min_picks(cosine_distance(inp.projected, variant), max(counts), mask_picked=True, valid=inp.valid)
    return gather_sorted(inp, picks, counts)


register(
    MethodSpec(
        "divprune",
        _divprune,
        "DivPrune: a max-min diversity subset of the projector outputs (cosine distance), spatial order",
        params={
            "ratio": Param(None, float, f"kept fraction of the N patches, n = round(ratio * N) (released SUBSET_RATIO {DEFAULT_RATIO})", unit_interval),
            "budget": BUDGET,
        },
        needs=frozenset({"projected"}),
        unit_aware=True,
    )
)

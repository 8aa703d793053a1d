"""Recoverable Compression (Chen et al., "Recoverable Compression: A Multimodal Vision Token
Recovery Mechanism Guided by Text Information"; released code: token_recycling_with_text_in_
vision_and_clustring in llava/model/multimodal_encoder/clip_encoder.py of the authors' repo).

1. s = cosine(t, P_j) / sqrt(Dt): t = CLIP text embedding, P = visual_projection(last CLIP block
   output, no post-layernorm). a = CLS attention (signals.cls_attention).
2. V = top-n_v of a, n_v = int(N * LOF_fraction(a, lof_k_visual)).
3. s' = s with V set to min(s); T = top-n_t of s', n_t = int((N - n_v) * LOF_fraction(s', lof_k_text)).
4. First block = h[sort(V u T)], spatial order (roles: V kept, T recovered).
5. R = the other patches, ascending. n_c = int(N_c * LOF_fraction(a_R, lof_k_merge)) centres =
   top-n_c of a_R; each merges its `num_neighbors` best among (other centres ++ non-centres
   ascending) by key cosine + text_weight * s (merge.py); extra token = sum of a_j h_j over the
   non-centres, dropped when n_c = 0.
6. Output = [first block, centres (descending a), extra].

Variants:
  reference  the released code: N_c = the hidden size D (1024 for CLIP-L) instead of |R|;
             centre and candidate keys looked up by their POSITION in R (the key of patch p
             for the p-th patch of R); torch.topk tie order, duplicates between V and T (ties
             at min(s)) kept together with the released complement quirk; text row 0 only.
             Batch > 1, |R| < 2 (LOF cannot fit), n_c > |R| and fewer than num_neighbors + 1 patches in R
             (the released code crashes on each) raise ValueError.
  fixed      per image and batched: N_c = |R|, keys by patch index, T drawn from the patches
             outside V (no duplicates), ties broken towards the lower patch index, each
             image's own text_embeds row, num_neighbors capped at |R| - 1, empty R -> no
             centres, and never an empty output: when V, T and the centres are all empty
             (flat attention and flat text) the extra token (sum of a_j h_j over all patches)
             is kept. The reference then returns 0 tokens, as the released code does.
             Every pick (the three LOF fractions, V, T, the centres) is taken on settled float64
             scores: the CLS logits, the visual projection and text cosine (signals.settle), so
             the kept patches do not depend on the BLAS summation order (the LOF fits see those
             scores rounded once to float32, as scikit-learn fits them). What only shapes the
             merged features stays as released: fp32 key cosines for the neighbours (plus the
             text bias), the fp32 attention as weights.
Which text is encoded and how it is pooled (the released code: the system-prompt line, EOS
position without mask, max_length 20) is the model wrapper's business; compress only reads
text_embeds.

budget = 1: the top-attention patch with every other patch merged into it, h_c + sum_{j != c} a_j h_j
(merge.single_token; the same single token as PruMerge's). Matched budget (`budget=N`, N >= 2): one extra token is always
kept (it summarises every patch not emitted), the first block keeps its LOF sizes while they
fit in N - 1, otherwise both shrink proportionally (n_v' = ceil(n_v (N-1) / (n_v + n_t)),
n_t' = N - 1 - n_v'; T is still drawn with all of V masked), and the remaining
N - 1 - n_v' - n_t' slots are the secondary centres (top of a over R; the third LOF is
skipped). Exactly N tokens: first block + centres + extra.

Units (fixed; methods/units.py): with valid patches every LOF fraction is fitted on the unit's valid patches only and
N is their count V (n_v = int(V * fraction), n_t over V - n_v, N_c = |R| over the valid rest), s' sets V to the minimum
of s over the valid patches, and only valid patches are kept, recovered, centres, neighbours or in the extra token;
the CLS attention and the text similarity stay as computed over all tokens. budgets[b] works as `budget` unit by
unit (budget-1 units get the single token, in their own sub-batch).

`ratio` is rejected: the method has no keep-ratio hyper-parameter (the paper moves its token
count with the LOF k's, Table 4); use budget=N for an exact count, or lof_k_visual /
lof_k_text / lof_k_merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import outliers, units
from .inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, ROLE_RECOVERED, CompressedImage, VisionInputs
from .merge import knn_merge, reference_complement, single_token
from .registry import BUDGET, MethodSpec, Param, non_negative, positive_int, register
from .signals import FIXED_DTYPE, cls_attention, settle, top_indices, top_rank


@dataclass
class Plan:
    """What the merge and the assembly need, per image or padded over the batch."""

    first: list[torch.Tensor]  # per image [F_b] patch indices, ascending (duplicates: reference ties)
    first_role: list[torch.Tensor]  # per image [F_b] ROLE_KEPT (V) / ROLE_RECOVERED (T)
    centres: torch.Tensor  # [B, Cmax] patch indices in descending attention, padded
    n_centres: list[int]
    pool: torch.Tensor  # [B, N] bool: R
    keys: torch.Tensor  # [B, N, D] keys (one row per patch) as the merge must see them
    text_score: torch.Tensor  # [B, N] s' (min-masked s) the merge bias is read from
    num_candidates: int | None  # topk vector length (reference: |R| - 1, the released one)
    keep_extra: list[bool]


def _no_ratio(value: object) -> str | None:
    if value is None:
        return None
    return (
        "is not supported by recover: its token count is adaptive (LOF); use budget=N for an exact count, "
        "or lof_k_visual / lof_k_text / lof_k_merge to move the adaptive count"
    )


def text_similarity(last_hidden: torch.Tensor, text: torch.Tensor, projection: torch.Tensor,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 1+N, D], text [T, Dt] (T = 1 or B), W [Dt, D] -> [B, N] cosine(t, P_j) / sqrt(Dt).

    dtype None: op order as released: project all 1+N tokens, slice, normalise, matmul, then scale.
    dtype float64 (fixed): the patches projected, normalised and dotted in float64, the cosine settled, then scaled.
    """
    if dtype is not None:  # image by image: one image's float64 rows stay in cache
        w, t = projection.to(dtype), F.normalize(text.to(dtype), p=2, dim=-1)
        cos = [F.normalize(F.linear(last_hidden[i, 1:].to(dtype), w), p=2, dim=-1) @ t[i % t.shape[0]] for i in range(last_hidden.shape[0])]
        return settle(torch.stack(cos)) * w.shape[0] ** -0.5
    proj = F.linear(last_hidden, projection)
    patches = F.normalize(proj[:, 1:], p=2, dim=-1)
    t = F.normalize(text, p=2, dim=-1)
    t = t if t.shape[0] == 1 else t[:, None, :]  # the released [1, Dt] text broadcasts over the batch
    return (t @ patches.transpose(-2, -1) * proj.shape[-1] ** -0.5).reshape(proj.shape[0], -1)


def count_of(fraction: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """int(total * fraction) in float64, as the released Python does (never a float32 mean)."""
    return torch.floor(total.to(torch.float64) * fraction.to(torch.float64)).long()


def shrink(n_v: torch.Tensor, n_t: torch.Tensor, cap: int | torch.Tensor) -> tuple:
    """Budget: shrink (n_v, n_t) proportionally to fit `cap` (one for all, or per unit), visual rounded up."""
    total = n_v + n_t
    over = total > cap
    nv = torch.where(over, (n_v * cap + total - 1) // total.clamp(min=1), n_v)
    return nv, torch.where(over, cap - nv, n_t)


def subset_fraction(scores: torch.Tensor, mask: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """LOF outlier fraction (float64 [B]) of each row's masked entries, as a separate fit per row.

    The subsets (ascending patch order, as the released code gathers them) are left-aligned and
    padded with one value farther from every member than the members' whole range, so no pad
    enters a member's k-neighbourhood and every member's LOF label equals that of the unpadded
    fit; one batched lof_outliers call then serves every image. Rows where the padded fit is not
    the same fit (subset size <= 2k + 1: sklearn clamps k or picks brute force) get their own call.
    """
    b, n = scores.shape
    p = torch.arange(n, device=scores.device)
    sizes = mask.sum(dim=1)
    compact = scores.gather(1, torch.argsort(torch.where(mask, p, n + p), dim=1))
    host = sizes.tolist()
    width = max(host)
    frac = torch.zeros(b, dtype=torch.float64, device=scores.device)
    if width == 0:
        return frac
    member = p[None, :width] < sizes[:, None]
    if min(host) == width:
        frac = outliers.lof_fraction(compact[:, :width], n_neighbors).to(frac)
    else:
        some = (sizes > 0)[:, None]
        lo = torch.where(some, scores.masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True), 0.0)
        hi = torch.where(some, scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True), 0.0)
        padded = torch.where(member, compact[:, :width], hi + (hi - lo) + 1.0)
        labels = outliers.lof_outliers(padded, n_neighbors) & member
        frac = labels.sum(dim=1, dtype=torch.float64) / sizes.clamp(min=1)
    for i, size in enumerate(host):
        if size == 0:
            frac[i] = 0.0
        elif min(host) != width and n_neighbors >= size // 2:
            frac[i] = outliers.lof_fraction(compact[i : i + 1, :size], n_neighbors)[0]
    return frac


def top_among(scores: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: the k_b highest `allowed` entries per row, ties to the lower index (signals.top_rank, fixed)."""
    return (top_rank(scores.masked_fill(~allowed, float("-inf")), k, "fixed") < scores.shape[1]) & allowed


def _plan_fixed(inp: VisionInputs, attn: torch.Tensor, sim: torch.Tensor, p: dict) -> Plan:
    """Batched fixed variant: masks for V, T, R and the centres of every image at once. With valid patches
    (inp.valid) every count, fraction and minimum is taken over the unit's valid patches only, and only they are
    kept, recovered, centres or merged."""
    b, n = attn.shape
    valid = inp.valid
    everything = torch.ones_like(attn, dtype=torch.bool) if valid is None else valid
    full = torch.full((b,), n, device=attn.device) if valid is None else valid.sum(dim=1)

    def fraction(scores: torch.Tensor, k: int) -> torch.Tensor:
        return outliers.lof_fraction(scores, k) if valid is None else subset_fraction(scores, valid, k)

    n_v = count_of(fraction(attn, p["lof_k_visual"]), full)
    v_all = top_among(attn, everything, n_v)
    lowest = (sim if valid is None else sim.masked_fill(~valid, float("inf"))).min(dim=1, keepdim=True).values
    sim_masked = torch.where(v_all, lowest, sim)
    n_t = count_of(fraction(sim_masked, p["lof_k_text"]), full - n_v)
    budgets = p["budgets"]
    if budgets is not None:
        cap = torch.tensor(budgets, dtype=torch.long, device=attn.device) - 1
        n_v, n_t = shrink(n_v, n_t, cap)
    v = top_among(attn, everything, n_v)
    t = top_among(sim_masked, everything & ~v_all, n_t)
    pool = everything & ~(v | t)
    if budgets is not None:
        n_c = cap - n_v - n_t
    else:
        n_c = count_of(subset_fraction(attn, pool, p["lof_k_merge"]), pool.sum(dim=1))
    centres = top_among(attn, pool, n_c)
    cmax = int(n_c.max())
    order = top_indices(attn.masked_fill(~centres, float("-inf")), cmax, "fixed")
    first = v | t
    sizes, counts = torch.stack([first.sum(dim=1), n_c]).tolist()
    patch = torch.arange(n, device=attn.device).expand(b, n)
    rows = list(torch.split(patch[first], sizes))  # ascending within each image
    return Plan(
        first=rows,
        first_role=list(torch.split(torch.where(v, ROLE_KEPT, ROLE_RECOVERED)[first], sizes)),
        centres=order,
        n_centres=counts,
        pool=pool,
        keys=units.patch_rows(inp, inp.k),
        text_score=sim_masked,
        num_candidates=None,
        keep_extra=[c > 0 or f == 0 or budgets is not None for c, f in zip(counts, sizes)],  # never 0 tokens
    )


def _ref_error(problem: str) -> ValueError:
    return ValueError(f"recover (reference): {problem} (the released code crashes here); use variant=fixed")


def _plan_reference(inp: VisionInputs, attn: torch.Tensor, sim: torch.Tensor, p: dict) -> Plan:
    """The released steps for one image, quirks included (host-side counts: batch is 1)."""
    n = attn.shape[1]
    frac_v = float(outliers.lof_fraction(attn, p["lof_k_visual"])[0])
    n_v = int(n * frac_v)
    sim = sim.clone()
    sim[:, top_indices(attn, n_v, "reference")[0]] = sim.min(dim=-1).values
    n_t = int((n - n_v) * float(outliers.lof_fraction(sim, p["lof_k_text"])[0]))
    if p["budget"] is not None:
        nv, nt = shrink(torch.tensor([n_v]), torch.tensor([n_t]), p["budget"] - 1)
        n_v, n_t = int(nv), int(nt)
    v = top_indices(attn, n_v, "reference")
    first = torch.sort(torch.cat([v, top_indices(sim, n_t, "reference")], dim=1), dim=1).values
    rest = reference_complement(first, n)  # R, ascending
    size = rest.shape[1]
    attn_r = attn.gather(1, rest)
    if p["budget"] is not None:
        n_c = p["budget"] - 1 - n_v - n_t
    elif size < 2:
        raise _ref_error(f"{size} patch(es) left after the first block (LOF cannot fit fewer than 2)")
    else:
        n_c = int(inp.hidden.shape[-1] * float(outliers.lof_fraction(attn_r, p["lof_k_merge"])[0]))  # N_c = D
    if n_c > size:
        raise _ref_error(f"n_c={n_c} centres (N_c = hidden size {inp.hidden.shape[-1]}) exceed the {size} remaining patches")
    if n_c > 0 and size - 1 < p["num_neighbors"]:
        raise _ref_error(f"only {size} patches remain for num_neighbors={p['num_neighbors']} (needs >= {p['num_neighbors'] + 1})")
    pos = top_indices(attn_r, n_c, "reference")  # positions in R
    keys = units.patch_rows(inp, inp.k)
    remapped = keys.clone()
    remapped[:, rest[0]] = keys[:, :size]  # the p-th patch of R gets patch p's key
    role = torch.where(torch.isin(first[0], v[0]), ROLE_KEPT, ROLE_RECOVERED)
    return Plan(
        first=[first[0]],
        first_role=[role],
        centres=rest.gather(1, pos),
        n_centres=[n_c],
        pool=torch.zeros_like(attn, dtype=torch.bool).scatter_(1, rest, True),
        keys=remapped,
        text_score=sim,
        num_candidates=size - 1,
        keep_extra=[n_c > 0 or p["budget"] is not None],
    )


def assemble(inp: VisionInputs, plan: Plan, merged: torch.Tensor, extra: torch.Tensor) -> list[CompressedImage]:
    """[first block, centres, extra] per image with indices and roles."""
    outs = []
    dev = merged.device
    minus_one = torch.full((1,), -1, dtype=torch.long, device=dev)
    for b, first in enumerate(plan.first):
        nc = plan.n_centres[b]
        feats = [inp.patches[b, first], merged[b, :nc]]
        index = [first, plan.centres[b, :nc]]
        role = [plan.first_role[b].long(), torch.full((nc,), ROLE_MERGED, dtype=torch.long, device=dev)]
        if plan.keep_extra[b]:
            feats.append(extra[b : b + 1])
            index.append(minus_one)
            role.append(torch.full((1,), ROLE_EXTRA, dtype=torch.long, device=dev))
        outs.append(CompressedImage(torch.cat(feats), torch.cat(index), torch.cat(role)))
    return outs


def _check(variant: str, inp: VisionInputs, budget: int | None) -> None:
    if variant == "reference" and inp.batch_size > 1:
        raise ValueError("recover (reference): the released code only runs with batch size 1; use variant=fixed")
    if inp.text_embeds.shape[0] != inp.batch_size:
        raise ValueError(f"recover: text_embeds has {inp.text_embeds.shape[0]} rows for a batch of {inp.batch_size}")


def _recover(
    inp: VisionInputs,
    variant: str,
    lof_k_visual: int = 20,
    lof_k_text: int = 20,
    lof_k_merge: int = 10,
    num_neighbors: int = 32,
    text_weight: float = 50.0,
    budget: int | None = None,
    ratio: float | None = None,
) -> list[CompressedImage]:
    _check(variant, inp, budget)
    budgets = units.unit_budgets(inp, budget)
    if budgets is not None and 1 in budgets and set(budgets) != {1}:  # budget-1 units: their own token rule
        return units.split_units(inp, [m == 1 for m in budgets], lambda sub, _: _recover(
            sub, variant, lof_k_visual, lof_k_text, lof_k_merge, num_neighbors, text_weight, budget, ratio))
    p = {
        "lof_k_visual": lof_k_visual,
        "lof_k_text": lof_k_text,
        "lof_k_merge": lof_k_merge,
        "num_neighbors": num_neighbors,
        "budget": budget,
        "budgets": budgets,
    }
    attn = cls_attention(inp.q, inp.k)  # the merge weights (fp32, as released)
    scores = attn if variant == "reference" else cls_attention(inp.q, inp.k, FIXED_DTYPE)  # what decisions rank
    if budgets is not None and budgets[0] == 1:
        return single_token(inp.patches, attn, variant, scores, inp.valid)
    if variant == "reference":
        sim = text_similarity(inp.last_hidden, inp.text_embeds[:1].to(inp.last_hidden.dtype), inp.visual_projection.to(inp.last_hidden.dtype))
        plan = _plan_reference(inp, attn, sim, p)
    else:
        plan = _plan_fixed(inp, scores, text_similarity(inp.last_hidden, inp.text_embeds, inp.visual_projection, FIXED_DTYPE), p)
    counts = torch.tensor(plan.n_centres, device=attn.device)
    merged, extra = knn_merge(
        inp.patches,
        attn,
        plan.keys,
        plan.centres,
        counts,
        num_neighbors,
        pool=plan.pool,
        bias=plan.text_score * text_weight,
        num_candidates=plan.num_candidates,
        variant=variant,
    )
    return assemble(inp, plan, merged, extra)


register(
    MethodSpec(
        "recover",
        _recover,
        "Recoverable Compression: LOF-adaptive visual tokens + text-recovered tokens + kNN-merged remainder",
        params={
            "lof_k_visual": Param(20, int, "LOF n_neighbors for the visual (CLS attention) outlier fraction", positive_int),
            "lof_k_text": Param(20, int, "LOF n_neighbors for the text-similarity outlier fraction", positive_int),
            "lof_k_merge": Param(10, int, "LOF n_neighbors for the secondary-recovery (centre) fraction", positive_int),
            "num_neighbors": Param(32, int, "kNN size: patches merged into each secondary centre", positive_int),
            "text_weight": Param(50.0, float, "weight of the text score in the merge score (key cosine + w * s), >= 0", non_negative),
            "budget": BUDGET,
            "ratio": Param(None, float, "not supported (the count is adaptive); use budget or the lof_k_* parameters", _no_ratio),
        },
        needs=frozenset({"qk", "cls", "last_hidden", "text"}),
        reference_batch_one=True,
        unit_aware=True,
    )
)

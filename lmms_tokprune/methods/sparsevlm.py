"""SparseVLM (Zhang et al., ICML'25; released code: Gumpest/SparseVLMs @ 26a5f48 main,
llava/model/language_model/{modelling_sparse_llama.py, score.py, utils.py}). Three cuts, after layers 2, 6, 15:

Kept visual tokens per stage = min(list_s, v - 1), v = the current visual tokens (recycled ones included), with
the released `retain` lists: v1.5 192 [300,200,110], 128 [303,110,36], 96 [238,48,26], 64 [66,30,17];
v2.0 192 [300,200,118], 128 [238,108,60], 96 [246,54,28], 64 [66,34,20].
1. Raters, once, from the LLM input embeddings (no norm, model dtype): m = the mean over the image rows of
   softmax_over_text(V T^T), T = every token after the image; raters = the text tokens with m > mean(m).
2. A pruning layer l runs on all current tokens; then from its q / k on its input: the rater rows (causal), head
   mean, columns = the current visual span, mean over the raters -> score; keep the top min(list_s, v - 1) (topk),
   sequence order. Layer l's OUTPUT is pruned: layer l and its cache saw everything.
3. v1.5 recycling (when any were pruned): the pruned visual slots (ascending) -> candidates = the top
   int(0.3 * n_pruned) + 1 by score (descending) with their layer-l outputs x; c = int(n_cand / 10) + 1 clusters
   by DPC-kNN (d_ij = ||x_i - x_j|| / sqrt(D); rho_i = exp(-mean d^2 over its c nearest, self included) + 1e-6 u_i;
   delta_i = min(max d, min over rho_j > rho_i of d_ij); centres = top-c of delta * rho; every candidate joins
   its nearest centre, centres themselves; merged = sum of members / (count + 1e-6)). The c merged tokens go right
   after the kept visual tokens, in centre order, and are visual at the next stage (192: v = 309, 204, 113).
   Noise: the release draws u with torch.rand from the global RNG; we draw u [1, n_cand] from a fresh CPU
   generator seeded 0 at every recycling call, in fp32 (the values of seeding the global RNG with 0 right before
   the draw, without touching it), cast to the density's dtype.
4. v1.5 renumbers the positions after each stage; at decode each layer numbers the new token by its own cache.
5. v2.0 (the release's USE_VERSION=2_0, "SparseVLM+"): the map is divided elementwise by w_ij, the logit all-ones
   q and k get after rotary at the row's and column's positions, (2 / sqrt(d)) sum_k cos(theta_k (p_i - p_j)) --
   which can be <= 0, kept as released, in the model dtype; then the 14 heads (hard-coded) with the largest
   rater-to-visual mass are averaged; no recycling; original positions; decode at original length + t.

`budget=n` picks the retain list whose input-counted equivalent is nearest (v1.5 206.5 / 145.4 / 114.1 / 82.25,
v2.0 206.75 / 144.1 / 113.9 / 81.8 for 192 / 128 / 96 / 64 at L = 32): 192 -> 192, 128 -> 96, 64 -> 64.
`prune_layers` (the release hard-codes 2/6/15) runs it on a shallower decoder; with fewer than three layers the
first stages of the list are used.

Images of other sizes (LLaVA-NeXT, `LLMContext.image_tokens`): the lists are counts for an image of N = 576 patch
tokens; image i of N_i tokens keeps them scaled, round(list_s * N_i / N) (at least 1) -- SparseVLM's own LLaVA-NeXT
table scales the same way (2880 tokens -> 640 / 320 / 160 = 5 x 128 / 64 / 32) -- and a row keeps the sum over its
images of its whole visual span (min(sum, v - 1)); `budget=n` (per image) picks per image the list whose scaled
equivalent at N_i is nearest. Raters are the text tokens after the last image token (layout tokens never rate, are
never scored, never pruned); recycled tokens go right after the image span's last kept token (layout included).
Without image_tokens (LLaVA-1.5, as before) a row keeps one list, whatever its number of images.

Variants: `reference` = the release: batch 1 (its row-0 masks crash at B = 2: ValueError), the softmax in the
model dtype, torch.topk. Not reproduced: the full softmax it computes in every layer despite asserting SDPA (we
compute the rater rows only), its CUDA-only decode path, the 2024 v1's rank-adaptive counts. `fixed` = raters,
spans, masks and recycling per row (ragged rows re-packed left-padded), the same seeded draw per image and stage
(batch = batch 1), every text token rates when none exceeds the mean, non-finite v2.0 scores rank last, stable ties.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .llm_stages import (
    Cut,
    CutDecision,
    InLLMMethod,
    LLMContext,
    LLMPlan,
    check_rows,
    in_llm_only,
    nearest_index,
    planned_equivalent,
    refuse_reference_layout,
    refuse_reference_next,
    top_slots,
)
from .registry import EQUIVALENT_BUDGET, MethodSpec, Param, register
from .signals import top_indices

RETAIN = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
PRUNE_LAYERS = (2, 6, 15)
V2_HEADS = 14  # the release averages its 14 heads of largest rater-to-visual mass
VERSIONS = ("1.5", "2.0")


def recycled_count(pruned: int) -> int:
    """c = int(n_cand / 10) + 1 clusters of n_cand = int(0.3 * pruned) + 1 candidates; 0 when nothing was pruned."""
    if pruned <= 0:
        return 0
    return int((int(0.3 * pruned) + 1) / 10) + 1


def visual_per_stage(n: int, lists: Sequence[int], version: str) -> List[int]:
    """The visual tokens after each stage (v1.5: kept + recycled)."""
    out, v = [], n
    for keep in lists:
        kept = min(keep, v - 1)
        v = kept + (recycled_count(v - kept) if version == "1.5" else 0)
        out.append(v)
    return out


def equivalent(n: int, lists: Sequence[int], version: str, prune_layers: Sequence[int], layers: int) -> float:
    """Input counting: layers 0..l_1 compute on N, then each stage's tokens until the next pruning layer."""
    return planned_equivalent([l + 1 for l in prune_layers], visual_per_stage(n, lists, version), n, layers)


def scaled_lists(lists: Sequence[int], size: int, n: int) -> Tuple[int, ...]:
    """The stage lists of an image of `size` patch tokens: round(list_s * size / n), at least 1 (size == n: the lists)."""
    if size == n:
        return tuple(lists)
    return tuple(max(1, math.floor(keep * size / n + 0.5)) for keep in lists)


@lru_cache(maxsize=256)
def _retain_values(size: int, n: int, version: str, prune_layers: Tuple[int, ...], layers: int) -> Tuple[float, ...]:
    return tuple(equivalent(size, scaled_lists(RETAIN[version][r][: len(prune_layers)], size, n), version, prune_layers, layers)
                 for r in sorted(RETAIN[version]))


def resolve_retain(budget: int, n: int, version: str, prune_layers: Sequence[int], layers: int, size: Optional[int] = None) -> int:
    """The retain list whose equivalent is nearest to the budget (the lists are the granularity: always one), for an
    image of `size` patch tokens (default n) with its lists scaled by size / n."""
    keys = sorted(RETAIN[version])
    values = _retain_values(n if size is None else size, n, version, tuple(prune_layers), layers)
    return keys[nearest_index(values, budget)]


def raters(embeds: torch.Tensor, image: torch.Tensor, text: torch.Tensor, variant: str) -> torch.Tensor:
    """bool over `text` slots of one row: m = mean over image rows of softmax over the text of V T^T; m > mean(m)."""
    v, t = embeds[image], embeds[text]
    m = torch.softmax(v @ t.T, dim=-1).mean(dim=0)
    out = m > m.mean()
    if variant == "fixed" and not bool(out.any()):
        out = torch.ones_like(out)
    return out


def rope_weight(rows: torch.Tensor, cols: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, C] w_ij: the logit all-ones q and k get after rotary at positions p_i, p_j, = (2 / sqrt(d)) sum_k
    cos(theta_k (p_i - p_j)), computed as the release does: angles in fp32 (transformers' cos / sin cache), cos and
    sin cast to the model dtype, the rotated all-ones vectors' dot product / sqrt(d) in that dtype."""

    def rotated(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float()[:, None] * inv_freq.float()[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        ones = torch.ones_like(cos)
        half = ones.shape[-1] // 2
        return ones * cos + torch.cat([-ones[:, half:], ones[:, :half]], dim=-1) * sin

    return (rotated(rows) @ rotated(cols).T) / math.sqrt(head_dim)


def dpc_knn_merge(x: torch.Tensor, clusters: int, noise: torch.Tensor) -> torch.Tensor:
    """DPC-kNN over candidates x [n, D] (in descending-score order) -> [clusters, D] merged tokens in centre order."""
    d = (x[:, None] - x[None, :]).norm(dim=-1) / math.sqrt(x.shape[-1])
    nearest = torch.topk(d, k=clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.to(d.dtype) * 1e-6
    higher = (density[None, :] > density[:, None]).to(x.dtype)
    delta = (d * higher + d.max() * (1 - higher)).min(dim=-1).values
    centres = torch.topk(delta * density, k=clusters).indices
    assign = d[centres].argmin(dim=0)  # each candidate's nearest centre (ties: the first)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.zeros(clusters, dtype=x.dtype, device=x.device).index_add_(0, assign, torch.ones_like(assign, dtype=x.dtype))
    return sums / (counts[:, None] + 1e-6)


def seeded_noise(count: int) -> torch.Tensor:
    """u [1, count] in fp32 from a fresh CPU generator seeded 0 (= torch.rand right after torch.manual_seed(0))."""
    return torch.rand(1, count, generator=torch.Generator(device="cpu").manual_seed(0))[0]


def _check(context: LLMContext, variant: str = "fixed", version: str = "1.5", retain: int = 192, budget: Optional[int] = None,
           prune_layers: Sequence[int] = PRUNE_LAYERS) -> None:
    layers = context.num_layers
    prune_layers = tuple(prune_layers)
    if not 1 <= len(prune_layers) <= 3 or list(prune_layers) != sorted(set(prune_layers)) or prune_layers[-1] + 1 >= layers:
        raise ValueError(f"sparsevlm: prune_layers={list(prune_layers)} must be one to three increasing layers below {layers - 1} "
                         f"(the release prunes after layers 2, 6, 15 of 32)")
    if version == "2.0" and variant == "reference" and context.num_heads < V2_HEADS:
        raise ValueError(f"sparsevlm v2.0 (reference): the release averages {V2_HEADS} hard-coded heads; this LLM has "
                         f"{context.num_heads}; use variant=fixed (the min(14, heads) heads of largest mass)")
    refuse_reference_next("sparsevlm", variant, context)


def _plan(context: LLMContext, variant: str = "fixed", version: str = "1.5", retain: int = 192, budget: Optional[int] = None,
          prune_layers: Sequence[int] = PRUNE_LAYERS) -> LLMPlan:
    layers, n = context.num_layers, context.num_patches
    prune_layers = tuple(prune_layers)
    if budget is not None:
        retain = resolve_retain(budget, n, version, prune_layers, layers)
    lists = RETAIN[version][retain][: len(prune_layers)]  # a shallower decoder (fewer pruning layers) uses the first stages
    row_lists: Optional[List[Tuple[int, ...]]] = None
    per_row: Optional[List[dict]] = None
    if context.image_tokens is not None:  # per image: its own (scaled) lists, summed over the row's images
        row_lists, per_row = [], []
        for images in context.image_tokens:
            retains = [resolve_retain(budget, n, version, prune_layers, layers, size) if budget is not None else retain for size in images]
            mine = [scaled_lists(RETAIN[version][r][: len(prune_layers)], size, n) for r, size in zip(retains, images)]
            summed = tuple(sum(stage) for stage in zip(*mine)) if mine else tuple(0 for _ in prune_layers)
            row_lists.append(summed)
            total = sum(images)
            per_row.append({"retain": retains, "lists": list(summed),
                            "visual_tokens_equivalent": equivalent(total, summed, version, prune_layers, layers) if total else 0.0})
    state: Dict[str, Any] = {}

    def setup_raters(view: Any) -> List[torch.Tensor]:
        """Per row, the rater slots (in the loop's first slot layout; orig positions stay attached)."""
        out = []
        for b in range(view.hidden.shape[0]):
            image, valid = view.image[b] & view.valid[b], view.valid[b]
            slots = torch.arange(view.hidden.shape[1], device=view.hidden.device)
            if not bool(image.any()):
                out.append(slots[:0])
                continue
            text = valid & ~image & ~view.layout[b] & (slots > slots[image][-1])
            rate = raters(state["embeds"][b], image, text, variant)
            out.append(view.orig[b][slots[text][rate]])  # original positions of the raters
        return out

    def cut(stage: int) -> Cut:
        def decide(view: Any) -> CutDecision:
            refuse_reference_layout("sparsevlm", variant, view)
            batch, width = view.hidden.shape[:2]
            if variant == "reference" and batch > 1:
                raise ValueError("sparsevlm (reference): the released code uses row-0 masks and crashes at batch size 2; "
                                 "run batch_size=1 or variant=fixed")
            keep = view.valid & ~view.image
            inserted: List[torch.Tensor] = []
            for b in range(batch):
                rows = torch.nonzero(torch.isin(view.orig[b], state["raters"][b]) & view.valid[b]).flatten()
                visual = view.image[b] & view.valid[b]
                v = int(visual.sum())
                if v == 0:
                    inserted.append(view.hidden.new_zeros(0, view.hidden.shape[-1]))
                    continue
                softmax_dtype = view.model_dtype if variant == "reference" else torch.float32
                # [H, R, W]; with no rater (reference only: in fixed every text token rates) R = 0 and, as in the
                # release, the mean over none is NaN and topk still picks its count
                probs = view.attention_row(b, "prev", rows, softmax_dtype)
                if version == "2.0":
                    cols = torch.nonzero(visual).flatten()
                    w = rope_weight(view.positions[b, rows], view.positions[b, cols], view.rope_inv_freq, view.head_dim, view.model_dtype)
                    divided = probs[:, :, cols].to(view.model_dtype) / w[None]
                    if variant == "fixed":
                        divided = torch.nan_to_num(divided, nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
                    mass = divided.sum(dim=(1, 2))
                    heads = torch.topk(mass, min(V2_HEADS, mass.shape[0]) if variant == "fixed" else V2_HEADS).indices
                    per_visual = divided[heads].mean(dim=0).mean(dim=0)
                    score = torch.full((width,), float("-inf"), dtype=per_visual.dtype, device=view.hidden.device)
                    score[cols] = per_visual
                else:
                    score = probs.mean(dim=0).mean(dim=0)  # heads, then raters
                count = min((lists if row_lists is None else row_lists[b])[stage], v - 1)
                chosen = top_slots(score[None].float() if variant == "fixed" else score[None], visual[None], [count], variant)[0]
                keep[b] |= chosen
                pruned = visual & ~chosen
                if version == "1.5" and bool(pruned.any()):
                    slots = torch.nonzero(pruned).flatten()  # ascending
                    n_cand = int(0.3 * slots.numel()) + 1
                    top = top_indices(score[slots] if variant == "reference" else score[slots].float(), n_cand, variant)
                    x = view.hidden[b, slots[top]]
                    inserted.append(dpc_knn_merge(x, int(n_cand / 10) + 1, seeded_noise(n_cand)))
                else:
                    inserted.append(view.hidden.new_zeros(0, view.hidden.shape[-1]))
            return CutDecision(keep, inserted=inserted if version == "1.5" else None, renumber=version == "1.5")

        return Cut(prune_layers[stage] + 1, decide)

    def setup(view: Any) -> None:  # before layer 0: the hidden states are the LLM input embeddings
        check_rows(context, view)
        state["embeds"] = view.hidden
        state["raters"] = setup_raters(view)

    if context.varied and budget is not None:  # the retain lists differ image by image: per_row says
        notes: dict = {"version": version, "prune_layers": list(prune_layers)}
    else:
        notes = {"version": version, "retain": retain, "prune_layers": list(prune_layers),
                 "visual_tokens_equivalent": equivalent(n, lists, version, prune_layers, layers)}
    if per_row is not None:
        notes["per_row"] = per_row  # per batch row: each image's retain, the row's summed lists and planned equivalent
    return LLMPlan([cut(s) for s in range(len(prune_layers))], "cache" if version == "1.5" else "original", notes=notes, setup=setup)


def _layers(value: Any) -> Optional[str]:
    return None if all(isinstance(v, int) and v >= 0 for v in value) else "must be decoder layer indices >= 0"


register(
    MethodSpec(
        "sparsevlm",
        in_llm_only("sparsevlm"),
        "SparseVLM: text raters score the visual tokens after layers 2 / 6 / 15; v1.5 recycles the pruned ones by DPC-kNN",
        params={
            "version": Param("1.5", str, "1.5 (main's default path, ICML'25) or 2.0 (SparseVLM+, USE_VERSION=2_0)", choices=VERSIONS),
            "retain": Param(192, int, "the released RETAIN_TOKN: 192, 128, 96 or 64 (selects the stage lists)", choices=(192, 128, 96, 64)),
            "budget": EQUIVALENT_BUDGET,
            "prune_layers": Param(PRUNE_LAYERS, tuple, "the three layers after which it prunes (hard-coded 2/6/15 in the release)",
                                  _layers, item=int),
        },
        budget_sets=("retain",),
        plan=InLLMMethod(_check, _plan),
        reference_batch_one=True,
    )
)

"""Signals shared by several methods, computed only where they are needed.

CLS attention follows the released PruMerge / Recoverable Compression code: ONE head over all
D dims of the raw q_proj / k_proj outputs (bias included, no head split, no scaling before),
softmax over all 1+N keys, then the CLS row without its own column. Only that row is computed,
so the model itself can keep SDPA / flash attention everywhere.

Precision of what a `fixed` variant ranks (shared/PEERS.md "Precision and ties", issue #22 item 3). A sum over
feature dimensions (an attention logit, a cosine, a Gram entry, a text similarity) rounded in fp32 depends on the
order the BLAS kernel adds its terms in, by ~1e-7 relative: two CPUs, or the same CPU after the feature dims are
permuted, then rank exact ties and 1e-8 near-ties differently (the released VisPruner rounds cascade one flipped
tie into a different kept set). `fixed` therefore computes every such sum in float64 from the fp32 inputs
(`signal_dtype`) and `settle`s the bounded value it yields (a logit, a cosine): rounds it to a multiple of 2^-35
(2.9e-11), far above float64's summation-order noise (below 1e-13 for 4096 unit-scale terms) and far below any gap a
ranking should resolve.
Two summation orders of one exact value then give the same bits (unless the value lies within that noise of a
rounding midpoint, ~1e-5 of values, and only matters when another score sits in the neighbouring cell), so
exact ties stay exact ties, broken by position (stable sorts, the first argmax), and near-ties down to ~1e-10
are resolved by value. Everything after the settled sums is elementwise or reduces over tokens / heads / picks
in a fixed order. Features stay fp32: only the decisions use the settled float64 scores.
`reference` never calls these paths (dtype None): it keeps the released dtype, ops and tie order.

Ranking with a variant's tie rule happens here and nowhere else: `top_indices` (the k largest), `top_rank` (each
row's own k_b, as positions) and `ranked` (the whole descending order). reference keeps the released op (torch.topk,
or torch's unstable argsort where a release orders a whole list); fixed is a stable order, ties to the lower index.
"""

from __future__ import annotations

import math

import torch

FIXED_DTYPE = torch.float64  # what `fixed` computes its ranking signals in
SETTLE = 1.5 * 2.0**17  # x + SETTLE lies in [2^17, 2^18) while |x| < 2^16: its float64 spacing there is 2^(17 - 52) = 2^-35


def signal_dtype(variant: str) -> torch.dtype | None:
    """The dtype a variant computes ranking signals in: None (the inputs' own, released arithmetic) for
    reference, float64 (settled) for fixed."""
    return None if variant == "reference" else FIXED_DTYPE


def settle(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest multiple of 2^-35 (module doc; ties to even), for |x| < 2^16 (cosines,
    attention logits): (x + 1.5 * 2^17) - 1.5 * 2^17, two IEEE additions (the first rounds, the second is exact),
    so the result depends only on x's value. +-inf and NaN pass through; a larger |x| is rounded to a coarser
    grid, still a deterministic function of x."""
    return (x + SETTLE) - SETTLE


def cls_logits(q: torch.Tensor, k: torch.Tensor, num_heads: int, dtype: torch.dtype = FIXED_DTYPE, *,
               keys: str | None = None) -> torch.Tensor:
    """[B, 1+N, D] raw q / k -> [B, H, 1+N] CLS logits q_CLS,h . k_j,h / sqrt(D/H) in `dtype` (settled when float64).
    Reads only the CLS row of q.

    Image by image: converting one image's keys (577 x 1024) to float64 stays in cache, which makes the float64
    path ~6x cheaper than converting the batch at once. The converted keys times the query (in place; float64
    products of fp32 / fp16 / bf16 inputs are exact), summed over each head's D/H dims: ~5x cheaper than a product
    with a block-diagonal [D, H] query matrix (whose zeros cost 15/16 of its flops) and, for one head, ~2.5x
    cheaper than a float64 matrix-vector product on CPU. Each logit is a float64 sum of exact products, settled.

    keys: the input's name for errors (e.g. "feature_k"): then a logit that is not finite is a ValueError naming
    it. The caller has checked the CLS query row; a NaN / inf in the keys always makes a logit NaN or +-inf (every
    key entry is multiplied into one logit; float64 sums of fp32 products cannot overflow), so this replaces a
    scan of the keys (registry.validate_inputs, "logits")."""
    b, t, d = k.shape
    width = d // num_heads
    query = q[:, 0].to(dtype).view(b, num_heads, width)
    out = torch.stack([k[i].view(t, num_heads, width).to(dtype, copy=True).mul_(query[i]).sum(dim=-1) for i in range(b)])
    logits = out.transpose(1, 2) * width**-0.5
    if keys is not None and not bool(torch.isfinite(logits.sum())):
        raise ValueError(f"VisionInputs.{keys} contains NaN or inf")
    return settle(logits) if dtype == FIXED_DTYPE else logits


def cls_attention(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype | None = None, *, keys: str | None = None) -> torch.Tensor:
    """[B, 1+N, D] q, k -> [B, N] attention probabilities of the CLS query on the patches.

    dtype None: in the inputs' dtype, as released. dtype float64 (fixed): settled float64 logits (`cls_logits`; `keys`
    names k for its finiteness check), then the softmax (a reduction over keys in a fixed order)."""
    if dtype is not None:
        return torch.softmax(cls_logits(q, k, 1, dtype, keys=keys)[:, 0], dim=-1)[:, 1:]
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bd,bnd->bn", q[:, 0], k) * scale  # [B, 1+N]
    return torch.softmax(logits, dim=-1)[:, 1:]


def top_indices(scores: torch.Tensor, k: int, variant: str) -> torch.Tensor:
    """Indices of the k largest along the last dim, highest first. reference: torch.topk (the released op and its
    tie order); fixed: the first k of a stable sort, ties to the lower index, identical at any batch size (fixed
    callers pass settled float64 scores, so ties of the exact values are exact ties here).

    fixed takes torch.topk's answer when it holds no tie (its k values strictly decreasing, none of the others
    equal to the k-th): then it is exactly the stable sort's prefix, 3-5x cheaper; any tie -> the stable sort."""
    if variant == "reference":
        return torch.topk(scores, k, dim=-1).indices
    if 0 < k <= scores.shape[-1]:
        top = torch.topk(scores, k, dim=-1)
        kth = top.values[..., -1:]
        inside = bool((top.values[..., 1:] == top.values[..., :-1]).any())
        if not inside and not bool(((scores == kth).sum(dim=-1) > 1).any()):
            return top.indices
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def ranked(scores: torch.Tensor, variant: str) -> torch.Tensor:
    """The whole descending order along the last dim (top_indices' companion, where a method needs every rank).
    reference: torch.argsort(descending=True) with torch's default, unstable sort (the op the releases that order a
    whole list call: VisPruner); fixed: a stable sort, ties to the lower index (its first k == top_indices(k))."""
    return torch.argsort(scores, dim=-1, descending=True, stable=variant != "reference")


def top_rank(scores: torch.Tensor, k: torch.Tensor, variant: str) -> torch.Tensor:
    """[B, N] scores, [B] counts k_b -> [B, N] long: each entry's position among its row's top-k_b (top_indices'
    order and tie rule), N for the others. One top_indices call with k = max k_b: reference gets the torch.topk
    call a release makes with that k (not a prefix of a longer ranking), fixed the stable prefix."""
    b, n = scores.shape
    kmax = int(k.max()) if b else 0
    pos = torch.arange(kmax, device=scores.device).expand(b, kmax)
    rank = torch.full((b, n), n, dtype=torch.long, device=scores.device)
    return rank.scatter_(1, top_indices(scores, kmax, variant), torch.where(pos < k[:, None], pos, n))


def row_matrix(feats: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, N, D] -> ([rows, D] matrix, rows per image) without copying a batch-strided view
    such as hidden[:, 1:] (patch (b, p) is row b * stride + p)."""
    b, n, d = feats.shape
    sb, sn, sd = feats.stride()
    if b > 0 and sd == 1 and sn == d and sb % d == 0 and sb >= n * d:
        return feats.as_strided(((b - 1) * (sb // d) + n, d), (d, 1)), sb // d
    return feats.reshape(b * n, d), n


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, N, D], [B, M] -> [B, M, D]: x[b, index[b, m]], by whole-row copies: one index_select on the rows of the
    batch (a batch-strided view such as hidden[:, 1:] is read in place, `row_matrix`), 2-3x faster on a CPU than
    advanced indexing and 4x faster than `gather` with an expanded index for 1024-wide rows. Every index must lie
    in [0, N)."""
    rows_mat, per_image = row_matrix(x)
    flat = (index + (torch.arange(x.shape[0], device=index.device) * per_image)[:, None]).reshape(-1)
    return rows_mat.index_select(0, flat).view(index.shape[0], index.shape[1], x.shape[-1])


def normalized(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along `dim` (cosine similarity becomes a dot product)."""
    return torch.nn.functional.normalize(x, p=2, dim=dim)


def cosine_gram(x: torch.Tensor, eps: float = 1e-12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] cosine similarities, from the Gram matrix of the raw rows scaled by the norms on
    its diagonal: one matmul and an N x N rescale, instead of normalising all B*N*D inputs first (3.4 ms less per
    576 x 4096 image on a CPU, 40% of the matmul). Norms clamp at eps like F.normalize.

    dtype float32 (default) or float64 (fixed): Gram matrix (image by image), norms and cosines in float64, the
    cosines settled, so they are the same bits whatever the summation order (an exact duplicate row: exactly 1)."""
    if dtype == FIXED_DTYPE:
        gram = torch.stack([symmetric_gram(x[i].to(dtype)) for i in range(x.shape[0])])
    else:
        x = x.to(dtype)
        gram = torch.bmm(x, x.transpose(1, 2))
    inv = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(eps * eps).rsqrt()
    gram = gram.mul_(inv[:, :, None]).mul_(inv[:, None, :])
    return settle(gram) if dtype == FIXED_DTYPE else gram  # settled as cosines, |.| <= 1: the raw Gram has any scale


def symmetric_gram(rows: torch.Tensor, block: int = 96) -> torch.Tensor:
    """[N, D] -> [N, N] rows @ rows.T from its upper block trapezoid only (one product per block of rows against
    itself and the rows after it, mirrored): ~40% fewer flops than the full product, exactly symmetric."""
    n = rows.shape[0]
    out = torch.empty(n, n, dtype=rows.dtype, device=rows.device)
    for start in range(0, n, block):
        part = rows[start : start + block] @ rows[start:].T
        out[start : start + block, start:] = part
        out[start:, start : start + block] = part.T
    return out


def cosine_cross(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, M, D], [B, K, D] -> [B, M, K] settled float64 cosines (fixed), image by image: rows normalised in
    float64 with the norm clamped at eps (F.normalize), one product, settled."""
    def unit(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(t.to(FIXED_DTYPE), p=2, dim=-1, eps=eps)

    return settle(torch.stack([unit(a[i]) @ unit(b[i]).T for i in range(a.shape[0])]))


def cls_attention_per_head(q: torch.Tensor, k: torch.Tensor, num_heads: int, dtype: torch.dtype | None = None, *,
                           keys: str | None = None) -> torch.Tensor:
    """[B, 1+N, D] raw q_proj / k_proj outputs -> [B, H, N]: per head h (dims h*D/H .. (h+1)*D/H - 1),
    softmax_j(q_CLS,h . k_j,h / sqrt(D/H)) over all 1+N keys, CLS column dropped, no renormalisation.

    Only the CLS row is computed (PEERS.md, "CLS attention per head"), so the tower keeps SDPA.
    dtype None: the inputs' dtype, as released; float64 (fixed): settled float64 logits (`cls_logits`; `keys` names k
    for its finiteness check).
    """
    if dtype is not None:
        return torch.softmax(cls_logits(q, k, num_heads, dtype, keys=keys), dim=-1)[:, :, 1:]
    b, t, d = k.shape
    head_dim = d // num_heads
    # a broadcast product + sum: on CPU 9x faster than the equivalent einsum / batched matmul for one query row
    logits = (k.reshape(b, t, num_heads, head_dim) * q[:, 0].reshape(b, 1, num_heads, head_dim)).sum(dim=-1).transpose(1, 2)
    logits = logits * head_dim**-0.5
    return torch.softmax(logits, dim=-1)[:, :, 1:]

"""The kNN merge shared by PruMerge, PruMerge+ and Recoverable Compression, batched.

Every centre c_i (in output order) gathers its `num_neighbors` best candidates, where the
candidates are, in this order, all OTHER centre slots (c_i's own slot removed) followed by the
non-centre patches of the pool in ascending patch order. That order is exactly the
concatenation the released code builds per centre, so `torch.topk` sees the same vector and
resolves ties the same way. Score = key cosine (+ an optional per-candidate bias, RC's
50 * text score). Output c_i -> h_c + sum_j a_j h_j with the raw attention a_j (NOT
normalised); the extra token is sum_j a_j h_j over the non-centre pool patches.
variant="fixed" ranks the candidates with ties to the earlier candidate (signals.top_indices). The key cosines stay
fp32 for both variants: the neighbours only shape a merged token's features, never which patches are kept, and the
features are fp32 sums anyway (float64 here cost PruMerge+ 3 ms per image, a third of its time).

All of it is padded batched tensor work: per-image centre counts are a mask, never a loop.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .signals import row_matrix, take_rows, top_indices


def reference_complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The released `complement_idx`: [B, K] indices -> [B, n - K] ascending complement.

    Quirk kept on purpose: it zeroes the entries of arange(n) at `idx`, sorts, and drops the
    first K values, so with DUPLICATES in `idx` it also drops the smallest real complement
    entries (they vanish from the merge and from the extra token).
    """
    base = torch.arange(n, device=idx.device).expand(idx.shape[0], n)
    masked = torch.scatter(base, 1, idx, 0)
    return torch.sort(masked, dim=1).values[:, idx.shape[1] :]


def _centre_mask(centres: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """[B, M] centre patches (+ slot validity) -> bool [B, N]; padded slots never mark a patch."""
    hits = torch.zeros(centres.shape[0], n, dtype=torch.int32, device=centres.device)
    return hits.scatter_add_(1, centres, valid.to(torch.int32)) > 0


def candidate_sequence(centres: torch.Tensor, n_centres: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: valid centre slots in order, then `rest` patches ascending, then padding.

    Returns (patch id, valid) per sequence slot, [B, M + N] each. Keys are unique, so the
    argsort is a deterministic stable compaction.
    """
    b, m = centres.shape
    n = rest.shape[1]
    dev = centres.device
    slot = torch.arange(m, device=dev)
    patch = torch.arange(n, device=dev)
    valid_c = slot[None, :] < n_centres[:, None]
    far = 2 * (m + n)
    key = torch.cat([torch.where(valid_c, slot, far + slot), torch.where(rest, m + patch, far + m + patch)], dim=1)
    order = torch.argsort(key, dim=1)
    slot_patch = torch.cat([centres, patch.expand(b, n)], dim=1)
    slot_valid = torch.cat([valid_c, rest], dim=1)
    return slot_patch.gather(1, order), slot_valid.gather(1, order)


def knn_merge(
    feats: torch.Tensor,
    attn: torch.Tensor,
    keys: torch.Tensor,
    centres: torch.Tensor,
    n_centres: torch.Tensor,
    num_neighbors: int,
    pool: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_candidates: int | None = None,
    variant: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each centre with its nearest candidates; returns (merged [B, M, D], extra [B, D]).

    feats [B, N, D]: features to merge (penultimate patch states h).
    attn [B, N]: raw CLS attention a (merge weights, unnormalised).
    keys [B, N, Dk]: raw keys, one row per patch (a caller may remap rows); L2-normalised here
        before the dot products, as released, so half-precision cosines round the same way.
    centres [B, M]: patch indices in output order; slots >= n_centres[b] are padding (any index).
    n_centres [B]: number of valid centre slots per image.
    pool [B, N] bool: patches taking part (default all); non-pool patches are ignored.
    bias [B, N]: added to a candidate's score (RC: text_weight * text score).
    num_candidates: length of the candidate vector handed to topk (default N - 1; invalid
        entries at its end are -inf). The released code builds exactly pool size - 1 entries,
        and topk's tie order depends on that length: pass it to reproduce ties bit for bit.
    variant: "reference" (torch.topk's tie order) or "fixed" (ties to the earlier candidate).
    Centres may repeat (the released PruMerge+ training branch): every slot is a candidate.
    With fewer valid candidates than num_neighbors a centre merges all of them (callers that
    must reproduce the released crash check the counts first). Padded centre rows come back as
    garbage; callers slice them off.
    """
    b, n, _d = feats.shape
    m = centres.shape[1]
    if pool is None:
        pool = torch.ones(b, n, dtype=torch.bool, device=feats.device)
    valid_c = torch.arange(m, device=feats.device)[None, :] < n_centres[:, None]
    rest = pool & ~_centre_mask(centres, valid_c, n)
    extra = torch.einsum("bn,bnd->bd", (attn * rest.to(attn.dtype)).to(feats.dtype), feats)
    centre_feats = take_rows(feats, centres)
    length = n - 1 if num_candidates is None else int(num_candidates)
    k = min(int(num_neighbors), length)
    if m == 0 or k <= 0:
        return centre_feats, extra
    nb_patch, weight = neighbours(attn, keys, centres, n_centres, rest, k, length, bias, variant)
    return centre_feats + weighted_sum(feats, nb_patch, weight.to(feats.dtype)), extra


def neighbours(
    attn: torch.Tensor,
    keys: torch.Tensor,
    centres: torch.Tensor,
    n_centres: torch.Tensor,
    rest: torch.Tensor,
    k: int,
    length: int,
    bias: torch.Tensor | None,
    variant: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates per centre -> (patch ids [B, M, k], weights a_j [B, M, k], 0 if invalid).

    Row i of the score matrix is laid out in candidate-sequence order with slot i removed,
    i.e. exactly the vector the released loop hands to topk (valid entries first); fixed ranks with
    signals.top_indices (ties to the earlier candidate).
    """
    b, m = centres.shape
    n = rest.shape[1]
    seq_patch, seq_valid = candidate_sequence(centres, n_centres, rest)
    seq_patch = seq_patch[:, :n]  # valid slots never exceed N
    unit = F.normalize(keys, p=2, dim=-1)
    score = torch.bmm(take_rows(unit, centres), unit.transpose(1, 2))  # [B, M, N] cosine per patch
    if bias is not None:
        score = score + bias[:, None, :]
    j = torch.arange(length, device=attn.device)
    slot = j[None, :] + (j[None, :] >= torch.arange(m, device=attn.device)[:, None]).long()  # [M, L], own slot skipped
    cand = seq_patch.gather(1, slot.reshape(1, -1).expand(b, -1)).view(b, m, length)
    score = score.gather(2, cand)
    usable = seq_valid.sum(dim=1) - 1  # valid candidates per image (own slot removed)
    score = score.masked_fill(j[None, None, :] >= usable[:, None, None], float("-inf"))
    pick = top_indices(score, k, variant)  # [B, M, k], descending score
    nb_patch = cand.gather(2, pick)
    ok = (pick < usable[:, None, None]).to(attn.dtype)
    weight = attn.gather(1, nb_patch.reshape(b, -1)).view(b, m, k) * ok
    return nb_patch, weight


def weighted_sum(feats: torch.Tensor, nb_patch: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, N, D], neighbours [B, M, k] + weights -> [B, M, D] = sum_j w_j feats[nb_j].

    CPU float32/64: a CSR sparse matmul (k of N weights per row are non-zero, ~3x faster than
    dense). Elsewhere (GPU, half precision): a dense [B, M, N] weight matrix and one bmm.
    Repeated neighbours add up in both.
    """
    b, n, d = feats.shape
    m, k = nb_patch.shape[1:]
    if feats.device.type == "cpu" and feats.dtype in (torch.float32, torch.float64):
        rows_mat, per_image = row_matrix(feats)
        cols = (nb_patch + (torch.arange(b, device=feats.device) * per_image)[:, None, None]).reshape(-1)
        crow = torch.arange(0, b * m * k + 1, k, device=feats.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
            sparse = torch.sparse_csr_tensor(crow, cols, weight.reshape(-1), size=(b * m, rows_mat.shape[0]))
            return (sparse @ rows_mat).view(b, m, d)
    dense = torch.zeros(b, m, n, dtype=feats.dtype, device=feats.device)
    return torch.bmm(dense.scatter_add_(2, nb_patch, weight), feats)


def single_token(feats: torch.Tensor, attn: torch.Tensor, variant: str, scores: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> list:
    """budget=1 for the merging methods: the top-attention patch c with every other patch merged into it,
    h_c + sum_{j != c} a_j h_j (the centre's merge and the extra token's sum in one token; roles: kept).

    reference: torch.topk's tie order; fixed: ties to the lower patch index. `scores` (fixed: the settled
    float64 attention) decide c when given; `attn` is always the merge weight. valid [B, N] (fixed): c is the
    top valid patch and only valid patches are merged into it.
    """
    from .inputs import ROLE_KEPT, CompressedImage

    ranking = attn if scores is None else scores
    top = top_indices(ranking if valid is None else ranking.masked_fill(~valid, float("-inf")), 1, variant)[:, 0]
    rows = torch.arange(attn.shape[0], device=attn.device)
    weight = attn.clone() if valid is None else attn * valid.to(attn.dtype)
    weight[rows, top] = 0.0
    merged = feats[rows, top] + torch.einsum("bn,bnd->bd", weight.to(feats.dtype), feats)
    role = torch.full((1,), ROLE_KEPT, dtype=torch.long, device=attn.device)
    return [CompressedImage(merged[b : b + 1], top[b : b + 1].clone(), role) for b in range(attn.shape[0])]

"""Signals shared by several methods, computed only where they are needed.

CLS attention follows the released PruMerge / Recoverable Compression code: ONE head over all
D dims of the raw q_proj / k_proj outputs (bias included, no head split, no scaling before),
softmax over all 1+N keys, then the CLS row without its own column. Only that row is computed,
so the model itself can keep SDPA / flash attention everywhere.
"""

from __future__ import annotations

import math

import torch


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, 1+N, D] q, k -> [B, N] attention probabilities of the CLS query on the patches."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bd,bnd->bn", q[:, 0], k) * scale  # [B, 1+N]
    return torch.softmax(logits, dim=-1)[:, 1:]


def top_indices(scores: torch.Tensor, k: int, variant: str) -> torch.Tensor:
    """Indices of the k largest along the last dim, highest first. reference: torch.topk (the released op and its
    tie order); fixed: a stable sort, ties to the lower index, identical at any batch size."""
    if variant == "reference":
        return torch.topk(scores, k, dim=-1).indices
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, N, D], [B, M] -> [B, M, D]: x[b, index[b, m]]. Advanced indexing, not `gather` with an expanded index
    (4x slower on a CPU for 1024-wide rows)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def normalized(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along `dim` (cosine similarity becomes a dot product)."""
    return torch.nn.functional.normalize(x, p=2, dim=dim)


def cosine_gram(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] fp32 cosine similarities, from the Gram matrix of the raw rows scaled by the norms on
    its diagonal: one matmul and an N x N rescale, instead of normalising all B*N*D inputs first (3.4 ms less per
    576 x 4096 image on a CPU, 40% of the matmul). Norms clamp at eps like F.normalize."""
    x = x.float()
    gram = torch.bmm(x, x.transpose(1, 2))
    inv = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(eps * eps).rsqrt()
    return gram.mul_(inv[:, :, None]).mul_(inv[:, None, :])


def cls_attention_per_head(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, 1+N, D] raw q_proj / k_proj outputs -> [B, H, N]: per head h (dims h*D/H .. (h+1)*D/H - 1),
    softmax_j(q_CLS,h . k_j,h / sqrt(D/H)) over all 1+N keys, CLS column dropped, no renormalisation.

    Only the CLS row is computed (PEERS.md, "CLS attention per head"), so the tower keeps SDPA.
    """
    b, t, d = k.shape
    head_dim = d // num_heads
    # a broadcast product + sum: on CPU 9x faster than the equivalent einsum / batched matmul for one query row
    logits = (k.reshape(b, t, num_heads, head_dim) * q[:, 0].reshape(b, 1, num_heads, head_dim)).sum(dim=-1).transpose(1, 2)
    logits = logits * head_dim**-0.5
    return torch.softmax(logits, dim=-1)[:, :, 1:]

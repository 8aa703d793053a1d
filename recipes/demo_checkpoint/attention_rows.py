"""Attention probabilities of a few query rows of a Llama forward, without eager attention.

Why: the grounding loss of the demo recipe needs, for each answer position, how much attention it puts on the
named object's image tokens. ``output_attentions`` needs eager attention and materialises [B, H, T, T] per
layer (about 2x slower on CPU at T ~ 1000); recomputing only the N supervised rows from the layer's own
q/k projections (with RoPE) costs [N, H, T] and leaves the fast sdpa path untouched.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from transformers.models.llama.modeling_llama import rotate_half


class AttentionRows:
    """Context manager: ``rows[layer]`` = [N, H, T] softmax attention of the query positions ``(batch_idx, pos)``.

    Valid for right-padded causal batches (keys after a query are masked; padding comes after every real token).
    """

    def __init__(self, language_model, layers: Sequence[int], batch_idx: torch.Tensor, positions: torch.Tensor):
        self.model = language_model
        self.layers = list(layers)
        self.batch_idx, self.positions = batch_idx, positions
        self.rows: Dict[int, torch.Tensor] = {}
        self._handles: List = []

    def __enter__(self) -> "AttentionRows":
        for layer in self.layers:
            attn = self.model.layers[layer].self_attn
            self._handles.append(attn.register_forward_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            self.rows[layer] = query_rows(module, hidden, cos, sin, self.batch_idx, self.positions)

        return hook


def query_rows(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch_idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N, H, T] causal softmax attention of rows ``(batch_idx[n], positions[n])`` of one LlamaAttention layer."""
    b, t, _ = hidden.shape
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # [1, T, hd] when position_ids were the default
    hd = attn.head_dim
    n_kv = attn.config.num_key_value_heads
    h_sel = hidden[batch_idx, positions]  # [N, D]
    q = attn.q_proj(h_sel).view(len(batch_idx), -1, hd)  # [N, H, hd]
    cq, sq = cos[batch_idx, positions][:, None], sin[batch_idx, positions][:, None]
    q = q * cq + rotate_half(q) * sq
    k = attn.k_proj(hidden).view(b, t, n_kv, hd)
    k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]  # [B, T, KV, hd]
    k = k[batch_idx].repeat_interleave(q.shape[1] // n_kv, dim=2)  # [N, T, H, hd]
    scores = torch.einsum("nhd,nthd->nht", q, k) * attn.scaling
    future = torch.arange(t, device=hidden.device)[None, :] > positions[:, None]  # [N, T]
    scores = scores.masked_fill(future[:, None, :], float("-inf"))
    return scores.softmax(-1)

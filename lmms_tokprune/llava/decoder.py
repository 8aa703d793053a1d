"""The pieces of a Llama-style decoder the pruning loop calls directly, and attention rows computed from q / k.

Every decoder layer runs with the attention implementation it was loaded with (SDPA): when a method needs
attention probabilities (the last prompt token's row, a few rater rows, or every row accumulated), they are
computed here from the layer's own input norm, q_proj / k_proj and rotary embedding, only for the query rows
asked for, in chunks -- never a full T x T map in memory, never eager attention in the model.

Llama (LLaVA-1.5, Vicuna) and Mistral (LLaVA-NeXT Mistral-7B) decoders have the same pieces (embed_tokens, layers,
rotary_emb, norm; a layer's input_layernorm, self_attn.q_proj / k_proj / head_dim / scaling, GQA by
num_key_value_heads). Mistral's `sliding_window` (when its text config sets one) restricts every query to the key
slots less than `sliding_window` behind it, as transformers' masks do over cache positions: `window` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half  # Llama's own GQA repeat and rotary half-turn

from .attention_masks import as_attention_mask

MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class DecoderParts:
    """What the loop calls: embeddings, layers, rotary embedding, final norm (and lm_head when generating)."""

    embed: nn.Module
    layers: List[nn.Module]
    rotary: nn.Module
    norm: nn.Module
    lm_head: Optional[nn.Module]
    config: Any  # the text config
    attn_implementation: str

    @property
    def sliding_window(self) -> Optional[int]:
        """The text config's sliding attention window (Mistral), or None (Llama; Mistral configs without one)."""
        window = getattr(self.config, "sliding_window", None)
        return int(window) if window is not None else None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


NEEDED = ("embed_tokens", "layers", "rotary_emb", "norm")


def decoder_parts(model: nn.Module) -> DecoderParts:
    """A Llava(Next)ForConditionalGeneration (its language model + lm_head), a Llama / Mistral ForCausalLM (its model
    + lm_head) or a bare Llama / Mistral decoder (LLaVA's `model.model.language_model`, no lm_head) -> its pieces; a
    clear error for anything else."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    head = getattr(model, "lm_head", None)
    if lm is None and inner is not None and all(hasattr(inner, n) for n in NEEDED):
        lm = inner  # a *ForCausalLM
    if lm is None:
        lm, head = model, None
    if not all(hasattr(lm, n) for n in NEEDED):
        raise ValueError("the in-LLM pruning loop needs a LLaVA model or its Llama-style language model (embed_tokens, layers, rotary_emb, norm)")
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl not in MASKABLE_ATTENTION:
        raise ValueError(
            f"the in-LLM pruning loop needs an attention implementation that takes 4-D masks ({', '.join(MASKABLE_ATTENTION)}); "
            f"the model runs {impl!r} (load it with attn_implementation=sdpa)"
        )
    return DecoderParts(lm.embed_tokens, list(lm.layers), lm.rotary_emb, lm.norm, head, lm.config, impl)


def in_window(keys: torch.Tensor, queries: torch.Tensor, window: Optional[int]) -> Optional[torch.Tensor]:
    """bool [..., Q, S] (broadcast of queries[..., :, None] and keys[..., None, :]): key slot within the sliding
    window of the query slot, q - k < window (transformers' `kv_idx > q_idx - sliding_window`); None = no window."""
    if window is None:
        return None
    return keys[..., None, :] > queries[..., :, None] - window


def decoder_mask(valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype,
                 window: Optional[int] = None) -> Optional[torch.Tensor]:
    """Causal + padding (+ sliding-window) mask [B, 1, q_len, S] for queries in the last q_len of S slots.

    valid [B, S] bool marks real key slots. A query always sees its own slot (padded query rows
    stay finite; nobody reads them). `window`: a query sees only keys less than `window` slots behind it.
    SDPA gets a boolean mask, or None when nothing is masked beyond plain causality (what transformers
    does, so it can use is_causal); eager gets 0 / min (`attention_masks.as_attention_mask`, the rule the
    CLIP tower's key-padding mask uses too).
    """
    s = valid.shape[1]
    if implementation == "sdpa" and bool(valid.all()) and (q_len == 1 or q_len == s) and (window is None or s <= window):
        return None
    kv = torch.arange(s, device=valid.device)
    q_slot = kv[s - q_len:]
    allowed = valid[:, None, None, :] & (kv[None, None, None, :] <= q_slot[None, None, :, None])
    if window is not None:
        allowed = allowed & in_window(kv, q_slot, window)[None, None]
    allowed = allowed | (kv[None, None, None, :] == q_slot[None, None, :, None])
    return as_attention_mask(allowed, implementation, dtype)


def rope(x: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, heads, T, d] at the positions the (cos, sin) pair [B, T, d] was made for."""
    cos, sin = position_embeddings
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def project_query_key(layer: nn.Module, hidden: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """What `layer`'s attention computes as q and k from its input `hidden` [B, T, H]:
    input_layernorm -> q_proj / k_proj -> heads -> rotary. Returns q [B, Hq, T, d], k [B, Hkv, T, d]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    return rope(q, position_embeddings), rope(k, position_embeddings)


def layer_keys(layer: nn.Module, hidden: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The keys `layer` caches for its input: k_proj of the normed input, heads, rotary -> [B, Hkv, T, d]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, t, _ = x.shape
    return rope(attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2), position_embeddings)


def query_rows(layer: nn.Module, hidden: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The queries of `layer` for the slots `rows` [B, R] only -> [B, Hq, R, d] (rotary at those slots' positions)."""
    attn = layer.self_attn
    picked = torch.gather(hidden, 1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    x = layer.input_layernorm(picked)
    b, r, _ = x.shape
    heads = attn.q_proj.out_features // attn.head_dim  # explicit: R may be 0
    q = attn.q_proj(x).view(b, r, heads, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    index = rows.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    return rope(q, (torch.gather(cos, 1, index), torch.gather(sin, 1, index)))


def row_logits(q: torch.Tensor, k: torch.Tensor, scaling: float, rows: torch.Tensor, key_valid: torch.Tensor,
               window: Optional[int] = None) -> torch.Tensor:
    """[B, H, R, S] scaled logits of query slots `rows` over key slots, -inf for padding, for keys after the row and
    (sliding window) for keys `window` or more slots before it."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    slots = torch.arange(k.shape[2], device=k.device)
    allowed = key_valid[:, None, None, :] & (slots[None, None, None, :] <= rows[:, None, :, None])
    if window is not None:
        allowed = allowed & in_window(slots, rows, window)[:, None]
    return (torch.matmul(q, k.transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf"))


def accumulated_attention(probs: torch.Tensor, query_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """probs [B, H, Q, K] attention probabilities -> [B, K]: sum over (valid) queries, mean over heads."""
    if query_valid is not None:
        probs = probs * query_valid[:, None, :, None].to(probs.dtype)
    return probs.sum(dim=2).mean(dim=1)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    chunk: int = 256,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Accumulated causal attention received by each key, float32.

    q [B, Hq, Q, d] are the queries of the last Q of S key slots, k [B, Hkv, S, d] (GQA: repeated
    to Hq heads); key_valid [B, S], query_valid [B, Q]. Query rows are processed `chunk` at a time.
    `window`: a sliding-window decoder's window (keys less than `window` slots behind the query).
    """
    b, hq, nq, _ = q.shape
    s = k.shape[2]
    k = repeat_kv(k, hq // k.shape[1]).float()
    kv = torch.arange(s, device=q.device)
    out = torch.zeros(b, s, dtype=torch.float32, device=q.device)
    for start in range(0, nq, chunk):
        qc = q[:, :, start:start + chunk].float()
        q_slot = kv[s - nq + start: s - nq + start + qc.shape[2]]
        allowed = key_valid[:, None, None, :] & (kv[None, None, None, :] <= q_slot[None, None, :, None])
        if window is not None:
            allowed = allowed & in_window(kv, q_slot, window)[None, None]
        logits = torch.matmul(qc, k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # fully masked (padded) query rows
        out += accumulated_attention(probs, query_valid[:, start:start + chunk])
    return out

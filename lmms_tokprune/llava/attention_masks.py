"""The one rule for handing a boolean "may attend" mask to a transformers attention implementation.

SDPA takes the boolean mask itself (True = attend); eager adds a float bias: 0 where allowed, the dtype's minimum
where not (what transformers builds for eager). Used by the CLIP tower's key-padding mask (vision.py) and the
decoder loop's causal masks (decoder.py).
"""

from __future__ import annotations

import torch


def as_attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """allowed [B, 1, Q, S] bool -> the mask `implementation` takes: the same bool tensor for sdpa, an additive
    0 / finfo(dtype).min bias in `dtype` otherwise (eager)."""
    if implementation == "sdpa":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)

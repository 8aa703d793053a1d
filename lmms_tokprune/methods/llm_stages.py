"""What a method that prunes inside the LLM is, as data: cuts at layer boundaries, each a pure function of what
it reads (pure torch; the decoder loop in `llava/llm_pruning.py` computes what a cut asks for, on demand).

A cut acts at the boundary before decoder layer `layer`. It sees the current tokens (packed, left-padded: the
last slot of every row is its last prompt token) and can ask the loop for
  * `attention(which, rows)`: softmax attention probabilities [B, H, R, W] of the query slots `rows` [B, R] at
    layer `layer - 1` on ITS input ("prev": FastV, SparseVLM) or at layer `layer` on the current tokens
    ("own": PyramidDrop), causal, padding masked, from the layer's own q / k after rotary (GQA repeated);
  * `attention_row(b, which, rows)`: the same for one row b and its query slots `rows` [R] -> [H, R, W];
  * `attention_sum(which)`: the same summed over every valid query row (H2O), in chunks;
  * `keys(which)`: that layer's post-rotary keys, heads concatenated [B, W, Hkv * d] (DART);
  * `final_norm(x)`: the decoder's final RMSNorm (DART's features).
It returns which slots survive, optional inserted tokens (SparseVLM's recycled ones), whether positions are
renumbered after it, and whether the pruned tokens also leave the caches of the layers that already ran (H2O).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence

import torch

from .inputs import CompressedImage, VisionInputs
from .signals import top_indices


class CutView(Protocol):
    """What the loop shows a cut (see the module docstring)."""

    layer: int
    num_layers: int
    hidden: torch.Tensor  # [B, W, D] the current tokens (the input of `layer`)
    valid: torch.Tensor  # [B, W] bool
    image: torch.Tensor  # [B, W] bool: visual slots (recycled tokens included)
    positions: torch.Tensor  # [B, W] the rotary positions in use
    orig: torch.Tensor  # [B, W] original prompt positions (0-based), -1 for inserted tokens
    initial_images: torch.Tensor  # [B] visual tokens each row had entering the LLM
    model_dtype: torch.dtype
    head_dim: int
    rope_inv_freq: torch.Tensor  # [head_dim / 2] the rotary frequencies theta_k

    def attention(self, which: str, rows: torch.Tensor, softmax_dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def attention_row(self, row: int, which: str, rows: torch.Tensor, softmax_dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def attention_sum(self, which: str) -> torch.Tensor: ...

    def keys(self, which: str) -> torch.Tensor: ...

    def final_norm(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DecodeEviction:
    """H2O while generating: whenever a row's prunable tokens exceed heavy + recent, the lowest-scoring one outside
    the recent window leaves every layer's cache; scores accumulate the new tokens' attention at `layer`."""

    layer: int
    scores: torch.Tensor  # [B, W] accumulated attention per slot
    prunable: torch.Tensor  # [B, W] bool
    heavy: List[int]
    recent: List[int]


@dataclass
class CutDecision:
    keep: torch.Tensor  # [B, W] bool: the slots that survive
    inserted: Optional[List[torch.Tensor]] = None  # per row [I_b, D]: new visual tokens placed right after its last kept visual slot
    renumber: bool = False  # positions 0..T'-1 over the surviving tokens from here on (else the original positions stay)
    evict_earlier: bool = False  # the pruned tokens also leave the caches of layers < the cut's layer
    decode: Optional[DecodeEviction] = None  # slot-aligned with `keep` (before packing)


@dataclass
class Cut:
    layer: int
    decide: Callable[[CutView], CutDecision]


@dataclass
class LLMPlan:
    """A method inside the LLM for one batch: its cuts in layer order and how a new token is numbered at decode
    ("original": original length + t at every layer; "cache": each layer's own cache length + t)."""

    cuts: List[Cut]
    decode_positions: str = "original"
    notes: dict = field(default_factory=dict)  # resolved released parameters, for reports
    setup: Optional[Callable[["CutView"], None]] = None  # called before layer 0 (the hidden states are the input embeddings)


@dataclass(frozen=True)
class LLMContext:
    """What a plan may depend on: the decoder depth and the patches per image (576 for LLaVA-1.5)."""

    num_layers: int
    num_patches: int
    num_heads: int = 32  # attention heads of a decoder layer


def top_slots(scores: torch.Tensor, candidates: torch.Tensor, counts: Sequence[int], variant: str) -> torch.Tensor:
    """bool [B, W]: per row the counts[b] highest-scoring candidate slots. reference: torch.topk (the release's op and
    tie order); fixed: a stable sort, ties to the lower slot (= the earlier position)."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    keep = torch.zeros_like(candidates)
    for row, count in enumerate(counts):
        if count <= 0:
            continue
        keep[row, top_indices(masked[row], int(count), variant)] = True
    return keep & candidates


def in_llm_only(name: str):
    """The `compress` entry of a method that acts inside the LLM: a clear error."""
    def refuse(inp: VisionInputs, variant: str, **params: object) -> List[CompressedImage]:
        raise ValueError(f"{name} prunes inside the LLM: run it through the engine (lmms-eval model llava_{name}) or "
                         "lmms_tokprune.llava.prune_prefill, not compress()")
    return refuse


def planned_equivalent(cut_layers: Sequence[int], counts: Sequence[int], n: int, layers: int) -> float:
    """Input-counted equivalent visual tokens of cuts before layers l_1 < l_2 < ... keeping n_1, n_2, ... of n:
    sum_s (l_{s+1} - l_s) * n_s / L with l_0 = 0, n_0 = n, l_{S+1} = L (README "Equivalent tokens")."""
    bounds = [0, *cut_layers, layers]
    sizes = [n, *counts]
    return sum((bounds[s + 1] - bounds[s]) * sizes[s] for s in range(len(sizes))) / layers


def nearest_index(values: Sequence[float], target: float) -> int:
    """Index of the value nearest to target; ties to the smaller value (fewer tokens)."""
    return min(range(len(values)), key=lambda i: (abs(values[i] - target), values[i]))


def budget_error(method: str, budget: float, low: float, high: float, extend: str) -> ValueError:
    return ValueError(f"{method}: budget={budget} equivalent visual tokens is outside the reachable range {low:.2f} .. {high:.2f} "
                      f"with these parameters ({extend})")

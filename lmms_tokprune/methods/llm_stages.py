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

Layout tokens (`view.layout`: LLaVA-NeXT's image_newline after every grid row, Video-LLaVA's frame CLS tokens) are
tokens the LLM receives that are not patches: never visual (`view.image` is False on them, no visual count includes
them), never text (a method that reads "the text after the image" skips them), and never pruned -- the loop keeps
every layout slot whatever a cut's `keep` says.

Per-image patch counts (`LLMContext.image_tokens`): per batch row, the patch tokens of each of its images (LLaVA-1.5:
576 each; NeXT: 576 + H'W', different per image). A method's per-image parameters (FastV's rank, DART's
max_num_trunction, a `budget` = equivalent visual tokens PER IMAGE) resolve image by image from them. None = derived
as before: ceil(visual tokens / N) images of N = `num_patches` (LLaVA-1.5, and `prune_prefill` without them).

A method is an `InLLMMethod`: `check(context, ...)` -- everything the decoder depth, the heads and N decide, with
no batch (what an engine calls at load time, `check_llm`) -- and `build(context, ...)` -- the cuts for one batch.
Calling it (the registry's `spec.plan(context, variant=..., **params)`) runs both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple

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
    layout: torch.Tensor  # [B, W] bool: layout slots (not visual, not text, never pruned)
    initial_images: torch.Tensor  # [B] visual (patch) tokens each row had entering the LLM
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
    # the release prunes LLaVA-NeXT's packed span with its newline tokens as ordinary image tokens (DART, PDrop `reference`):
    # the loop shows layout slots to the cuts as image slots (view.image; view.layout all False), prunes them like any,
    # and still counts only patches as visual
    layout_candidates: bool = False


@dataclass(frozen=True)
class LLMContext:
    """What a plan may depend on: the decoder depth, the patches of one CLIP unit (576 for LLaVA-1.5: an image) and,
    per batch, the patch tokens of every image of every row.

    image_tokens: per batch row, a tuple of per-image patch-token counts (layout tokens excluded); None = derived
        from the visual tokens as ceil(count / num_patches) images of num_patches (LLaVA-1.5; `check` contexts).
    layout: the LLM sequence carries layout tokens and images of other sizes than one unit (LLaVA-NeXT): a
        `reference` variant computes what its release does on NeXT (DART, PDrop: over the packed span, newlines as
        candidates) or refuses (no_next_release), and a load-time `check` validates only what holds for every image
        (budgets below the floor of the smallest image)."""

    num_layers: int
    num_patches: int
    num_heads: int = 32  # attention heads of a decoder layer
    image_tokens: Optional[Tuple[Tuple[int, ...], ...]] = None
    layout: bool = False

    @property
    def varied(self) -> bool:
        """Images may differ from one unit of num_patches (NeXT): budgets resolve per image, clamped into each
        image's reachable range (the achieved value is what gets reported)."""
        return self.layout or (self.image_tokens is not None and any(n != self.num_patches for row in self.image_tokens for n in row))

    def images(self, row: int, visual: int) -> Tuple[int, ...]:
        """The patch tokens of each image of batch row `row`, which entered the LLM with `visual` patch tokens."""
        if self.image_tokens is None:
            n = self.num_patches
            return (n,) * -(-int(visual) // n) if n else ()
        if row >= len(self.image_tokens):
            raise ValueError(f"LLMContext.image_tokens has {len(self.image_tokens)} rows; the batch has more")
        counts = tuple(int(c) for c in self.image_tokens[row])
        if sum(counts) != int(visual):
            raise ValueError(f"LLMContext.image_tokens[{row}] = {list(counts)} sums to {sum(counts)} patch tokens; the row has {int(visual)} "
                             "visual tokens (image_mask minus layout slots)")
        return counts


def check_rows(context: "LLMContext", view: Any) -> None:
    """At the first cut: context.image_tokens has one entry per batch row and each adds up to the row's patch tokens."""
    if context.image_tokens is None:
        return
    if len(context.image_tokens) != view.hidden.shape[0]:
        raise ValueError(f"LLMContext.image_tokens has {len(context.image_tokens)} rows for a batch of {view.hidden.shape[0]}")
    for b, m in enumerate(view.initial_images.tolist()):
        context.images(b, int(m))


def floor_error(method: str, budget: float, floor: float, n: int, extend: str) -> ValueError:
    """A per-image budget below what the smallest image (one unit of n patch tokens) can reach: no image reaches it."""
    return ValueError(f"{method}: budget={budget} equivalent visual tokens is below {floor:.2f}, the least an image of {n} or more "
                      f"patch tokens reaches with these parameters ({extend})")


def no_next_release(name: str) -> ValueError:
    """The one refusal of `variant=reference` on LLaVA-NeXT for a method whose released code has no NeXT path."""
    return ValueError(f"{name} (variant=reference): the released code has no LLaVA-NeXT path (nothing to reproduce); "
                      f"variant=fixed runs {name} on LLaVA-NeXT")


def on_next(context: "LLMContext") -> bool:
    """The batch is LLaVA-NeXT's (layout tokens, or images of other sizes than one unit)."""
    return context.layout or (context.image_tokens is not None and context.varied)


def refuse_reference_next(name: str, variant: str, context: "LLMContext") -> None:
    """`reference` of a method whose release has no LLaVA-NeXT path (FastV, SparseVLM): images of other sizes or layout
    tokens -> ValueError (no_next_release)."""
    if variant == "reference" and on_next(context):
        raise no_next_release(name)


def refuse_reference_layout(name: str, variant: str, view: Any) -> None:
    """The same refusal at a cut, for callers that pass a layout mask without saying so in the context."""
    if variant == "reference" and bool((view.layout & view.valid).any()):
        raise no_next_release(name)


@dataclass(frozen=True)
class InLLMMethod:
    """A method inside the LLM as the registry holds it (`MethodSpec.plan`): `check(context, variant=..., **params)`
    validates what the decoder depth / heads / N decide (no batch needed; raises ValueError), `build(context,
    variant=..., **params)` makes one batch's LLMPlan. Calling it does both (BoundMethod.llm_plan)."""

    check: Callable[..., None]
    build: Callable[..., "LLMPlan"]

    def __call__(self, context: LLMContext, variant: str = "fixed", **params: Any) -> "LLMPlan":
        self.check(context, variant=variant, **params)
        return self.build(context, variant=variant, **params)


def check_llm(method: Any, context: LLMContext) -> None:
    """Load-time checks of a bound in-LLM method (a `methods.BoundMethod`) for a decoder described by `context`
    (num_layers, num_patches, num_heads; `layout=True` for LLaVA-NeXT, image_tokens None): layers in range, a
    reachable budget, reference refusals. Builds no plan. ValueError for a method that does not prune in the LLM."""
    plan = method.spec.plan
    if plan is None:
        raise ValueError(f"method {method.name!r} does not prune inside the LLM")
    check = getattr(plan, "check", None)
    if check is not None:
        check(context, variant=method.variant, **method.params)
    else:  # a plain plan function: its own checks run when it builds
        plan(context, variant=method.variant, **method.params)


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


def nearest_increasing(value: Callable[[int], float], lo: int, hi: int, guess: float, target: float) -> int:
    """The integer x in lo..hi whose value(x) is nearest to target (ties to the smaller value), for a strictly
    increasing `value` and `guess` ~ where it crosses the target: the same answer as nearest_index over every x,
    from the few x around the guess (the full list for a 2928-patch NeXT image costs milliseconds per image)."""
    base = math.floor(guess) if math.isfinite(guess) else (lo if guess < 0 else hi)
    xs = sorted({min(hi, max(lo, base + d)) for d in (-1, 0, 1, 2)})
    return xs[nearest_index([value(x) for x in xs], target)]


def budget_error(method: str, budget: float, low: float, high: float, extend: str) -> ValueError:
    return ValueError(f"{method}: budget={budget} equivalent visual tokens is outside the reachable range {low:.2f} .. {high:.2f} "
                      f"with these parameters ({extend})")

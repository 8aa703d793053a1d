"""One decoder loop for every method that prunes inside the LLM: prefill with cuts at layer boundaries, then
decoding over a KV cache consistent with what each layer kept. SDPA (or eager) everywhere, any batch size.

A method is an `LLMPlan` (methods/llm_stages.py): cuts, each a pure function of what it reads. The loop runs the
decoder layer by layer over left-padded rows; before the layer a cut names, it shows the cut the current tokens
and computes what the cut asks for (attention rows of the previous or the own layer, keys, the final norm),
then re-packs each row's surviving tokens left-padded (inserted tokens right after the row's last kept visual
token), renumbers positions when the cut says so, and -- for H2O -- drops the pruned tokens from the caches of
the layers that already ran. Each layer caches exactly the tokens it computed on, and keeps its own padding
mask for decoding; a new token's position is the original prompt length + t at every layer, or (methods that
renumber) each layer's own prefill length + t. Causality in the packed order equals causality in the original
order. Greedy and sampling are supported (transformers' logits processors); beam search is refused.

Layout tokens (`layout_mask`: LLaVA-NeXT's image_newline tokens, Video-LLaVA's frame CLS tokens) reach the LLM but
are not patches: the loop keeps every layout slot through every cut whatever the cut decides (and through H2O's
decode-time eviction), never counts one as visual, and shows them to cuts as `view.layout` (methods that read "the
text after the image" skip them). A slot marked in both `image_mask` and `layout_mask` is layout. A plan with
`layout_candidates` (the `reference` of a release that prunes LLaVA-NeXT's packed span, newlines included) sees the
layout slots as image slots instead: they are pruned like any image token, and still never counted as visual.

Sliding-window decoders (Mistral with `sliding_window` set): as transformers does over cache positions, a query
slot sees only the key slots less than `sliding_window` behind it -- in every mask the loop builds (prefill, decode)
and in the attention rows a cut reads. Rows are left-padded and packed, so within a row the slot distance is the
token distance (what a batch of one computes); the caches keep every slot (the loop's masks do the windowing).

Counts per row: `layer_lengths[l]` = tokens layer l computed on (prefill), `visual_per_layer[l]` = visual (patch)
tokens among them (what `visual_tokens_equivalent` averages; layout tokens excluded), `kept_positions[s]` =
original prompt positions after cut s in sequence order (-1 = inserted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..methods.llm_stages import Cut, CutDecision, DecodeEviction, LLMPlan
from .decoder import DecoderParts, attention_scores, decoder_mask, decoder_parts, layer_keys, project_query_key, query_rows, row_logits


def _layer_call(layer: nn.Module, h: torch.Tensor, mask, position_ids, cache, position_embeddings) -> torch.Tensor:
    out = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Tokens:
    """The current tokens of every row, left-padded: states, validity, rotary positions, original positions, visual flags."""

    h: torch.Tensor  # [B, W, D]
    valid: torch.Tensor  # [B, W] bool
    positions: torch.Tensor  # [B, W] long
    orig: torch.Tensor  # [B, W] long, -1 for inserted tokens
    image: torch.Tensor  # [B, W] bool: visual (patch) slots -- and candidate layout slots (`marked`)
    layout: torch.Tensor  # [B, W] bool: layout slots (never pruned, never visual)
    marked: Optional[torch.Tensor] = None  # [B, W] bool: layout slots a plan prunes like image tokens (LLMPlan.layout_candidates):
    #                                        in `image` for the cuts, never counted as visual


class LoopView:
    """What a cut before layer `layer` sees and can ask for (the CutView of methods/llm_stages.py)."""

    def __init__(self, parts: DecoderParts, layer: int, tokens: Tokens, prev_input: Optional[torch.Tensor], chunk: int,
                 initial_images: torch.Tensor) -> None:
        self.parts, self.layer, self.tokens, self.prev_input, self.chunk = parts, layer, tokens, prev_input, chunk
        self.initial_images = initial_images
        self.num_layers = parts.num_layers
        self.hidden, self.valid, self.positions, self.orig, self.image = tokens.h, tokens.valid, tokens.positions, tokens.orig, tokens.image
        self.layout = tokens.layout
        self.model_dtype = tokens.h.dtype
        self.head_dim = parts.layers[0].self_attn.head_dim
        self.rope_inv_freq = parts.rotary.inv_freq
        self._pe: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _source(self, which: str) -> Tuple[nn.Module, torch.Tensor]:
        if which == "prev":
            if self.prev_input is None:
                raise ValueError(f"a cut before layer {self.layer} cannot read the previous layer's attention (there is none)")
            return self.parts.layers[self.layer - 1], self.prev_input
        if which == "own":
            return self.parts.layers[self.layer], self.tokens.h
        raise ValueError(f"unknown attention source {which!r}; valid: prev, own")

    @property
    def pe(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._pe is None:  # positions do not change between the previous layer's run and this boundary
            self._pe = self.parts.rotary(self.tokens.h, self.tokens.positions)
        return self._pe

    def attention(self, which: str, rows: torch.Tensor, softmax_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        layer, hidden = self._source(which)
        q = query_rows(layer, hidden, self.pe, rows)
        k = layer_keys(layer, hidden, self.pe)
        logits = row_logits(q, k, layer.self_attn.scaling, rows, self.tokens.valid, self.parts.sliding_window)
        return torch.nan_to_num(torch.softmax(logits, dim=-1, dtype=softmax_dtype), nan=0.0)

    def attention_row(self, row: int, which: str, rows: torch.Tensor, softmax_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        layer, hidden = self._source(which)
        pe = tuple(t[row : row + 1] for t in self.pe)
        q = query_rows(layer, hidden[row : row + 1], pe, rows[None])
        k = layer_keys(layer, hidden[row : row + 1], pe)
        logits = row_logits(q, k, layer.self_attn.scaling, rows[None], self.tokens.valid[row : row + 1], self.parts.sliding_window)
        return torch.nan_to_num(torch.softmax(logits, dim=-1, dtype=softmax_dtype), nan=0.0)[0]

    def attention_sum(self, which: str) -> torch.Tensor:
        layer, hidden = self._source(which)
        q, k = project_query_key(layer, hidden, self.pe)
        return attention_scores(q, k, layer.self_attn.scaling, self.tokens.valid, self.tokens.valid, chunk=self.chunk,
                                window=self.parts.sliding_window)

    def keys(self, which: str) -> torch.Tensor:
        layer, hidden = self._source(which)
        k = layer_keys(layer, hidden, self.pe)  # [B, Hkv, W, d]
        return k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts.norm(x)


def _gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B, ..., S (at dim), ...], index [B, W] -> x with dim `dim` gathered to the W slots per row."""
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    return torch.gather(x, dim, index.view(view).expand(shape))


def pack(keep: torch.Tensor, image: torch.Tensor, inserted: Optional[List[torch.Tensor]] = None,
         layout: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """keep [B, W] bool -> (index [B, W'], valid [B, W']): each row's kept slots in order, left-padded, -1 where an
    inserted token goes (right after the row's last kept visual or layout slot -- the end of its image span, a NeXT
    image's last newline included; at the end of the kept tokens if it kept none)."""
    span = image if layout is None else image | layout
    rows = []
    for b in range(keep.shape[0]):
        slots = torch.nonzero(keep[b]).flatten()
        extra = 0 if inserted is None else int(inserted[b].shape[0])
        if extra:
            visual = torch.nonzero(span[b, slots]).flatten()
            cut = int(visual[-1]) + 1 if visual.numel() else slots.numel()
            slots = torch.cat([slots[:cut], torch.full((extra,), -1, dtype=slots.dtype, device=slots.device), slots[cut:]])
        rows.append(slots)
    width = max(int(r.numel()) for r in rows)
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    for b, slots in enumerate(rows):
        index[b, width - slots.numel():] = slots
        valid[b, width - slots.numel():] = True
    return index, valid


def apply_cut(tokens: Tokens, decision: CutDecision) -> Tuple[Tokens, torch.Tensor]:
    """The tokens after a cut, and the pack index (old slot per new slot, -1 inserted). Layout slots always survive."""
    index, valid = pack((decision.keep | tokens.layout) & tokens.valid, tokens.image, decision.inserted, tokens.layout)
    src = index.clamp(min=0)
    fresh = index < 0
    h = _gather(tokens.h, src, 1)
    if decision.inserted is not None:
        for b, new in enumerate(decision.inserted):
            if new.shape[0]:
                h[b, fresh[b]] = new.to(h.dtype)
    orig = _gather(tokens.orig, src, 1).masked_fill(fresh, -1)
    image = _gather(tokens.image, src, 1) | fresh
    layout = _gather(tokens.layout, src, 1) & ~fresh
    marked = None if tokens.marked is None else _gather(tokens.marked, src, 1) & ~fresh & valid
    if decision.renumber:
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    elif bool(fresh.any()):
        raise ValueError("a cut that inserts tokens must renumber positions (the inserted tokens have no original position)")
    else:
        positions = _gather(tokens.positions, src, 1)
    positions = positions.masked_fill(~valid, 0)
    return Tokens(h, valid, positions, orig.masked_fill(~valid, -1), image & valid, layout & valid, marked), index


@dataclass
class Prefill:
    """A finished prefill: the counts, the final hidden state at each row's last prompt token, and (for decoding)
    the cache with each layer's padding mask and the position base of its next token."""

    layer_lengths: List[List[int]]
    visual_per_layer: List[List[int]]
    kept_positions: List[List[torch.Tensor]]
    last_hidden: torch.Tensor  # [B, D] after the final norm
    prompt_lengths: List[int]
    cache: Any = None
    layer_valid: List[torch.Tensor] = field(default_factory=list)
    layer_base: List[torch.Tensor] = field(default_factory=list)
    decode: Optional[DecodeEviction] = None
    final: Optional[Tokens] = None
    cut_ms: float = 0.0  # time spent deciding the cuts (the method's own cost inside the prefill), when timed


def _pack_eviction(decode: Optional[DecodeEviction], index: torch.Tensor, valid: torch.Tensor) -> Optional[DecodeEviction]:
    if decode is None:
        return None
    src = index.clamp(min=0)
    return DecodeEviction(decode.layer, torch.gather(decode.scores, 1, src), torch.gather(decode.prunable, 1, src) & valid,
                          decode.heavy, decode.recent)


def _layout(layout_mask: Optional[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    if layout_mask is None:
        return torch.zeros_like(valid)
    if tuple(layout_mask.shape) != tuple(valid.shape):
        raise ValueError(f"layout_mask has shape {tuple(layout_mask.shape)}; the inputs are {tuple(valid.shape)}")
    return layout_mask.to(device=valid.device, dtype=torch.bool) & valid


@torch.inference_mode()
def run_prefill(parts: DecoderParts, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                plan: Optional[LLMPlan], chunk: int = 256, timed: bool = False, layout_mask: Optional[torch.Tensor] = None) -> Prefill:
    """Prefill over every decoder layer with the plan's cuts; see the module docstring. `timed`: measure the time
    the cuts take (synchronising a GPU around each), reported as `cut_ms`. `layout_mask` [B, T] bool: layout slots
    (None: none, LLaVA-1.5)."""
    from transformers import DynamicCache

    valid = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    layout = _layout(layout_mask, valid)
    if plan is not None and plan.layout_candidates:  # the release's packed span: layout slots are ordinary image tokens to it
        tokens = Tokens(inputs_embeds, valid, positions, positions.masked_fill(~valid, -1), (image_mask.bool() | layout) & valid,
                        torch.zeros_like(layout), layout)
    else:
        tokens = Tokens(inputs_embeds, valid, positions, positions.masked_fill(~valid, -1), image_mask.bool() & valid & ~layout, layout)
    prompt_lengths = valid.sum(dim=1)
    initial_images = tokens.image.sum(dim=1)
    cuts: Dict[int, Cut] = {c.layer: c for c in (plan.cuts if plan is not None else [])}
    by_cache_length = plan is not None and plan.decode_positions == "cache"
    # every slot stays cached: a sliding-window config would make transformers' cache keep only the last window
    # (the loop's masks apply the window instead, and H2O gathers the caches by slot)
    cache = DynamicCache(config=parts.config) if parts.sliding_window is None else DynamicCache()
    impl, dtype = parts.attn_implementation, inputs_embeds.dtype
    batch = valid.shape[0]
    kept: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    lengths: List[List[int]] = [[] for _ in range(batch)]
    visual: List[List[int]] = [[] for _ in range(batch)]
    layer_valid: List[torch.Tensor] = []
    layer_base: List[torch.Tensor] = []
    decode: Optional[DecodeEviction] = None
    prev_input: Optional[torch.Tensor] = None
    mask = pe = base = None
    cut_seconds = 0.0
    started = _tick(timed, inputs_embeds.device)
    if plan is not None and plan.setup is not None:
        plan.setup(LoopView(parts, 0, tokens, None, chunk, initial_images))
    cut_seconds += _tick(timed, inputs_embeds.device) - started
    for i, layer in enumerate(parts.layers):
        if i in cuts:
            started = _tick(timed, inputs_embeds.device)
            decision = cuts[i].decide(LoopView(parts, i, tokens, prev_input, chunk, initial_images))
            tokens, index = apply_cut(tokens, decision)
            cut_seconds += _tick(timed, inputs_embeds.device) - started
            decode = _pack_eviction(decision.decode, index, tokens.valid) if decision.decode is not None else _pack_eviction(decode, index, tokens.valid)
            if decode is not None:  # decode-time eviction never takes a layout slot either
                decode.prunable = decode.prunable & ~tokens.layout
            if decision.evict_earlier:  # H2O: the layers that already ran forget the pruned tokens too
                if bool((index < 0).any()):
                    raise ValueError("a cut cannot both insert tokens and evict them from earlier layers' caches")
                for j in range(i):
                    lay = cache.layers[j]
                    lay.keys, lay.values = _gather(lay.keys, index, 2), _gather(lay.values, index, 2)
                    layer_valid[j] = tokens.valid
            for b in range(batch):
                kept[b].append(tokens.orig[b][tokens.valid[b]])
            mask = pe = None
        if mask is None:
            mask = decoder_mask(tokens.valid, tokens.valid.shape[1], impl, dtype, parts.sliding_window)
            pe = parts.rotary(tokens.h, tokens.positions)
            base = tokens.valid.sum(dim=1) if by_cache_length else prompt_lengths
        patches = tokens.image & tokens.valid if tokens.marked is None else tokens.image & tokens.valid & ~tokens.marked
        counts, seen = tokens.valid.sum(dim=1).tolist(), patches.sum(dim=1).tolist()
        for b in range(batch):
            lengths[b].append(int(counts[b]))
            visual[b].append(int(seen[b]))
        layer_valid.append(tokens.valid)
        layer_base.append(base)
        prev_input = tokens.h
        tokens = Tokens(_layer_call(layer, tokens.h, mask, tokens.positions, cache, pe), tokens.valid, tokens.positions, tokens.orig, tokens.image,
                        tokens.layout, tokens.marked)
    last = parts.norm(tokens.h[:, -1])
    return Prefill(lengths, visual, kept, last, [int(n) for n in prompt_lengths.tolist()], cache, layer_valid, layer_base, decode, tokens,
                   1000.0 * cut_seconds)


def _tick(timed: bool, device: torch.device) -> float:
    if not timed:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class PrefillResult:
    """`prune_prefill`'s answer (DESIGN.md): per row, the tokens each layer computed on, the original positions
    present after each cut (-1 = inserted), and the final-norm hidden state at the last prompt token."""

    layer_lengths: List[List[int]]
    kept_positions: List[List[torch.Tensor]]
    last_hidden: torch.Tensor
    visual_per_layer: List[List[int]]
    plan: Optional[LLMPlan] = None

    @property
    def visual_tokens_equivalent(self) -> List[float]:
        """Per row: visual tokens per decoder layer (its input), averaged over the layers (input counting)."""
        return [sum(v) / len(v) for v in self.visual_per_layer]


def prune_prefill(method: str, language_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  image_mask: torch.Tensor, variant: str = "reference", *, layout_mask: Optional[torch.Tensor] = None,
                  image_tokens: Optional[Sequence[Sequence[int]]] = None, num_patches: Optional[int] = None, **params: Any) -> PrefillResult:
    """Prefill `language_model` (a Llama / Mistral decoder, LLaVA's model.model.language_model, run with the attention
    implementation it was loaded with) on left-padded inputs with an in-LLM method's cuts.

    layout_mask [B, T] bool: layout slots (NeXT newlines; never pruned, not visual). image_tokens: per row, the patch
    tokens of each of its images (NeXT: 576 + H'W'); num_patches: one CLIP unit's patches (576). Without them (as
    before) every row's visual tokens are images of N = the largest row's visual count."""
    from ..methods import bind
    from ..methods.llm_stages import LLMContext

    parts = decoder_parts(language_model)
    bound = bind(method, variant, **params)
    valid = attention_mask.bool()
    layout = _layout(layout_mask, valid)
    images = (image_mask.bool() & valid & ~layout).sum(dim=1) if layout_mask is not None else image_mask.bool().sum(dim=1)
    rows = None if image_tokens is None else tuple(tuple(int(n) for n in row) for row in image_tokens)
    if num_patches is None:
        num_patches = min((n for row in rows for n in row), default=0) if rows else (int(images.max()) if images.numel() else 0)
    context = LLMContext(parts.num_layers, num_patches, parts.config.num_attention_heads, image_tokens=rows, layout=bool(layout.any()))
    plan = bound.llm_plan(context)
    done = run_prefill(parts, inputs_embeds, attention_mask, image_mask, plan, layout_mask=layout_mask)
    return PrefillResult(done.layer_lengths, done.kept_positions, done.last_hidden, done.visual_per_layer, plan)


@dataclass
class GenerationOutput:
    tokens: List[List[int]]  # new tokens per sample, up to and excluding EOS
    prompt_lengths: List[int]  # real prompt length per sample
    kept_positions: List[torch.Tensor]  # original prompt positions (0-based) present after the last cut (-1 = inserted)
    layer_lengths: List[List[int]]  # per sample, sequence length each decoder layer processed at prefill
    evicted_in_decode: List[int] = field(default_factory=list)  # tokens evicted while generating
    step_logits: Optional[List[torch.Tensor]] = None  # [B, V] float32 per step, when asked (tests)
    sequences: Optional[torch.Tensor] = None  # [B, n] raw new tokens (EOS kept, padding after), like generate()
    visual_per_layer: List[List[int]] = field(default_factory=list)
    cut_positions: List[List[torch.Tensor]] = field(default_factory=list)  # per sample, per cut
    cut_ms: float = 0.0  # the cuts' own time inside the prefill (when timed)


class TokenChooser:
    """Greedy or sampled next token, with transformers' own logits processors (mirrors generate())."""

    def __init__(self, gen: Dict[str, Any], generation_config: Any = None) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if int(gen.get("num_beams", 1) or 1) > 1:
            raise ValueError(
                f"num_beams={gen['num_beams']} is not supported by methods that prune inside the LLM; the loop decodes greedily or by "
                "sampling only (beam search would need per-beam kept sets and caches)"
            )

        def default(key: str, fallback: Any) -> Any:
            if gen.get(key) is not None:
                return gen[key]
            value = getattr(generation_config, key, None) if generation_config is not None else None
            return fallback if value is None else value

        self.do_sample = bool(gen.get("do_sample", False))
        processors = LogitsProcessorList()
        # ids never to generate (generate()'s suppress_tokens: the rows original-format loading adds for <image>)
        suppressed = default("suppress_tokens", None)
        self.suppressed = torch.as_tensor(list(suppressed), dtype=torch.long) if suppressed else None
        penalty = gen.get("repetition_penalty")
        if penalty is not None and float(penalty) != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
        if self.do_sample:
            temperature = float(default("temperature", 1.0))
            top_k = default("top_k", 50)
            top_p = float(default("top_p", 1.0))
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k is not None and int(top_k) != 0:
                processors.append(TopKLogitsWarper(top_k=int(top_k)))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=top_p))
        self.processors = processors

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.suppressed is not None:
            logits = logits.index_fill(-1, self.suppressed.to(logits.device), float("-inf"))
        scores = self.processors(generated, logits)
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return torch.argmax(scores, dim=-1)


def _evict_one_per_row(decode: DecodeEviction, valid: torch.Tensor) -> List[int]:
    """Decode-time H2O step: rows whose prunable span exceeds heavy + recent lose their lowest-scoring slot
    outside the recent window (ties: the earlier slot), from every layer's cache. Returns the rows that evicted."""
    evicted = []
    for row in range(valid.shape[0]):
        cand = torch.nonzero(valid[row] & decode.prunable[row]).flatten()
        n, m = int(cand.numel()), int(decode.recent[row])
        if n <= int(decode.heavy[row]) + m:
            continue
        rest = cand[: n - m]
        worst = torch.sort(decode.scores[row, rest], descending=False, stable=True).indices[0]
        valid[row, rest[worst]] = False
        evicted.append(row)
    return evicted


@torch.inference_mode()
def generate_pruned(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    plan: Optional[LLMPlan],
    gen: Dict[str, Any],
    eos_token_id: Optional[int],
    pad_token_id: int,
    score_chunk: int = 256,
    keep_logits: bool = False,
    on_step: Optional[Callable[[], None]] = None,
    timed: bool = False,
    layout_mask: Optional[torch.Tensor] = None,
) -> GenerationOutput:
    """Prefill with the plan's cuts, then decode over each layer's kept cache (LLaVA model, or a *ForCausalLM: its
    lm_head is used). `layout_mask` [B, T] bool: layout slots (never pruned, not visual; None: none).

    plan=None prunes nothing (token-identical to `model.generate` on the same inputs_embeds / attention_mask).
    `on_step` is called once per step right after the forward pass (before the token is chosen), where
    generate() calls its logits processors (latency marks).
    """
    parts = decoder_parts(model)
    if parts.lm_head is None:
        raise ValueError("generation needs the LLaVA model (its lm_head), not the bare language model")
    chooser = TokenChooser(gen, getattr(model, "generation_config", None))
    max_new = int(gen.get("max_new_tokens", 20))
    done = run_prefill(parts, inputs_embeds, attention_mask, image_mask, plan, score_chunk, timed, layout_mask)
    impl, dtype = parts.attn_implementation, inputs_embeds.dtype
    cache, decode = done.cache, done.decode
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    # layers that share a padding mask share one tensor: group them, so a step builds each mask once and an
    # H2O eviction (in place) reaches every layer
    groups: List[Tuple[torch.Tensor, torch.Tensor, List[int]]] = []
    for i, (valid, base) in enumerate(zip(done.layer_valid, done.layer_base)):
        if groups and groups[-1][0] is valid and groups[-1][1] is base:
            groups[-1][2].append(i)
        else:
            groups.append((valid, base, [i]))
    valids = [g[0] for g in groups]
    logits = parts.lm_head(parts.norm(done.final.h[:, -1:]))[:, -1].float()
    evicted = [0] * batch
    generated = torch.zeros(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    step_logits: Optional[List[torch.Tensor]] = [] if keep_logits else None
    ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
    for step in range(max_new):
        if on_step is not None:
            on_step()
        if step_logits is not None:
            step_logits.append(logits.clone())
        token = chooser(generated, logits)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        generated = torch.cat([generated, token[:, None]], dim=1)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if bool(finished.all()) or step == max_new - 1:
            break
        h = parts.embed(token[:, None])
        valids = [torch.cat([v, ones], dim=1) for v in valids]
        if decode is not None:  # one group (the H2O cut evicted from every layer): extend its accumulated state
            decode.scores = torch.cat([decode.scores, torch.zeros(batch, 1, device=device)], dim=1)
            decode.prunable = torch.cat([decode.prunable, decode.prunable.any(dim=1, keepdim=True)], dim=1)
        q_new = None
        for (_, base, members), valid in zip(groups, valids):
            pos = (base + step)[:, None]
            pe = parts.rotary(h, pos)
            mask = decoder_mask(valid, 1, impl, dtype, parts.sliding_window)
            for i in members:
                if decode is not None and i == decode.layer:
                    q_new, _ = project_query_key(parts.layers[i], h, pe)
                h = _layer_call(parts.layers[i], h, mask, pos, cache, pe)
        if decode is not None:
            valid = valids[0]
            keys = cache.layers[decode.layer].keys
            decode.scores = decode.scores + attention_scores(q_new, keys, parts.layers[decode.layer].self_attn.scaling, valid, ones,
                                                             window=parts.sliding_window)
            for row in _evict_one_per_row(decode, valid):
                evicted[row] += 1
        logits = parts.lm_head(parts.norm(h))[:, -1].float()

    tokens = []
    for row in generated.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        tokens.append(row)
    final = done.final
    kept_positions = [final.orig[b][final.valid[b]] for b in range(batch)]
    return GenerationOutput(tokens, done.prompt_lengths, kept_positions, done.layer_lengths, evicted, step_logits, generated,
                            done.visual_per_layer, done.kept_positions, done.cut_ms)

"""In-LLM stage of the long-tail method: H2O-style heavy-hitter + recent-window pruning.

RE-IMPLEMENTATION, NO REFERENCE CODE. The paper ("Visual-Text Interactive Token Pruning") takes H2O
(Zhang et al. 2024) to the concatenated visual + text tokens: the importance of a token is the
attention it accumulates from the tokens after it; the last M tokens ("recent budget") are always
kept, N more ("heavy budget") by importance; "when the current number of tokens X > M + N, start
dropping", and that goes on while tokens are generated. Our readings (parameters of the `longtail`
method, defaults in brackets):

* Scores: at decoder layer `llm_layer` [0], softmax attention probabilities of that layer (its
  input_layernorm, q_proj, k_proj and rotary embedding applied to the layer's input; GQA-aware;
  causal; padding masked), summed over all query rows and averaged over heads: "the importance
  score of each token is the sum of its similarity scores with other tokens". We compute them from
  q / k ourselves, so the model keeps SDPA (or whatever it runs) and never switches to eager.
  `llm_layer=0` is "a second round of token pruning before feeding into LLM": layer 0's q/k on the
  embeddings, all layers then run on the kept tokens. `llm_layer=K>0`: K layers run on everything,
  the kept set is chosen from layer K's attention, and the pruned tokens are evicted from the KV
  cache of layers < K after prefill (H2O evicts from the cache), so every layer decodes over the
  same kept set (one set shared by all layers and heads, a simplification of H2O's per-layer sets).
* Budgets: heavy N = int(heavy_ratio * base) [0.5], recent M = max(1, int(recent_ratio * base))
  [0.5] (at least 1 so the last prompt token, which predicts the first answer token, stays).
  `budget_base` [visual] = the number of visual tokens the sample has after stage 1, so the
  visual + text span competes for as many slots as there are visual tokens (the text after the
  image costs visual tokens). "span" / "sequence" (H2O's own convention: ratios of the sequence
  length) prune nothing at prefill with 0.5 + 0.5.
* `exempt_system_prompt` [true]: the tokens before the first image (system prompt, "USER:") are
  never pruned and not counted in the budgets; the span from the first image token to the end
  (visual tokens, question, "ASSISTANT:") is what competes. Samples without images are not pruned.
* `decode_eviction` [true]: while generating, each new token joins the span (and accumulates the
  scores with its own attention at layer `llm_layer`); whenever the span holds more than M + N
  tokens, the lowest-scoring one outside the recent window is evicted from every layer's cache
  (masked out; the cache tensors are not compacted).

Positions and masks: kept tokens keep their original rotary positions (cumsum of the attention
mask - 1, exactly what `model.generate` uses with left padding); the i-th new token of sample b gets
position len_b + i, whatever was pruned. After pruning the kept tokens are re-packed left-padded;
causality in the packed order equals causality in the original order. Masks are explicit 4-D
masks (boolean for SDPA, additive for eager; None where SDPA can use is_causal, as transformers
does). Greedy and sampling (temperature / top_k / top_p / repetition_penalty, transformers' own
logits processors) are supported; beam search is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

MASKABLE_ATTENTION = ("sdpa", "eager")


# ----------------------------------------------------------------------------------------- model pieces
@dataclass
class DecoderParts:
    """The pieces of a Llama-style decoder that the loop calls directly."""

    embed: nn.Module
    layers: List[nn.Module]
    rotary: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    config: Any  # the text config
    attn_implementation: str


def decoder_parts(model: nn.Module) -> DecoderParts:
    """LlavaForConditionalGeneration -> its language model pieces; a clear error for anything else."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    head = getattr(model, "lm_head", None)
    needed = ("embed_tokens", "layers", "rotary_emb", "norm")
    if lm is None or head is None or not all(hasattr(lm, n) for n in needed):
        raise ValueError("the in-LLM pruning loop needs a LLaVA model with a Llama-style language model (embed_tokens, layers, rotary_emb, norm) and lm_head")
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl not in MASKABLE_ATTENTION:
        raise ValueError(
            f"the in-LLM pruning loop needs an attention implementation that takes 4-D masks ({', '.join(MASKABLE_ATTENTION)}); "
            f"the model runs {impl!r} (load it with attn_implementation=sdpa)"
        )
    return DecoderParts(lm.embed_tokens, list(lm.layers), lm.rotary_emb, lm.norm, head, lm.config, impl)


def decoder_mask(valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Causal + padding mask [B, 1, q_len, S] for queries in the last q_len of S slots.

    valid [B, S] bool marks real key slots. A query always sees its own slot (padded query rows
    stay finite; nobody reads them). SDPA gets a boolean mask, or None when nothing is masked
    beyond plain causality (what transformers does, so it can use is_causal); eager gets 0 / min.
    """
    s = valid.shape[1]
    if implementation == "sdpa" and bool(valid.all()) and (q_len == 1 or q_len == s):
        return None
    kv = torch.arange(s, device=valid.device)
    q_slot = kv[s - q_len:]
    allowed = valid[:, None, None, :] & (kv[None, None, None, :] <= q_slot[None, None, :, None])
    allowed = allowed | (kv[None, None, None, :] == q_slot[None, None, :, None])
    if implementation == "sdpa":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_query_key(layer: nn.Module, hidden: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """What `layer`'s attention computes as q and k from its input `hidden` [B, T, H]:
    input_layernorm -> q_proj / k_proj -> heads -> rotary. Returns q [B, Hq, T, d], k [B, Hkv, T, d]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ----------------------------------------------------------------------------------------- pure scoring
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
) -> torch.Tensor:
    """Accumulated causal attention received by each key, float32.

    q [B, Hq, Q, d] are the queries of the last Q of S key slots, k [B, Hkv, S, d] (GQA: repeated
    to Hq heads); key_valid [B, S], query_valid [B, Q]. Query rows are processed `chunk` at a time.
    """
    b, hq, nq, _ = q.shape
    s = k.shape[2]
    k = _repeat_kv(k, hq // k.shape[1]).float()
    kv = torch.arange(s, device=q.device)
    out = torch.zeros(b, s, dtype=torch.float32, device=q.device)
    for start in range(0, nq, chunk):
        qc = q[:, :, start:start + chunk].float()
        q_slot = kv[s - nq + start: s - nq + start + qc.shape[2]]
        allowed = key_valid[:, None, None, :] & (kv[None, None, None, :] <= q_slot[None, None, :, None])
        logits = torch.matmul(qc, k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # fully masked (padded) query rows
        out += accumulated_attention(probs, query_valid[:, start:start + chunk])
    return out


def h2o_budgets(base: int, heavy_ratio: float, recent_ratio: float) -> Tuple[int, int]:
    """(heavy N, recent M) for a budget base: N = int(heavy_ratio * base), M = max(1, int(recent_ratio * base))."""
    return int(heavy_ratio * base), max(1, int(recent_ratio * base))


def h2o_keep(
    scores: torch.Tensor,
    valid: torch.Tensor,
    prunable: torch.Tensor,
    heavy: Sequence[int],
    recent: Sequence[int],
) -> torch.Tensor:
    """Which slots survive [B, T] bool.

    Per row: the valid non-prunable slots always; of the prunable ones (in slot order), all when
    they are at most heavy + recent, else the last `recent` plus the `heavy` highest-scoring of
    the others (equal scores: the earlier slot wins).
    """
    keep = valid & ~prunable
    for row in range(scores.shape[0]):
        cand = torch.nonzero(valid[row] & prunable[row]).flatten()
        n, m, h = int(cand.numel()), int(recent[row]), int(heavy[row])
        if n <= h + m:
            keep[row, cand] = True
            continue
        keep[row, cand[n - m:]] = True
        rest = cand[: n - m]
        top = torch.sort(scores[row, rest], descending=True, stable=True).indices[:h]
        keep[row, rest[top]] = True
    return keep


def pack_left(keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """keep [B, T] bool -> (index [B, W], valid [B, W]): each row's kept slots in order, left-padded
    (padding slots index 0 and valid False), W = the largest kept count."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    for row, c in enumerate(counts.tolist()):
        index[row, width - c:] = torch.nonzero(keep[row]).flatten()
        valid[row, width - c:] = True
    return index, valid


def _gather_slots(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B, ..., S (at dim), ...], index [B, W] -> x with dim `dim` gathered to the W slots per row."""
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    return torch.gather(x, dim, index.view(view).expand(shape))


# ----------------------------------------------------------------------------------------- plan + state
@dataclass
class PrunePlan:
    """Where and how much the LLM stage prunes, per batch (budgets per sample)."""

    llm_layer: int
    prunable: torch.Tensor  # [B, T] bool, aligned with the left-padded prompt
    heavy: List[int]
    recent: List[int]
    decode_eviction: bool = True


@dataclass
class GenerationOutput:
    tokens: List[List[int]]  # new tokens per sample, up to and excluding EOS
    prompt_lengths: List[int]  # real prompt length per sample
    kept_positions: List[torch.Tensor]  # original prompt positions (0-based) still present after prefill
    layer_lengths: List[List[int]]  # per sample, sequence length each decoder layer processed at prefill
    evicted_in_decode: List[int] = field(default_factory=list)  # tokens evicted while generating
    step_logits: Optional[List[torch.Tensor]] = None  # [B, V] float32 per step, when asked (tests)
    sequences: Optional[torch.Tensor] = None  # [B, n] raw new tokens (EOS kept, padding after), like generate()


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
                f"longtail: num_beams={gen['num_beams']} is not supported; the in-LLM pruning loop decodes greedily or by "
                "sampling only (beam search would need per-beam kept sets and caches)"
            )

        def default(key: str, fallback: Any) -> Any:
            if gen.get(key) is not None:
                return gen[key]
            value = getattr(generation_config, key, None) if generation_config is not None else None
            return fallback if value is None else value

        self.do_sample = bool(gen.get("do_sample", False))
        processors = LogitsProcessorList()
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
        scores = self.processors(generated, logits)
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return torch.argmax(scores, dim=-1)


# ----------------------------------------------------------------------------------------- the loop
def _layer_call(layer: nn.Module, h: torch.Tensor, mask, position_ids, cache, position_embeddings) -> torch.Tensor:
    out = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def _evict_one_per_row(scores, valid, prunable, heavy, recent) -> List[int]:
    """Decode-time H2O step: rows whose prunable span exceeds heavy + recent lose their lowest-scoring
    slot outside the recent window (ties: the earlier slot). Returns the rows that evicted."""
    evicted = []
    for row in range(valid.shape[0]):
        cand = torch.nonzero(valid[row] & prunable[row]).flatten()
        n, m = int(cand.numel()), int(recent[row])
        if n <= int(heavy[row]) + m:
            continue
        rest = cand[: n - m]
        worst = torch.sort(scores[row, rest], descending=False, stable=True).indices[0]
        valid[row, rest[worst]] = False
        evicted.append(row)
    return evicted


@torch.inference_mode()
def generate_with_pruning(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: Optional[PrunePlan],
    gen: Dict[str, Any],
    eos_token_id: Optional[int],
    pad_token_id: int,
    score_chunk: int = 256,
    keep_logits: bool = False,
    on_step: Optional[Callable[[], None]] = None,
) -> GenerationOutput:
    """Prefill (with the H2O prune at `plan.llm_layer`) and decode over LLaVA's language model.

    plan=None prunes nothing (then the result is token-identical to `model.generate` on the same
    inputs_embeds / attention_mask). `on_step` is called once per step right after the forward pass
    (before the token is chosen), where generate() calls its logits processors (latency marks).
    """
    from transformers import DynamicCache

    parts = decoder_parts(model)
    chooser = TokenChooser(gen, getattr(model, "generation_config", None))
    max_new = int(gen.get("max_new_tokens", 20))
    impl, dtype = parts.attn_implementation, inputs_embeds.dtype
    num_layers = len(parts.layers)
    valid = attention_mask.bool()
    batch, width = valid.shape
    prompt_lengths = valid.sum(dim=1).tolist()
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    orig_slot = torch.arange(width, device=valid.device).expand(batch, -1)
    k_layer = num_layers if plan is None else plan.llm_layer
    if plan is not None and not 0 <= plan.llm_layer < num_layers:
        raise ValueError(f"longtail: llm_layer={plan.llm_layer} is outside the language model's layers 0..{num_layers - 1}")

    cache = DynamicCache(config=parts.config)
    h = inputs_embeds
    pe = parts.rotary(h, positions)
    mask = decoder_mask(valid, width, impl, dtype)
    for i in range(k_layer):
        h = _layer_call(parts.layers[i], h, mask, positions, cache, pe)

    scores = prunable = None
    if plan is not None:
        layer = parts.layers[k_layer]
        q, k = project_query_key(layer, h, pe)
        scores = attention_scores(q, k, layer.self_attn.scaling, valid, valid, chunk=score_chunk)
        prunable = plan.prunable.to(valid.device) & valid
        keep = h2o_keep(scores, valid, prunable, plan.heavy, plan.recent)
        if not bool(torch.equal(keep, valid)):
            index, new_valid = pack_left(keep)
            h = _gather_slots(h, index, 1)
            positions = torch.gather(positions, 1, index).masked_fill(~new_valid, 0)
            scores = torch.gather(scores, 1, index)
            prunable = torch.gather(prunable, 1, index) & new_valid
            orig_slot = torch.gather(orig_slot, 1, index)
            for i in range(k_layer):  # H2O eviction from the layers that saw everything
                lay = cache.layers[i]
                lay.keys = _gather_slots(lay.keys, index, 2)
                lay.values = _gather_slots(lay.values, index, 2)
            valid = new_valid
            pe = parts.rotary(h, positions)
            mask = decoder_mask(valid, valid.shape[1], impl, dtype)
        for i in range(k_layer, num_layers):
            h = _layer_call(parts.layers[i], h, mask, positions, cache, pe)

    kept_counts = valid.sum(dim=1).tolist()
    pads = [int(width - L) for L in prompt_lengths]
    kept_positions = [orig_slot[row][valid[row]] - pads[row] for row in range(batch)]
    layer_lengths = [[int(prompt_lengths[row])] * k_layer + [int(kept_counts[row])] * (num_layers - k_layer) for row in range(batch)]
    logits = parts.lm_head(parts.norm(h[:, -1:]))[:, -1].float()

    evicting = plan is not None and plan.decode_eviction
    rows_prune = prunable.any(dim=1) if plan is not None else None
    evicted = [0] * batch
    next_pos = torch.tensor(prompt_lengths, device=valid.device, dtype=torch.long)
    generated = torch.zeros(batch, 0, dtype=torch.long, device=valid.device)
    done = torch.zeros(batch, dtype=torch.bool, device=valid.device)
    step_logits: Optional[List[torch.Tensor]] = [] if keep_logits else None
    for step in range(max_new):
        if on_step is not None:
            on_step()
        if step_logits is not None:
            step_logits.append(logits.clone())
        token = chooser(generated, logits)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        generated = torch.cat([generated, token[:, None]], dim=1)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if bool(done.all()) or step == max_new - 1:
            break
        h = parts.embed(token[:, None])
        pos = next_pos[:, None]
        pe = parts.rotary(h, pos)
        valid = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool, device=valid.device)], dim=1)
        mask = decoder_mask(valid, 1, impl, dtype)
        q_new = None
        for i, layer in enumerate(parts.layers):
            if evicting and i == k_layer:
                q_new, _ = project_query_key(layer, h, pe)
            h = _layer_call(layer, h, mask, pos, cache, pe)
        if evicting:
            keys = cache.layers[k_layer].keys
            step_scores = attention_scores(q_new, keys, parts.layers[k_layer].self_attn.scaling, valid, torch.ones(batch, 1, dtype=torch.bool, device=valid.device))
            scores = torch.cat([scores, torch.zeros(batch, 1, device=scores.device)], dim=1) + step_scores
            prunable = torch.cat([prunable, rows_prune[:, None]], dim=1)
            for row in _evict_one_per_row(scores, valid, prunable, plan.heavy, plan.recent):
                evicted[row] += 1
        next_pos = next_pos + 1
        logits = parts.lm_head(parts.norm(h))[:, -1].float()

    tokens = []
    for row in generated.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        tokens.append(row)
    return GenerationOutput(tokens, [int(x) for x in prompt_lengths], kept_positions, layer_lengths, evicted, step_logits, generated)

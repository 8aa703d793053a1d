"""Build the LLM's input embeddings with a different number of visual tokens per sample.

Each `<image>` placeholder of a prompt is expanded to exactly as many image-token ids as its
image has tokens (compressed patches, and layout tokens such as NeXT's newlines); rows are
left-padded (what decoder-only generation needs); the projected features are scattered into the
image positions in order. Layout slots are marked apart from the visual (patch-derived) slots.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .batch import ImageTokens, LLMInputs


def expand_image_tokens(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> List[int]:
    """Replace the i-th image token of `ids` by counts[i] copies of it."""
    positions = [p for p, t in enumerate(ids) if t == image_token_id]
    if len(positions) != len(counts):
        raise ValueError(f"prompt has {len(positions)} image tokens but {len(counts)} images were given")
    out: List[int] = []
    start = 0
    for pos, n in zip(positions, counts):
        out.extend(ids[start:pos])
        out.extend([image_token_id] * int(n))
        start = pos + 1
    out.extend(ids[start:])
    return out


def build_llm_inputs(
    embed_tokens: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    image_token_id: int,
    pad_token_id: int,
    image_tokens: Sequence[Sequence[ImageTokens]],
) -> LLMInputs:
    """prompt_ids[b]: token ids with one image token per image; image_tokens[b][i]: that image's tokens for the LLM
    ([M_i, H] features, and which of them are layout tokens)."""
    rows = [
        expand_image_tokens(ids, image_token_id, [t.features.shape[0] for t in images])
        for ids, images in zip(prompt_ids, image_tokens)
    ]
    lengths = [len(r) for r in rows]
    width = max(lengths)
    device = embed_tokens.weight.device
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeds = embed_tokens(ids)
    image_mask = (ids == image_token_id) & mask.bool()
    flat = [t.features for images in image_tokens for t in images]
    if flat:
        feats = torch.cat(flat, dim=0).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), feats)
    layout_mask = None
    if any(t.layout is not None and bool(t.layout.any()) for images in image_tokens for t in images):
        flags = torch.cat([t.layout if t.layout is not None else torch.zeros(t.features.shape[0], dtype=torch.bool)
                           for images in image_tokens for t in images]).to(device)
        layout_mask = torch.zeros_like(image_mask)
        layout_mask[image_mask] = flags
        image_mask = image_mask & ~layout_mask
    return LLMInputs(inputs_embeds=embeds, attention_mask=mask, image_mask=image_mask, lengths=lengths, layout_mask=layout_mask,
                     image_tokens=[[t.image_tokens_in for t in images] for images in image_tokens])

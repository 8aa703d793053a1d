"""Build the LLM's input embeddings with a different number of visual tokens per sample.

Each `<image>` placeholder of a prompt is expanded to exactly as many image-token ids as its
compressed image has tokens; rows are left-padded (what decoder-only generation needs); the
projected features are scattered into the image positions in order.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .batch import LLMInputs


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
    image_features: Sequence[Sequence[torch.Tensor]],
) -> LLMInputs:
    """prompt_ids[b]: token ids with one image token per image; image_features[b][i]: [M_i, H]."""
    rows = [
        expand_image_tokens(ids, image_token_id, [f.shape[0] for f in feats])
        for ids, feats in zip(prompt_ids, image_features)
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
    flat = [f for feats in image_features for f in feats]
    if flat:
        feats = torch.cat(flat, dim=0).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), feats)
    return LLMInputs(inputs_embeds=embeds, attention_mask=mask, image_mask=image_mask, lengths=lengths)

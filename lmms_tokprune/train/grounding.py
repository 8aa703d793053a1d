"""Grounding losses of the demo LLaVA stage: where the answer should look, and what an object token says.

Why: a small Llama trained from scratch on answer tokens only stays at the answer prior for thousands of
steps. Measured on CPU-sized runs (notes of issue 5): with perfect one-hot object features it still
answered attribute and existence questions at chance after 1000 steps, and even the text-only version of
the task ("there is a red star ... What colour is the star?") was not learned in 4800 steps. The missing
piece is the two-hop circuit (read the question, then find the named object among 576 tokens) that a
pretrained LLM brings to LLaVA. Two auxiliary losses supervise it directly, from the scene's ground truth:

- ``attention``: at the position that predicts each answer, some head of layers 1.. puts its attention on
  the image tokens of the objects the question is about (``-log`` of the best head's mass, per layer);
- ``readout``: the LLM's output at an object's image tokens predicts that object's words (colour and
  shape, or the written word) through ``lm_head``, so an attended object token already "says" its answer.

Both are training-only; the checkpoint is a standard LlavaForConditionalGeneration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..shapes.generator import Obj, box_patches


@dataclass
class GroundedRow:
    """One training conversation: token ids, labels, and where its answers should look."""

    ids: List[int]
    labels: List[int]
    # (index of the position that predicts the answer, indices of the image tokens it should attend to)
    targets: List[Tuple[int, List[int]]] = field(default_factory=list)
    # (index of an image token, token id of a word it should read out as)
    readouts: List[Tuple[int, int]] = field(default_factory=list)


def object_words(objects: Sequence[Obj], word_id: Callable[[str], int]) -> Dict[int, List[int]]:
    """{patch: [word ids]}: colour and shape of a shape, the word itself of a text object."""
    out: Dict[int, List[int]] = {}
    for o in objects:
        words = [o.word] if o.kind == "text" else [o.colour, o.kind]
        for p in box_patches(o):
            out[p] = [word_id(w) for w in words]
    return out


def attention_loss(rows: Dict[int, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Mean over layers of ``-log`` (best head's attention mass on the target tokens), averaged over queries.

    ``rows[layer]``: [N, H, T] attention of the N answer positions; ``masks``: [N, T] 1 on their targets.
    The best head (not all heads) is pushed, so the other heads stay free for everything else.
    """
    terms = [-(r * masks[:, None, :]).sum(-1).amax(-1).clamp_min(1e-6).log().mean() for r in rows.values()]
    return torch.stack(terms).mean()


def readout_loss(lm_head, hidden: torch.Tensor, readouts: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
    """Cross-entropy of ``lm_head`` at object image tokens against their words; ``readouts``: (row, index, word id)."""
    b, t, w = (torch.tensor(v, device=hidden.device) for v in zip(*readouts))
    logp = lm_head(hidden[b, t]).log_softmax(-1)
    return -logp.gather(1, w[:, None]).mean()

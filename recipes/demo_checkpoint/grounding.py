"""Grounding losses of the demo LLaVA stage: where the answer should look, and what an object token says.

Why: a small Llama trained from scratch on answer tokens only stays at the answer prior for thousands of
steps. Measured on CPU-sized runs (notes of issue 5): with perfect one-hot object features it still
answered attribute and existence questions at chance after 1000 steps, and even the text-only version of
the task ("there is a red star ... What colour is the star?") was not learned in 4800 steps. The missing
piece is the two-hop circuit (read the question, then find the named object among 576 tokens) that a
pretrained LLM brings to LLaVA. Two auxiliary losses supervise it directly, from the scene's ground truth:

- ``attention``: at the position that predicts each answer, head 0 of layers 1.. puts its attention on
  the image tokens of the objects the question is about (``-log`` of head 0's mass, per layer). A
  relation question names two objects: heads 0 and 1 take one each (so the answer position sees which
  object is where, not their blend). A question about nothing in the image (existence "no",
  counting "0") attends to the attention sink, ``<s>``: "no match" then reads as a distinct value.
- ``readout``: every layer's output at an object's image tokens predicts that object's words (colour and
  shape, or the written word) through the final norm and ``lm_head``, so the value an answer head fetches
  from an object token at any layer already "says" its answer.
- ``comparison`` (relation questions): the middle layers' output at the answer position predicts the
  answer to the *canonical* question "is the first object left of / above the second?" ("yes"/"no",
  :func:`canonical_relation`); the last layer then only has to flip it for "right of" / "below". Why:
  after heads 0 and 1 fetched the two objects, the answer is an XOR of their order and the question's
  wording, and with the answer loss alone relation stayed at chance for 4000 steps (issue 5).
- ``query`` (attribute, counting, existence): the answer position's outputs of the layers before the answer
  layer predict the colour and shape words the question names (:func:`asked_words`) -- the query side of
  the head-0 lookup, as ``readout`` is its key side. Why: after stage 2 the asked colour was linearly
  decodable from the answer position at 0.66 only (6 colours; logistic probe, issue 5 notes), and every
  attribute and existence miss on the test split was a colour confusion (a red or orange star found for
  "a green star?", the yellow object for "the green object").

Measured (issue 5): with the first version (one best head on the union of the objects, sink-less, readout
at the last layer only) the best head put 0.95 of its attention on the right object in right *and* wrong
answers alike; the misses were in turning the fetched value into the answer, and existence/relation stayed
at chance.

Both are training-only; the checkpoint is a standard LlavaForConditionalGeneration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..shapes_vqa.generator import COLOURS, PLURALS, SHAPES, Obj, box_patches

SINK = ()  # the empty object group: attend to the attention sink (<s>)


def attention_groups(question) -> Tuple[Tuple[Obj, ...], ...]:
    """The object groups the answer to ``question`` (a shapes ``Question``) should attend to, one head each."""
    if not question.about:
        return (SINK,)
    if question.family == "relation":
        return tuple((o,) for o in question.about)
    return (tuple(question.about),)


def canonical_relation(question) -> Optional[str]:
    """"yes"/"no": is ``question``'s first object left of (horizontal question) / above (vertical) its second;
    None for other families. The axis is read from the wording ("left"/"right" = horizontal)."""
    if question.family != "relation" or len(question.about) != 2:
        return None
    first, second = question.about
    horizontal = " left of " in question.question or " right of " in question.question
    k = 0 if horizontal else 1
    return "yes" if first.centre[k] < second.centre[k] else "no"


_SINGULAR = {PLURALS[s]: s for s in SHAPES}
QUERY_FAMILIES = ("attribute", "counting", "existence")


def asked_words(question) -> Tuple[str, ...]:
    """The colour and shape words (plurals made singular) an attribute / counting / existence question names:
    what its answer position looks for. Relation questions name two objects for two heads, reading none: ()."""
    if question.family not in QUERY_FAMILIES:
        return ()
    words = [_SINGULAR.get(w, w) for w in question.question.lower().rstrip("?").split()]
    return tuple(w for w in words if w in COLOURS or w in SHAPES)


@dataclass
class GroundedRow:
    """One training conversation: token ids, labels, and where its answers should look."""

    ids: List[int]
    labels: List[int]
    # (index of the position that predicts the answer, [token indices one head should attend to, per head])
    targets: List[Tuple[int, List[List[int]]]] = field(default_factory=list)
    # (index of an image token, token id of a word it should read out as)
    readouts: List[Tuple[int, int]] = field(default_factory=list)
    # (index of the position that predicts a relation answer, token id of its canonical_relation word)
    comparisons: List[Tuple[int, int]] = field(default_factory=list)
    # (index of the position that predicts an answer, token id of a word its question names: asked_words)
    asked: List[Tuple[int, int]] = field(default_factory=list)


def object_words(objects: Sequence[Obj], word_id: Callable[[str], int]) -> Dict[int, List[int]]:
    """{patch: [word ids]}: colour and shape of a shape, the word itself of a text object."""
    out: Dict[int, List[int]] = {}
    for o in objects:
        words = [o.word] if o.kind == "text" else [o.colour, o.kind]
        for p in box_patches(o):
            out[p] = [word_id(w) for w in words]
    return out


def attention_loss(rows: Dict[int, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Mean over layers, queries and target groups of ``-log`` (attention mass of head ``g`` on group ``g``).

    ``rows[layer]``: [N, H, T] attention of the N answer positions; ``masks``: [N, T] (one target group) or
    [N, G, T] with G <= H groups (an all-zero group = none). Heads G.. stay free for everything else.

    Why fixed heads, not the best head per query: with "the best head" an idle head that rests on ``<s>``
    satisfied every sink target for free, the head that found the object in "yes" questions was another one,
    and the answer never saw the difference (existence "yes" 0/100 on val, issue 5 notes). One head per role
    makes its output *the* signal: object value = found, ``<s>`` value = not there.
    """
    if masks.dim() == 2:
        masks = masks[:, None]
    groups = masks.shape[1]
    valid = masks.any(-1).float()  # [N, G]
    terms = []
    for r in rows.values():
        if groups > r.shape[1]:
            raise ValueError(f"attention_loss: {groups} target groups but only {r.shape[1]} heads")
        mass = (r[:, :groups] * masks).sum(-1)  # [N, G]: head g on group g
        terms.append(-(mass.clamp_min(1e-6).log() * valid).sum() / valid.sum())
    return torch.stack(terms).mean()


def readout_loss(lm_head, norm, hiddens: Sequence[torch.Tensor], readouts: Sequence[Tuple[int, int, int]]) -> torch.Tensor:
    """Cross-entropy of ``lm_head(norm(h))`` at object image tokens against their words, mean over the layer
    outputs ``hiddens``; ``readouts``: (row, index, word id)."""
    b, t, w = (torch.tensor(v, device=hiddens[0].device) for v in zip(*readouts))
    terms = [-lm_head(norm(h[b, t])).log_softmax(-1).gather(1, w[:, None]).mean() for h in hiddens]
    return torch.stack(terms).mean()

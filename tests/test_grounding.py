"""Grounding losses of the demo LLaVA stage: the attention rows they read, and the targets they point at."""

from __future__ import annotations

import random

import pytest
import torch

from lmms_tokprune.shapes import sample_scene, scene_questions
from lmms_tokprune.shapes.generator import box_patches
from lmms_tokprune.train.grounding import attention_loss, object_words


def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaModel(cfg).eval()


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_attention_rows_equal_eager_attention(explicit_positions):
    from lmms_tokprune.train.attention_rows import AttentionRows

    model = _tiny_llama()
    ids = torch.randint(0, 50, (3, 20))
    att = torch.ones(3, 20, dtype=torch.long)
    att[1, 15:] = 0  # right padding
    att[2, 10:] = 0
    kwargs = {"input_ids": ids, "attention_mask": att}
    if explicit_positions:  # gaps, as when image tokens are dropped
        pos = torch.arange(20)[None].repeat(3, 1)
        pos[0, 5:] += 7
        kwargs["position_ids"] = pos
    rows_b, rows_q = torch.tensor([0, 1, 2, 0]), torch.tensor([19, 14, 9, 3])
    with AttentionRows(model, [0, 2], rows_b, rows_q) as captured:
        fast = model(**kwargs).last_hidden_state
    model.set_attn_implementation("eager")
    ref = model(**kwargs, output_attentions=True)
    torch.testing.assert_close(fast, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    for layer in (0, 2):
        torch.testing.assert_close(captured.rows[layer], ref.attentions[layer][rows_b, :, rows_q, :], atol=1e-6, rtol=1e-5)
    assert captured.rows[0][3, :, 4:].abs().max() == 0  # causal: nothing after the query


def test_attention_loss_pushes_only_the_best_head():
    rows = torch.full((1, 2, 4), 0.25)
    rows[0, 1] = torch.tensor([0.1, 0.7, 0.1, 0.1])  # head 1 looks at the target
    masks = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    loss = attention_loss({1: rows}, masks)
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.7)).item(), rel=1e-5)


def test_grounded_rows_point_at_the_named_objects_image_tokens():
    from lmms_tokprune.testing.tiny import NUM_PATCHES
    from lmms_tokprune.train.common import llama_tokenizer
    from lmms_tokprune.train.llava_train import Conversations

    tok = llama_tokenizer()
    conv = Conversations(tok)
    scene = next(s for s in (sample_scene("train", i) for i in range(50)) if len(s.shapes) >= 3 and s.text is not None)
    qs = scene_questions(scene, random.Random(0), per_family=2)
    turns = [(q.question, q.answer, "\nAnswer the question using a single word or phrase.", q.about) for q in qs]
    word_id = lambda w: conv._ids(w)[0]  # noqa: E731
    row = conv.build_grounded(turns, scene.objects, word_id)
    assert (row.ids, row.labels) == conv.build([t[:3] for t in turns])
    image_start = row.ids.index(conv.image_id)
    about = [q.about for q in qs if q.about]
    assert len(row.targets) == len(about)
    for (query, targets), objs in zip(row.targets, about):
        assert row.labels[query] == -100 and row.labels[query + 1] != -100  # the position that predicts the answer
        assert sorted(targets) == sorted(image_start + p for o in objs for p in box_patches(o))
        assert all(row.ids[t] == conv.image_id for t in targets)
    words = object_words(scene.objects, word_id)
    assert len(row.readouts) == sum(len(w) for w in words.values())
    for index, word in row.readouts:
        assert image_start <= index < image_start + NUM_PATCHES
        assert word in words[index - image_start]
    first = scene.shapes[0]
    assert word_id(first.colour) in words[box_patches(first)[0]]


def test_box_patches_hold_every_patch_the_shape_covers():
    from lmms_tokprune.shapes.generator import patch_coverage

    for i in range(20):
        for o in sample_scene("train", i).shapes:
            assert {p for p, _ in patch_coverage(o)} <= set(box_patches(o))


def test_every_question_but_a_negative_names_its_objects():
    for i in range(30):
        scene = sample_scene("train", i)
        for q in scene_questions(scene, random.Random(i), per_family=3):
            if q.family == "existence" and q.answer == "no" or q.family == "counting" and q.answer == "0":
                assert q.about == ()
            else:
                assert q.about, q
                assert all(o in scene.objects for o in q.about)

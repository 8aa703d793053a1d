"""Grounding losses of the demo LLaVA stage: the attention rows they read, and the targets they point at."""

from __future__ import annotations

import random

import pytest
import torch

from recipes.demo_checkpoint.grounding import SINK, attention_groups, attention_loss, object_words, readout_loss
from recipes.shapes_vqa import sample_scene, scene_questions
from recipes.shapes_vqa.generator import box_patches


def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaModel(cfg).eval()


def _tiny_llava():
    """(LLaVA with a 3-layer Llama, its tokenizer, Conversations): enough layers for first / middle / answer."""
    from transformers import CLIPConfig, CLIPModel

    from recipes.demo_checkpoint.common import Sizes, llama_tokenizer, vision_config
    from recipes.demo_checkpoint.llava_train import Conversations, build_llava

    sizes = Sizes(vit_width=32, vit_layers=1, vit_heads=2, llm_width=32, llm_layers=3, llm_heads=2, llm_intermediate=64)
    tok = llama_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=vision_config(sizes), text_config={"hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=16))
    return build_llava(sizes, tok, clip), tok, Conversations(tok)


def _layer_outputs(model, row, feats, image_id: int, pad_id: int):
    """(every decoder layer's output for one grounded row, the language model)."""
    from recipes.demo_checkpoint.llava_train import LayerOutputs, _batch, _embed

    ids, labels, att = _batch([(row.ids, row.labels)], pad_id)
    lm = model.model.language_model
    with torch.no_grad(), LayerOutputs(lm) as outs:
        lm(inputs_embeds=_embed(model, ids, feats, image_id), attention_mask=att)
    return outs.outputs, lm


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_attention_rows_equal_eager_attention(explicit_positions):
    from recipes.demo_checkpoint.attention_rows import AttentionRows

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


def test_attention_loss_supervises_head_g_on_group_g():
    rows = torch.full((2, 3, 4), 0.25)
    rows[0, 0] = torch.tensor([0.1, 0.8, 0.05, 0.05])  # head 0 of query 0 on token 1
    rows[0, 1] = torch.tensor([0.1, 0.2, 0.6, 0.1])  # head 1 of query 0 on token 2
    rows[0, 2] = torch.tensor([0.1, 0.1, 0.7, 0.1])  # head 2 is free: ignored
    masks = torch.zeros(2, 2, 4)
    masks[0, 0, 1] = 1.0  # group 0 of query 0: token 1 -> head 0
    masks[0, 1, 2] = 1.0  # group 1 of query 0: token 2 -> head 1
    masks[1, 0, 3] = 1.0  # query 1: one group only (its all-zero second group does not count)
    logs = torch.tensor([0.8, 0.6, 0.25]).log()
    second = rows.clone()
    second[1, 0] = torch.tensor([0.1, 0.1, 0.1, 0.7])
    assert attention_loss({1: rows}, masks).item() == pytest.approx(-logs.mean().item(), rel=1e-5)
    # mean over layers; [N, T] masks = one group
    assert attention_loss({1: rows, 2: second}, masks).item() == pytest.approx(
        0.5 * (-logs.mean() - (logs[0] + logs[1] + torch.tensor(0.7).log()) / 3).item(), rel=1e-5)
    assert attention_loss({1: rows[1:]}, masks[1:, 0]).item() == pytest.approx(-logs[2].item(), rel=1e-5)
    with pytest.raises(ValueError, match="4 target groups but only 3 heads"):
        attention_loss({1: rows}, torch.ones(2, 4, 4))


def test_readout_loss_averages_the_layers_through_the_norm():
    torch.manual_seed(0)
    head, norm = torch.nn.Linear(8, 5, bias=False), torch.nn.LayerNorm(8)
    hiddens = [torch.randn(2, 6, 8) for _ in range(3)]
    readouts = [(0, 1, 3), (1, 4, 2)]
    ce = [torch.nn.functional.cross_entropy(head(norm(h[[0, 1], [1, 4]])), torch.tensor([3, 2])) for h in hiddens]
    assert readout_loss(head, norm, hiddens, readouts).item() == pytest.approx(torch.stack(ce).mean().item(), rel=1e-5)


def test_attention_groups():
    scene = next(s for s in (sample_scene("train", i) for i in range(80)) if len(s.shapes) >= 3)
    for q in scene_questions(scene, random.Random(1), per_family=3):
        groups = attention_groups(q)
        if not q.about:
            assert groups == (SINK,)
        elif q.family == "relation":
            assert groups == tuple((o,) for o in q.about) and len(groups) == 2
        else:
            assert groups == (tuple(q.about),)


def test_grounded_rows_point_at_the_named_objects_image_tokens():
    from lmms_tokprune.testing.tiny import NUM_PATCHES
    from recipes.demo_checkpoint.common import llama_tokenizer
    from recipes.demo_checkpoint.llava_train import Conversations

    tok = llama_tokenizer()
    conv = Conversations(tok)
    scene = next(s for s in (sample_scene("train", i) for i in range(50)) if len(s.shapes) >= 3 and s.text is not None)
    qs = scene_questions(scene, random.Random(0), per_family=2)
    turns = [(q.question, q.answer, "\nAnswer the question using a single word or phrase.", attention_groups(q)) for q in qs]
    word_id = lambda w: conv._ids(w)[0]  # noqa: E731
    row = conv.build_grounded(turns, scene.objects, word_id)
    assert (row.ids, row.labels) == conv.build([t[:3] for t in turns])
    image_start = row.ids.index(conv.image_id)
    assert len(row.targets) == len(qs)
    assert any(q.family == "relation" for q in qs) and any(not q.about for q in qs)  # both special cases are covered
    for (query, groups), q in zip(row.targets, qs):
        assert row.labels[query] == -100 and row.labels[query + 1] != -100  # the position that predicts the answer
        if not q.about:  # nothing to look at: the sink
            assert groups == [[0]] and row.ids[0] == tok.bos_token_id
            continue
        objs = [(o,) for o in q.about] if q.family == "relation" else [q.about]
        assert len(groups) == len(objs)
        for tokens, group in zip(groups, objs):
            assert sorted(tokens) == sorted(image_start + p for o in group for p in box_patches(o))
            assert all(row.ids[t] == conv.image_id for t in tokens)
    words = object_words(scene.objects, word_id)
    assert len(row.readouts) == sum(len(w) for w in words.values())
    for index, word in row.readouts:
        assert image_start <= index < image_start + NUM_PATCHES
        assert word in words[index - image_start]
    first = scene.shapes[0]
    assert word_id(first.colour) in words[box_patches(first)[0]]


def test_box_patches_hold_every_patch_the_shape_covers():
    from recipes.shapes_vqa.generator import patch_coverage

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


def test_canonical_relation_answers_left_of_or_above_whatever_the_wording():
    from recipes.demo_checkpoint.grounding import canonical_relation

    seen = set()
    for i in range(40):
        scene = sample_scene("train", i)
        for q in scene_questions(scene, random.Random(i), per_family=4):
            word = canonical_relation(q)
            if q.family != "relation":
                assert word is None
                continue
            first, second = q.about
            horizontal = "left of" in q.question or "right of" in q.question
            k = 0 if horizontal else 1
            assert word == ("yes" if first.centre[k] < second.centre[k] else "no")
            # the question's own answer is the canonical one, flipped for "right of" / "below"
            flipped = "right of" in q.question or "below" in q.question
            assert q.answer == (word if not flipped else {"yes": "no", "no": "yes"}[word])
            seen.add((horizontal, flipped, word))
    assert len(seen) == 8  # both axes, both wordings, both orders


def test_grounded_rows_carry_the_comparison_at_the_answer_position():
    from recipes.demo_checkpoint.common import llama_tokenizer
    from recipes.demo_checkpoint.grounding import canonical_relation
    from recipes.demo_checkpoint.llava_train import Conversations

    conv = Conversations(llama_tokenizer())
    scene = next(s for s in (sample_scene("train", i) for i in range(50))
                 if any(q.family == "relation" for q in scene_questions(s, random.Random(0), per_family=2)))
    qs = scene_questions(scene, random.Random(0), per_family=2)
    turns = [(q.question, q.answer, "\nAnswer the question using a single word or phrase.", attention_groups(q), canonical_relation(q))
             for q in qs]
    row = conv.build_grounded(turns)
    relation = [(t, q) for (t, _), q in zip(row.targets, qs) if q.family == "relation"]
    assert [t for t, _ in row.comparisons] == [t for t, _ in relation]
    assert [w for _, w in row.comparisons] == [conv._ids(canonical_relation(q))[0] for _, q in relation]


def test_grounded_step_adds_the_comparison_loss_of_the_middle_layers():
    """compare = cross-entropy of the middle layers' logit lens at the relation answer positions; 0 weight = off."""
    from recipes.demo_checkpoint.grounding import canonical_relation
    from recipes.demo_checkpoint.llava_train import _grounded_step

    model, tok, conv = _tiny_llava()
    scene = next(s for s in (sample_scene("train", i) for i in range(50))
                 if any(q.family == "relation" for q in scene_questions(s, random.Random(0), per_family=2)))
    qs = scene_questions(scene, random.Random(0), per_family=2)
    turns = [(q.question, q.answer, "\nAnswer the question using a single word or phrase.", attention_groups(q), canonical_relation(q))
             for q in qs]
    rows = [conv.build_grounded(turns)]
    feats = torch.randn(1, 576, 32)
    _, parts = _grounded_step(model, rows, feats, conv.image_id, tok.pad_token_id, 0.0, 0.0, 1.0)
    outs, lm = _layer_outputs(model, rows[0], feats, conv.image_id, tok.pad_token_id)
    t = torch.tensor([i for i, _ in rows[0].comparisons])
    w = torch.tensor([x for _, x in rows[0].comparisons])
    middle = outs[1]  # 3 layers: the one after the grounded heads' first layer, before the answer layer
    want = -model.lm_head(lm.norm(middle[0, t])).log_softmax(-1).gather(1, w[:, None]).mean()
    assert parts["compare"] == pytest.approx(want.item(), rel=1e-4)
    _, off = _grounded_step(model, rows, feats, conv.image_id, tok.pad_token_id, 0.0, 0.0, 0.0)
    assert "compare" not in off


def test_asked_words_are_the_colour_and_shape_a_question_names():
    from recipes.demo_checkpoint.grounding import asked_words
    from recipes.shapes_vqa.generator import Question

    def q(family: str, text: str) -> Question:
        return Question(family, text, "x", ())

    assert asked_words(q("attribute", "What colour is the star?")) == ("star",)
    assert asked_words(q("attribute", "What shape is the green object?")) == ("green",)
    assert asked_words(q("counting", "How many diamonds are there?")) == ("diamond",)
    assert asked_words(q("counting", "How many orange objects are there?")) == ("orange",)
    assert asked_words(q("counting", "How many shapes are there?")) == ()
    assert asked_words(q("existence", "Is there an orange triangle in the image?")) == ("orange", "triangle")
    assert asked_words(q("relation", "Is the red star above the blue circle?")) == ()  # two objects, two heads
    assert asked_words(q("reading", "What word is written in the image?")) == ()


def test_grounded_step_adds_the_query_loss_of_the_layers_before_the_answer():
    """query = cross-entropy of the logit lens of every layer but the last at each answer position against the
    words its question names; rows carry them at the answer positions; 0 weight = off."""
    from recipes.demo_checkpoint.grounding import asked_words
    from recipes.demo_checkpoint.llava_train import _grounded_step

    model, tok, conv = _tiny_llava()
    scene = sample_scene("train", 3)
    qs = scene_questions(scene, random.Random(0), per_family=2)
    turns = [(q.question, q.answer, "\nAnswer the question using a single word or phrase.", attention_groups(q), None,
              asked_words(q)) for q in qs]
    row = conv.build_grounded(turns)
    answer_pos = {q.question: t for (t, _), q in zip(row.targets, qs)}
    want_pairs = [(answer_pos[q.question], conv._ids(w)[0]) for q in qs for w in asked_words(q)]
    assert row.asked == want_pairs and len({t for t, _ in want_pairs}) >= 3
    feats = torch.randn(1, 576, 32)
    _, parts = _grounded_step(model, [row], feats, conv.image_id, tok.pad_token_id, 0.0, 0.0, 0.0, 1.0)
    outs, lm = _layer_outputs(model, row, feats, conv.image_id, tok.pad_token_id)
    t = torch.tensor([i for i, _ in row.asked])
    w = torch.tensor([x for _, x in row.asked])
    want = torch.stack([-model.lm_head(lm.norm(h[0, t])).log_softmax(-1).gather(1, w[:, None]).mean() for h in outs[:2]]).mean()
    assert parts["query"] == pytest.approx(want.item(), rel=1e-4)
    _, off = _grounded_step(model, [row], feats, conv.image_id, tok.pad_token_id, 0.0, 0.0, 0.0, 0.0)
    assert "query" not in off

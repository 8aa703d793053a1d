"""The demo-checkpoint recipe (`lmms-tokprune train-demo`): its pieces, and the whole command at toy length."""

from __future__ import annotations

import json

import pytest
import torch

from recipes.shapes_vqa import render, sample_scene
from recipes.shapes_vqa.generator import COLOURS, SHAPES, patch_coverage


def test_patch_coverage_matches_the_rendered_pixels():
    """Coverage comes from the renderer's own geometry: a patch the mask calls full is the object's colour."""
    import numpy as np

    for i in range(6):
        scene = sample_scene("train", i)
        im = np.asarray(render(scene)).astype(int)
        for o in scene.shapes:
            cov = dict(patch_coverage(o))
            assert all(0 < c <= 1 for c in cov.values())
            for p, c in cov.items():
                r, col = divmod(p, 24)
                x0, y0, x1, y1 = o.box
                assert x0 // 14 <= col <= (x1 - 1) // 14 and y0 // 14 <= r <= (y1 - 1) // 14
                if c == 1.0:  # every pixel of the patch is the object's colour (+- the render jitter)
                    cell = im[r * 14:(r + 1) * 14, col * 14:(col + 1) * 14]
                    assert np.abs(cell - np.array(COLOURS[o.colour])).max() <= 12
    with pytest.raises(ValueError, match="text"):
        patch_coverage(next(o for i in range(20) for o in sample_scene("train", i).objects if o.kind == "text"))


def test_shapes_sit_on_the_patch_grid():
    for i in range(50):
        for o in sample_scene("train", i).shapes:
            x0, y0, x1, y1 = o.box
            assert x0 % 14 == y0 % 14 == x1 % 14 == y1 % 14 == 0


def test_patch_targets_label_every_covered_patch_and_follow_flip():
    from recipes.demo_checkpoint.clip_pretrain import SHAPE_PHRASES, keep_targets, patch_targets

    scenes = [sample_scene("train", i) for i in range(4)]
    rows, words = patch_targets(scenes)
    for b, p, y in rows:
        assert SHAPE_PHRASES[y].split()[-2:] in ([o.colour, o.kind] for o in scenes[b].shapes)
    assert {b for b, _, _ in rows} == {b for b, s in enumerate(scenes) if s.shapes}
    assert len(words) == sum(s.text is not None for s in scenes)
    # FLIP: keep half the patches; targets move to the kept positions and dropped patches vanish
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(4, 576, generator=g).argsort(1)[:, :288].sort(1).values
    kept_rows, kept_words = keep_targets((rows, words), idx)
    expected = [(b, int((idx[b] == p).nonzero()), y) for b, p, y in rows if (idx[b] == p).any()]
    assert kept_rows == expected
    assert all(bool((k < 288).all()) for _, k, _ in kept_words)
    assert len(SHAPE_PHRASES) == len(COLOURS) * len(SHAPES)


def test_whitened_projector_sees_standardised_features():
    from recipes.demo_checkpoint.llava_train import whiten_projector_input

    torch.manual_seed(0)
    feats = 20 + 3 * torch.randn(8, 576, 16) * torch.linspace(0.1, 2, 16)
    lin = torch.nn.Linear(16, 4)
    ref = torch.nn.Linear(16, 4)
    ref.load_state_dict(lin.state_dict())
    proj = torch.nn.Module()
    proj.linear_1 = lin
    whiten_projector_input(proj, feats)
    x = feats.reshape(-1, 16)
    z = (x - x.mean(0)) / x.std(0)
    torch.testing.assert_close(lin(x), ref(z), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_train_demo_end_to_end_at_toy_length(tmp_path):
    """The real command, a few steps per stage: standard checkpoints that load, share the ViT, and log a recipe."""
    from transformers import CLIPModel, LlavaForConditionalGeneration

    from lmms_tokprune.cli import main

    out = tmp_path / "demo_train"
    code = main(["train-demo", "--out", str(out), "--clip-steps", "2", "--clip-full-steps", "1", "--clip-batch", "4",
                 "--scenes", "16", "--llava-steps", "2", "--batch-size", "2", "--llm-width", "32", "--llm-layers", "1",
                 "--llm-heads", "2", "--llm-intermediate", "64", "--val", "4", "--llava2-steps", "2", "--llava3-steps", "2"])
    assert code == 0
    llava = LlavaForConditionalGeneration.from_pretrained(out / "demo_llava")
    clip = CLIPModel.from_pretrained(out / "demo_clip")
    assert llava.dtype == torch.float16 and clip.dtype == torch.float16
    tower = llava.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    for (name, p), (_, q) in zip(tower.state_dict().items(), clip.vision_model.state_dict().items()):
        assert torch.equal(p, q), name
    # stage 2 ran on the positioned tower: only the position embedding moved, by alpha * the sin-cos table
    from recipes.demo_checkpoint.positions import sincos_2d

    before = CLIPModel.from_pretrained(out / "clip_fp32").vision_model.state_dict()
    after = CLIPModel.from_pretrained(out / "clip_pos_fp32").vision_model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == ["embeddings.position_embedding.weight"]
    torch.testing.assert_close(after[moved[0]] - before[moved[0]], 1.0 * sincos_2d(before[moved[0]].shape[1], 24))
    meta = json.loads((out / "demo_llava" / "TRAINING.json").read_text())
    assert meta["recipe"]["llava_steps"] == 2 and meta["recipe"]["clip_steps"] == 2 and meta["recipe"]["llava2_steps"] == 2
    assert meta["llava2_wall_s"] > 0 and meta["llava3_wall_s"] > 0 and meta["recipe"]["llava3_steps"] == 2
    assert (out / "llava3_fp32" / "config.json").exists()
    val = dict(meta["val_first_turn_exact_match"])
    mean = val.pop("mean")
    assert set(val) == {"attribute", "counting", "existence", "reading", "relation"} and mean == pytest.approx(sum(val.values()) / 5)


def test_train_demo_options_left_out_keep_the_recipe_defaults(monkeypatch, tmp_path):
    """One place for the recipe's numbers: the CLI only overrides what it is given."""
    import recipes.demo_checkpoint.recipe as recipe_mod
    from lmms_tokprune.cli import main
    from recipes.demo_checkpoint.recipe import Recipe

    seen = {}
    monkeypatch.setattr(recipe_mod, "train_demo", lambda out, recipe, threads, export_dir: seen.setdefault("r", recipe) and {})
    assert main(["train-demo", "--out", str(tmp_path), "--llava-steps", "7", "--llm-heads", "2", "--query-weight", "0.25"]) == 0
    want = Recipe()
    want.llava_steps, want.sizes.llm_heads, want.query_weight = 7, 2, 0.25
    assert seen["r"] == want

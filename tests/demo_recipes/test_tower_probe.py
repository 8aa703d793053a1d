"""tower_probe measures what it says: position shows up in R^2 exactly when the tower carries it."""

from __future__ import annotations

import torch


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from recipes.demo_checkpoint.common import Sizes, clip_tokenizer, vision_config

    torch.manual_seed(0)
    sizes = Sizes(vit_width=32, vit_layers=2, vit_heads=2)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": clip_tokenizer().vocab_size + 8}
    return CLIPModel(CLIPConfig(vision_config=vision_config(sizes), text_config=text, projection_dim=16)).eval()


def test_position_probe_sees_grid_positions_only_once_added():
    from recipes.demo_checkpoint.positions import add_grid_positions
    from recipes.demo_checkpoint.tower_probe import tower_report

    model = _tiny_clip()
    before = tower_report(model, n_probe=80, n_val=6)
    add_grid_positions(model, 4.0)
    after = tower_report(model, n_probe=80, n_val=6)
    assert before["position_r2_x"] < 0.5 and before["position_r2_y"] < 0.5
    assert after["position_r2_x"] > 0.8 and after["position_r2_y"] > 0.8
    for report in (before, after):
        assert report["cls_on_objects"] > 0
        assert 0 < report["text_patch_chance"] < 1

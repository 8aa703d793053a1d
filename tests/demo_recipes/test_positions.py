"""Grid positions for the demo ViT: the sin-cos table, and what adding it does to a CLIPModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes.demo_checkpoint.positions import add_grid_positions, sincos_2d


def test_sincos_table_is_linear_in_grid_coordinates_per_half():
    """x lives on the first half of the channels, y on the second; CLS gets nothing; rows are distinct."""
    from sklearn.linear_model import LinearRegression

    table = sincos_2d(32, 24)
    assert table.shape == (577, 32)
    assert torch.equal(table[0], torch.zeros(32))
    cols = np.arange(576) % 24
    rows = np.arange(576) // 24
    x_half, y_half = table[1:, :16].numpy(), table[1:, 16:].numpy()
    # each half depends on its own coordinate only (same column -> same x half)
    assert np.allclose(x_half[cols == 5], x_half[cols == 5][0]) and np.allclose(y_half[rows == 7], y_half[rows == 7][0])
    # and the coordinate is recoverable linearly from it (what the LLaVA projector needs)
    assert LinearRegression().fit(x_half, cols).score(x_half, cols) > 0.95
    assert LinearRegression().fit(y_half, rows).score(y_half, rows) > 0.95
    assert len({tuple(r) for r in table[1:].round(decimals=5).tolist()}) == 576


def test_add_grid_positions_moves_only_the_position_embedding():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=336, patch_size=14)
    model = CLIPVisionModel(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_grid_positions(model, 0.5)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert [k.removeprefix("vision_model.") for k in moved] == ["embeddings.position_embedding.weight"]
    torch.testing.assert_close(model.state_dict()[moved[0]] - before[moved[0]], 0.5 * sincos_2d(32, 24))


def test_bad_geometry_is_named():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(30, 24)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = torch.nn.Module()
            self.vision_model.embeddings = torch.nn.Module()
            self.vision_model.embeddings.position_embedding = torch.nn.Embedding(12, 8)

    with pytest.raises(ValueError, match="square grid"):
        add_grid_positions(Odd(), 1.0)

"""Token maps: roles per patch, the overlay, and the `visualize` command on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.cli import main
from lmms_tokprune.methods.inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_RECOVERED
from lmms_tokprune.report.token_map import ROLE_COLOURS, patch_roles, role_overlay


def test_patch_roles_marks_kept_recovered_and_dropped():
    index = torch.tensor([3, 0, 7, -1])
    role = torch.tensor([ROLE_KEPT, ROLE_RECOVERED, ROLE_KEPT, ROLE_EXTRA])
    roles = patch_roles(index, role, 9)
    assert roles.tolist() == [ROLE_RECOVERED, -1, -1, ROLE_KEPT, -1, -1, -1, ROLE_KEPT, -1]


def test_overlay_dims_dropped_patches_and_tints_the_others():
    image = Image.new("RGB", (6, 6), (200, 100, 40))
    roles = np.array([ROLE_KEPT, -1, ROLE_RECOVERED, -1])  # a 2 x 2 grid of 3 x 3 cells
    out = role_overlay(image, roles, size=6)
    base = np.array([200, 100, 40], dtype=np.float32) / 255.0
    np.testing.assert_allclose(out[0, 0], 0.55 * base + 0.45 * np.array(ROLE_COLOURS[ROLE_KEPT]), rtol=1e-6)
    np.testing.assert_allclose(out[2, 5], 0.25 * base, rtol=1e-6)  # patch 1 (top right): dropped
    np.testing.assert_allclose(out[5, 0], 0.55 * base + 0.45 * np.array(ROLE_COLOURS[ROLE_RECOVERED]), rtol=1e-6)
    np.testing.assert_allclose(out[4, 4], 0.25 * base, rtol=1e-6)


def test_visualize_maps_exactly_what_the_method_keeps(tiny_llava, tmp_path):
    """The map of topk_cls at 32 tokens marks exactly the 32 patches of highest CLS attention of the checkpoint's
    own last CLIP block (recomputed here from a plain run of the tower), and nothing else."""
    from lmms_tokprune.llava.images import ImagePreparer
    from lmms_tokprune.llava.loading import load_llava
    from lmms_tokprune.llava.vision import as_vision_inputs, run_clip
    from lmms_tokprune.methods.signals import cls_attention

    image = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(image)
    code = main(["visualize", "--pretrained", str(tiny_llava), "--image", str(image), "--question", "What colour?",
                 "--methods", "topk_cls,spatial", "--param", "topk_cls:budget=32", "--param", "spatial:budget=32", "--out", str(tmp_path / "maps")])
    assert code == 0
    model, processor = load_llava(str(tiny_llava), torch.device("cpu"), "float32")
    pixels = ImagePreparer(processor.image_processor, pad_to_square=True).prepare([Image.open(image)])
    states = as_vision_inputs(run_clip(model.model.vision_tower, pixels, need_qk=True))
    top = set(torch.topk(cls_attention(states.q, states.k)[0], 32).indices.tolist())
    record = json.loads((tmp_path / "maps" / "topk_cls.json").read_text())
    assert record["tokens"] == 32 and record["params"] == {"budget": 32}
    assert {p for p, r in enumerate(record["roles"]) if r >= 0} == top
    assert all(r in (-1, ROLE_KEPT) for r in record["roles"])
    spatial = json.loads((tmp_path / "maps" / "spatial.json").read_text())
    assert sum(r >= 0 for r in spatial["roles"]) == 32 and spatial["roles"] != record["roles"]
    for method in ("topk_cls", "spatial"):
        png = Image.open(tmp_path / "maps" / f"{method}.png")
        assert png.size[0] > 200 and np.asarray(png).std() > 0


def test_visualize_bad_input_is_one_line_before_any_work(tiny_llava, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(good)
    broken.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    (tmp_path / "text.png").write_text("not an image")
    cases = [
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
        (["--image", str(broken)], "cannot be read as an image"),
        (["--image", str(tmp_path / "text.png")], "cannot be read as an image"),
        (["--image", str(good), "--param", "prumerge:budget=8"], "is for method 'prumerge', which is not in --methods"),
    ]
    for extra, message in cases:
        code = main(["visualize", "--pretrained", str(tiny_llava), "--methods", "topk_cls", "--out", str(tmp_path / "maps")] + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert err.count("\n") == 1


def test_visualize_next_draws_the_crop_mosaic_of_what_the_engine_keeps(tiny_next, tmp_path):
    """A 640x480 image on a tiny LLaVA-NeXT: 5 units (base + 2x2 crops), the unpadded box rows 6..42 of 48; the map of
    each unit is exactly what the engine's own preparation keeps for it, padding (-2) is an invalid patch nobody kept,
    and an in-LLM method's map shows every valid patch entering the LLM."""
    from lmms_tokprune.llava.batch import Sample
    from lmms_tokprune.llava.opener import open_engine
    from lmms_tokprune.llava.options import engine_options
    from lmms_tokprune.methods import get_method
    from lmms_tokprune.report.token_map import ROLE_PADDING

    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps"
    code = main(["visualize", "--pretrained", str(tiny_next), "--image", str(image), "--question", "What colour?",
                 "--methods", "topk_cls,fastv", "--param", "topk_cls:budget=100", "--param", "fastv:k=1", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "topk_cls.json").read_text())
    assert record["family"] == "llava_next" and record["units"] == 5 and len(record["roles"]) == 5
    assert record["grid"] == {"rows": 2, "cols": 2, "side": 24, "top": 6, "bottom": 42, "left": 0, "right": 48}
    assert record["tokens"] == 100 and record["unit_tokens"] == [20] * 5  # budget=100 per image, split evenly over the units

    engine = open_engine(engine_options({"pretrained": str(tiny_next), "method": "topk_cls", "budget": 100}))
    sample = engine.admit(Sample("What colour?", [Image.open(image)], [0]))
    prepared = engine.prepare([sample]).compressed[0]
    valid = engine.family.plan_image(sample.images[0]).valid
    for u, (roles, unit) in enumerate(zip(record["roles"], prepared)):
        roles = np.array(roles)
        kept = set(unit.index[unit.index >= 0].tolist())
        assert set(np.flatnonzero(roles >= 0)) == kept, u
        assert set(np.flatnonzero(roles == ROLE_PADDING)) == {p for p in np.flatnonzero(~valid[u].numpy()) if p not in kept}, u
    assert (np.array(record["roles"][0]) != ROLE_PADDING).all()  # the base unit has no padding
    if get_method("topk_cls").unit_aware:  # pre-projector methods that honour the valid mask never keep a padding patch
        assert all((np.array(r)[~valid[u].numpy()] == ROLE_PADDING).all() for u, r in enumerate(record["roles"]))

    fastv = json.loads((out / "fastv.json").read_text())
    for u, roles in enumerate(fastv["roles"]):
        roles = np.array(roles)
        assert ((roles >= 0) == valid[u].numpy()).all() and ((roles == ROLE_PADDING) == ~valid[u].numpy()).all(), u
    assert fastv["tokens"] == 576 + 36 * 48
    for method in ("topk_cls", "fastv"):
        png = Image.open(out / f"{method}.png")
        assert png.size[0] > png.size[1] > 300 and np.asarray(png).std() > 0  # two panels side by side


def test_next_mosaic_roles_and_picture():
    from lmms_tokprune.llava.families.llava_next import CropGrid
    from lmms_tokprune.report.token_map import ROLE_PADDING, mosaic_picture, mosaic_roles

    grid = CropGrid(rows=1, cols=2, side=2, top=0, bottom=2, left=1, right=4)  # 2 x 4 patches, column 0 is padding
    crops = [np.array([ROLE_KEPT, -1, -1, ROLE_RECOVERED]), np.array([-1, ROLE_KEPT, -1, -1])]
    roles = mosaic_roles(grid, crops)
    assert roles.tolist() == [[ROLE_KEPT, -1, -1, ROLE_KEPT], [ROLE_PADDING, ROLE_RECOVERED, -1, -1]]  # a kept padding patch stays kept
    pictures = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 0.9)]).astype(np.float32)
    mosaic = mosaic_picture(grid, pictures)
    assert mosaic.shape == (4, 8, 3) and mosaic[0, 0, 0] == pytest.approx(0.1) and mosaic[3, 7, 0] == pytest.approx(0.9)

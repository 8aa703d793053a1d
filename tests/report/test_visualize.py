"""Token maps: roles per patch, the overlay, and the `visualize` command on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
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

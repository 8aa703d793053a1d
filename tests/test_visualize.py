"""Token maps: roles per patch and the `visualize` command on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lmms_tokprune.cli import main
from lmms_tokprune.methods.inputs import ROLE_EXTRA, ROLE_KEPT, ROLE_RECOVERED
from lmms_tokprune.report.token_map import patch_roles


def test_patch_roles_marks_kept_recovered_and_dropped():
    index = torch.tensor([3, 0, 7, -1])
    role = torch.tensor([ROLE_KEPT, ROLE_RECOVERED, ROLE_KEPT, ROLE_EXTRA])
    roles = patch_roles(index, role, 9)
    assert roles.tolist() == [ROLE_RECOVERED, -1, -1, ROLE_KEPT, -1, -1, -1, ROLE_KEPT, -1]


def test_visualize_writes_one_png_per_method(tiny_llava, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(image)
    code = main(["visualize", "--pretrained", str(tiny_llava), "--image", str(image), "--question", "What colour?",
                 "--methods", "topk_cls,spatial", "--param", "topk_cls:budget=32", "--param", "spatial:budget=32", "--out", str(tmp_path / "maps")])
    assert code == 0
    for method in ("topk_cls", "spatial"):
        png = Image.open(tmp_path / "maps" / f"{method}.png")
        assert png.size[0] > 200 and np.asarray(png).std() > 0

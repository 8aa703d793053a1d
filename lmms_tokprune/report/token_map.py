"""Token maps (the papers' Figure-5 style): which patches a method kept, recovered or merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..methods.inputs import ROLE_KEPT, ROLE_MERGED, ROLE_NAMES, ROLE_RECOVERED

ROLE_COLOURS = {ROLE_KEPT: (0.10, 0.80, 0.20), ROLE_RECOVERED: (0.15, 0.45, 1.00), ROLE_MERGED: (1.00, 0.55, 0.00)}
ROLE_LABELS = {ROLE_KEPT: "kept", ROLE_RECOVERED: "recovered (text-guided)", ROLE_MERGED: "merged centre / sampled"}


def patch_roles(index: torch.Tensor, role: torch.Tensor, num_patches: int) -> np.ndarray:
    """[N] array: -1 dropped, else the role code of the patch's output token."""
    roles = np.full(num_patches, -1, dtype=np.int64)
    idx = index.cpu().numpy()
    rl = role.cpu().numpy()
    ok = idx >= 0
    roles[idx[ok]] = rl[ok]
    return roles


def role_overlay(image: Image.Image, roles: np.ndarray, size: int = 336) -> np.ndarray:
    """[size, size, 3] floats in [0, 1]: dropped patches dimmed to 25 %, the others tinted 45 % with their role's colour."""
    side = int(round(len(roles) ** 0.5))
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float32) / 255.0
    cell = size / side
    overlay = arr.copy()
    for p, r in enumerate(roles):
        y0, x0 = int(p // side * cell), int(p % side * cell)
        y1, x1 = int((p // side + 1) * cell), int((p % side + 1) * cell)
        if r < 0:
            overlay[y0:y1, x0:x1] = overlay[y0:y1, x0:x1] * 0.25
        else:
            overlay[y0:y1, x0:x1] = 0.55 * overlay[y0:y1, x0:x1] + 0.45 * np.array(ROLE_COLOURS.get(int(r), (1, 1, 1)))
    return overlay


def draw_token_map(image: Image.Image, roles: np.ndarray, title: str, out_path: Path, extra_tokens: int = 0) -> Path:
    """The role overlay with a title and legend, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    overlay = role_overlay(image, roles)
    fig, ax = plt.subplots(figsize=(4.2, 4.6), dpi=100)
    ax.imshow(overlay)
    ax.set_xticks([])
    ax.set_yticks([])
    kept = int((roles >= 0).sum())
    ax.set_title(f"{title}\n{kept} patches + {extra_tokens} merged-remainder token(s)", fontsize=9)
    present = sorted({int(r) for r in roles if r >= 0})
    handles = [Patch(color=ROLE_COLOURS[r], label=ROLE_LABELS[r]) for r in present if r in ROLE_COLOURS]
    handles.append(Patch(color=(0.2, 0.2, 0.2), label="dropped"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def open_image(path: str) -> Image.Image:
    """The image to map, fully decoded (a missing, unreadable or truncated file is one ValueError)."""
    from PIL import ImageFile, UnidentifiedImageError

    from ..llava.images import to_rgb

    if not Path(path).is_file():
        raise ValueError(f"--image {path!r} does not exist")
    strict = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # lmms-eval turns it on globally; a map of a half-decoded image would lie
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im.copy())
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"--image {path!r} cannot be read as an image: {err}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = strict


def visualize(pretrained: str, image_path: str, question: str, methods: Sequence[str], out_dir: str,
              params: Optional[Dict[str, Dict[str, Any]]] = None, text_encoder: Optional[str] = None, variant: str = "fixed") -> List[Path]:
    """One PNG per method for `image_path` + `question`, using the checkpoint's own CLIP states, and beside it
    `<method>.json`: the role of every patch (-1 dropped, else kept / recovered / merged / extra codes)."""
    from ..llava.images import expand_to_square
    from ..llava.opener import default_device, open_engine
    from ..llava.options import engine_options
    from ..llava.prompts import llava_v1_prompt

    common = {"pretrained": pretrained, "variant": variant, **({"text_encoder": text_encoder} if text_encoder else {})}
    configs = [engine_options({**common, "method": m, **(params or {}).get(m, {})}) for m in methods]  # all errors before loading
    image = open_image(image_path)
    device = default_device(configs[0]) if configs else torch.device("cpu")
    model = processor = guide = None
    outputs = []
    for options in configs:
        engine = open_engine(options, device, model, processor, guide)
        model, processor, guide = engine.model, engine.processor, engine.text_guide or guide
        shown = expand_to_square(image, tuple(int(x * 255) for x in processor.image_processor.image_mean))
        pixel_values = engine.images.prepare([image])
        texts = guide.texts_for([question], [llava_v1_prompt(question, 1)]) if engine.text_guide is not None else []
        with torch.inference_mode():
            out = engine.compress_images(pixel_values, [0], texts).images[0]
        roles = patch_roles(out.index, out.role, engine.num_patches)
        method, given = options.method.name, options.method.given_params
        label = method + (f" {given}" if given else "")
        extra = int((out.index < 0).sum())
        outputs.append(draw_token_map(shown, roles, label, Path(out_dir) / f"{method}.png", extra_tokens=extra))
        record = {"method": method, "variant": options.method.variant, "params": given, "tokens": out.num_tokens,
                  "extra_tokens": extra, "roles": roles.tolist(), "role_names": {str(k): v for k, v in ROLE_NAMES.items()}}
        (Path(out_dir) / f"{method}.json").write_text(json.dumps(record) + "\n")
    return outputs

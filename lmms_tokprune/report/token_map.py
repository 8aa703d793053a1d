"""Token maps (the papers' Figure-5 style): which patches a method kept, recovered or merged.

LLaVA-1.5: one unit per image, drawn over the image padded to a square. LLaVA-NeXT: the base unit (the whole image
squashed to 336 px) beside the crop mosaic (the crops laid out as the processor cut them from the image, crop borders
drawn, the box that unpadding keeps outlined), each unit's kept / recovered / merged / dropped patches coloured as for
LLaVA-1.5 and the padding that unpadding removes greyed out. The pictures are the units' own pixels (what CLIP saw)."""

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


ROLE_PADDING = -2  # NeXT maps: a patch of a crop that unpadding removes (it never was a token)
PADDING_GREY = np.array((0.82, 0.82, 0.82), dtype=np.float32)


def tint_cells(arr: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """`arr` [H, W, 3] floats in [0, 1] under a grid of cells `roles` [rows, cols]: dropped (-1) cells dimmed to 25 %,
    padding (ROLE_PADDING) cells light grey, the others tinted 45 % with their role's colour."""
    rows, cols = roles.shape
    cell_h, cell_w = arr.shape[0] / rows, arr.shape[1] / cols
    overlay = arr.copy()
    for (i, j), r in np.ndenumerate(roles):
        y0, x0 = int(i * cell_h), int(j * cell_w)
        y1, x1 = int((i + 1) * cell_h), int((j + 1) * cell_w)
        if r == ROLE_PADDING:
            overlay[y0:y1, x0:x1] = PADDING_GREY
        elif r < 0:
            overlay[y0:y1, x0:x1] = overlay[y0:y1, x0:x1] * 0.25
        else:
            overlay[y0:y1, x0:x1] = 0.55 * overlay[y0:y1, x0:x1] + 0.45 * np.array(ROLE_COLOURS.get(int(r), (1, 1, 1)))
    return overlay


def role_overlay(image: Image.Image, roles: np.ndarray, size: int = 336) -> np.ndarray:
    """[size, size, 3] floats in [0, 1]: dropped patches dimmed to 25 %, the others tinted 45 % with their role's colour."""
    side = int(round(len(roles) ** 0.5))
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)).astype(np.float32) / 255.0
    return tint_cells(arr, np.asarray(roles).reshape(side, side))


def unit_pictures(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[U, H, W, 3] floats in [0, 1]: the units' pixels as CLIP saw them (the processor's normalisation undone)."""
    arr = pixel_values.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return np.clip(arr * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32), 0.0, 1.0)


def mosaic_roles(grid: Any, crop_roles: Sequence[np.ndarray]) -> np.ndarray:
    """[rows*side, cols*side] roles of the stitched crop grid (crops in raster order), ROLE_PADDING for the patches
    outside the box that unpadding keeps (`grid`: the family's CropGrid) -- unless a method kept one: a token the LLM
    gets stays visible wherever it comes from."""
    side = grid.side
    out = np.full((grid.rows * side, grid.cols * side), ROLE_PADDING, dtype=np.int64)
    for crop, roles in enumerate(crop_roles):
        r, c = divmod(crop, grid.cols)
        out[r * side:(r + 1) * side, c * side:(c + 1) * side] = np.asarray(roles).reshape(side, side)
    inside = np.zeros_like(out, dtype=bool)
    inside[grid.top:grid.bottom, grid.left:grid.right] = True
    out[~inside & (out < 0)] = ROLE_PADDING
    return out


def mosaic_picture(grid: Any, crops: np.ndarray) -> np.ndarray:
    """The crops' pictures [rows*cols, H, W, 3] laid out as the processor cut them: [rows*H, cols*W, 3]."""
    _, h, w, _ = crops.shape
    return crops.reshape(grid.rows, grid.cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(grid.rows * h, grid.cols * w, 3)


def legend_handles(present: Sequence[int]) -> list:
    """The legend every token map shares: one patch per role present, then "dropped"."""
    from matplotlib.patches import Patch

    handles = [Patch(color=ROLE_COLOURS[r], label=ROLE_LABELS[r]) for r in present if r in ROLE_COLOURS]
    handles.append(Patch(color=(0.2, 0.2, 0.2), label="dropped"))
    return handles


def save_figure(fig: Any, out_path: Path) -> Path:
    """Write the PNG (folders made as needed) and free the figure."""
    import matplotlib.pyplot as plt

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def draw_token_map(image: Image.Image, roles: np.ndarray, title: str, out_path: Path, extra_tokens: int = 0) -> Path:
    """The role overlay with a title and legend, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlay = role_overlay(image, roles)
    fig, ax = plt.subplots(figsize=(4.2, 4.6), dpi=100)
    ax.imshow(overlay)
    ax.set_xticks([])
    ax.set_yticks([])
    kept = int((roles >= 0).sum())
    ax.set_title(f"{title}\n{kept} patches + {extra_tokens} merged-remainder token(s)", fontsize=9)
    present = sorted({int(r) for r in roles if r >= 0})
    handles = legend_handles(present)
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    return save_figure(fig, out_path)


def draw_next_token_map(base: np.ndarray, base_roles: np.ndarray, mosaic: np.ndarray, grid_roles: np.ndarray, grid: Any, title: str,
                        out_path: Path, extra_tokens: int = 0) -> Path:
    """A LLaVA-NeXT token map: the base unit's overlay beside the crop mosaic's (crop borders, the unpadded box
    outlined), a title with the counts and a legend; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    side = int(round(len(base_roles) ** 0.5))
    fig, (ax_base, ax_grid) = plt.subplots(1, 2, figsize=(3.2 + 3.2 * grid.cols * 0.9, 4.4), dpi=100,
                                           gridspec_kw={"width_ratios": [1, grid.cols]})
    ax_base.imshow(tint_cells(base, np.asarray(base_roles).reshape(side, side)))
    base_kept = int((np.asarray(base_roles) >= 0).sum())
    ax_base.set_title(f"base image (unit 0)\n{base_kept} of {len(base_roles)} patches", fontsize=8)
    ax_grid.imshow(tint_cells(mosaic, grid_roles))
    h, w = mosaic.shape[:2]
    cell_h, cell_w = h / grid_roles.shape[0], w / grid_roles.shape[1]
    for r in range(1, grid.rows):
        ax_grid.axhline(r * h / grid.rows - 0.5, color="white", linewidth=1.2)
    for c in range(1, grid.cols):
        ax_grid.axvline(c * w / grid.cols - 0.5, color="white", linewidth=1.2)
    ax_grid.add_patch(Rectangle((grid.left * cell_w - 0.5, grid.top * cell_h - 0.5), grid.width * cell_w, grid.height * cell_h,
                                fill=False, edgecolor=(0.85, 0.0, 0.85), linewidth=1.6))
    valid = int((grid_roles != ROLE_PADDING).sum())
    grid_kept = int((grid_roles >= 0).sum())
    ax_grid.set_title(f"{grid.rows} x {grid.cols} crops (units 1-{grid.rows * grid.cols}), unpadded {grid.height} x {grid.width} "
                      f"patches outlined\n{grid_kept} of {valid} patches", fontsize=8)
    for ax in (ax_base, ax_grid):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: {base_kept + grid_kept} patches + {extra_tokens} merged-remainder token(s)", fontsize=9)
    present = sorted({int(r) for r in np.concatenate([np.ravel(base_roles), np.ravel(grid_roles)]) if r >= 0})
    handles = legend_handles(present)
    if (grid_roles == ROLE_PADDING).any():
        handles.append(Patch(color=tuple(PADDING_GREY), label="padding (removed by unpadding)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, out_path)


def draw_frame_strip(frames: np.ndarray, frame_roles: Sequence[np.ndarray], indices: Optional[Sequence[int]], title: str, out_path: Path,
                     extra_tokens: int = 0) -> Path:
    """A Video-LLaVA token map: the video's frames side by side (the pixels the video tower saw), each frame's kept /
    merged / dropped patches coloured, the clip's frame number and the frame's count under it; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(frame_roles)
    fig, axes = plt.subplots(1, count, figsize=(1.9 * count, 2.9), dpi=100, squeeze=False)
    total = 0
    for f, (ax, roles) in enumerate(zip(axes[0], frame_roles)):
        side = int(round(len(roles) ** 0.5))
        ax.imshow(tint_cells(frames[f], np.asarray(roles).reshape(side, side)))
        kept = int((np.asarray(roles) >= 0).sum())
        total += kept
        ax.set_title(f"frame {indices[f] if indices else f}\n{kept} of {len(roles)}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: {total} patches + {extra_tokens} merged-remainder token(s) over {count} frames (+ {count} frame CLS)", fontsize=9)
    present = sorted({int(r) for roles in frame_roles for r in np.ravel(roles) if r >= 0})
    handles = legend_handles(present)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, out_path)


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
    `<method>.json`: the role of every patch (-1 dropped, else kept / recovered / merged / extra codes).

    The image goes through the checkpoint's family exactly as the engine runs it (its units, their valid patches and
    per-unit budgets, the method on every unit): LLaVA-1.5 draws its one unit over the square-padded image; LLaVA-NeXT
    draws the base unit and the crop mosaic (`draw_next_token_map`), and its JSON holds the roles per unit (padding that
    unpadding removes = -2) with the crop grid."""
    from ..llava.batch import Sample
    from ..llava.images import expand_to_square
    from ..llava.opener import default_device, open_engine
    from ..llava.options import engine_options
    from ..llava.video import VideoClip, is_video_path

    common = {"pretrained": pretrained, "variant": variant, **({"text_encoder": text_encoder} if text_encoder else {})}
    configs = [engine_options({**common, "method": m, **(params or {}).get(m, {})}) for m in methods]  # all errors before loading
    image: Any = VideoClip(image_path) if is_video_path(image_path) else open_image(image_path)  # a video: its frame strip
    device = default_device(configs[0]) if configs else torch.device("cpu")
    model = processor = guide = None
    outputs = []
    for options in configs:
        engine = open_engine(options, device, model, processor, guide)
        model, processor, guide = engine.model, engine.processor, engine.text_guide or guide
        sample = engine.admit(Sample(question, [image], [0]))
        batch = engine.family.units(sample.images)  # the family's units: LLaVA-1.5 one, NeXT base + crops
        with torch.inference_mode():
            if engine.family.packed_selection:  # the release selects over the assembled sequence: what it keeps, per unit
                units = engine.prepare([sample]).compressed[0]
            else:
                units = engine.compress_batch(batch, [sample], [engine.prompt_text(sample)]).images
        n = engine.family.num_patches
        roles = [patch_roles(u.index, u.role, n) for u in units]
        method, given = options.method.name, options.method.given_params
        label = method + (f" {given}" if given else "")
        extra = int(sum(int((u.index < 0).sum()) for u in units))
        record: Dict[str, Any] = {"method": method, "variant": options.method.variant, "params": given,
                                  "tokens": sum(u.num_tokens for u in units), "extra_tokens": extra}
        grid = batch.images[0].placement
        if isinstance(sample.images[0], VideoClip):  # Video-LLaVA: the frames side by side, as the video tower saw them
            vp = processor.video_processor
            pictures = unit_pictures(batch.pixel_values, vp.image_mean, vp.image_std)
            outputs.append(draw_frame_strip(pictures, roles, grid.indices, label, Path(out_dir) / f"{method}.png", extra_tokens=extra))
            record.update(family=engine.family.name, units=len(roles), roles=[r.tolist() for r in roles], frames=grid.indices,
                          unit_tokens=[u.num_tokens for u in units])
            grid = None
        elif grid is None:  # one unit per image (LLaVA-1.5): the map as it always was
            shown = expand_to_square(image, tuple(int(x * 255) for x in processor.image_processor.image_mean))
            outputs.append(draw_token_map(shown, roles[0], label, Path(out_dir) / f"{method}.png", extra_tokens=extra))
            record["roles"] = roles[0].tolist()
        else:
            valid = batch.images[0].valid
            for u, unit in enumerate(roles):  # padding = an invalid patch nobody kept (a kept one shows as what it is)
                if valid is not None:
                    unit[~valid[u].cpu().numpy() & (unit < 0)] = ROLE_PADDING
            ip = processor.image_processor
            pictures = unit_pictures(batch.pixel_values, ip.image_mean, ip.image_std)
            outputs.append(draw_next_token_map(pictures[0], roles[0], mosaic_picture(grid, pictures[1:]), mosaic_roles(grid, roles[1:]),
                                               grid, label, Path(out_dir) / f"{method}.png", extra_tokens=extra))
            record.update(family=engine.family.name, units=len(roles), roles=[r.tolist() for r in roles],
                          grid={k: getattr(grid, k) for k in ("rows", "cols", "side", "top", "bottom", "left", "right")},
                          unit_tokens=[u.num_tokens for u in units])
        record["role_names"] = {str(k): v for k, v in ROLE_NAMES.items()}
        if grid is not None:
            record["role_names"].update({"-1": "dropped", str(ROLE_PADDING): "padding"})
        (Path(out_dir) / f"{method}.json").write_text(json.dumps(record) + "\n")
    return outputs

"""What the demo ViT's features carry, measured the same way for any CLIP folder.

``python -m recipes.demo_checkpoint.tower_probe <clip folder> [<clip folder> ...]`` prints, per folder:

- ``position_r2_x`` / ``position_r2_y``: held-out R^2 of a ridge probe from the penultimate features of
  object patches (what the LLaVA projector sees) to the object's centre (positions.py says why it matters);
- ``cls_on_objects``: the last block's CLS attention (mean over heads) on object patches, as a multiple of
  their area share (what CLS-attention pruning relies on);
- ``text_patch_top8``: precision of the 8 patches most similar to "a {colour} {shape}" through the text
  tower and ``visual_projection`` (what ``recover`` relies on), with its chance level.
"""

from __future__ import annotations

import sys
from typing import Dict

import numpy as np
import torch

from ..shapes_vqa import sample_scene
from ..shapes_vqa.generator import box_patches
from .common import clip_tokenizer, penultimate_tokens, scene_pixels, vit_blocks


@torch.inference_mode()
def tower_report(clip_model, n_probe: int = 240, n_val: int = 100) -> Dict[str, float]:
    """The four measures above; probe fitted on ``n_probe`` train scenes (70/30 split), the rest on ``n_val`` val scenes."""
    from sklearn.linear_model import RidgeCV

    vm = clip_model.vision_model
    scenes = [sample_scene("train", i) for i in range(n_probe)]
    feats = penultimate_tokens(vm, scene_pixels(scenes))[:, 1:]
    x, y = [], []
    for i, scene in enumerate(scenes):
        for o in scene.shapes:
            for p in box_patches(o):
                x.append(feats[i, p].numpy())
                y.append(o.centre)
    x, y = np.asarray(x), np.asarray(y, dtype=np.float64)
    cut = int(0.7 * len(x))
    r2 = [RidgeCV(alphas=(0.1, 1.0, 10.0)).fit(x[:cut], y[:cut, k]).score(x[cut:], y[cut:, k]) for k in (0, 1)]

    scenes = [sample_scene("val", i) for i in range(n_val)]
    hidden = penultimate_tokens(vm, scene_pixels(scenes))
    last = vm.encoder.layers[-1]
    # the last block's CLS attention row, computed from its own q/k (no eager-attention switch needed)
    attn = last.self_attn
    h = last.layer_norm1(hidden)
    b, t, d = h.shape
    heads = attn.num_heads
    q = attn.q_proj(h[:, :1]).view(b, 1, heads, -1).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, heads, -1).transpose(1, 2)
    cls_row = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]  # [B, 576]
    patches = torch.nn.functional.normalize(clip_model.visual_projection(vm.post_layernorm(vit_blocks([last], hidden)[:, 1:])), dim=-1)
    tok = clip_tokenizer()
    ratios, hits, chance = [], [], []
    for i, scene in enumerate(scenes):
        obj = sorted({p for o in scene.objects for p in box_patches(o)})
        ratios.append((cls_row[i, obj].sum() / cls_row[i].sum()).item() * 576 / len(obj))
        for o in scene.shapes:
            text = clip_model.get_text_features(**tok(f"a {o.colour} {o.kind}", return_tensors="pt"))
            text = getattr(text, "pooler_output", text)
            top = (patches[i] @ torch.nn.functional.normalize(text, dim=-1)[0]).topk(8).indices.tolist()
            covered = set(box_patches(o))
            hits.append(sum(p in covered for p in top) / 8)
            chance.append(len(covered) / 576)
    return {"position_r2_x": r2[0], "position_r2_y": r2[1], "cls_on_objects": float(np.mean(ratios)),
            "text_patch_top8": float(np.mean(hits)), "text_patch_chance": float(np.mean(chance))}


def main(argv=None) -> int:
    from transformers import CLIPModel

    for path in (argv if argv is not None else sys.argv[1:]):
        report = tower_report(CLIPModel.from_pretrained(path, dtype=torch.float32).eval())
        print(path, " ".join(f"{k} {v:.3f}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

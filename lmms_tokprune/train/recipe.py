"""`lmms-tokprune train-demo`: the whole recipe of the shipped demo checkpoint, fixed seeds, CPU.

1. CLIP pre-training (clip_pretrain.py): phase 1 global contrastive (+ hard negatives, FLIP 25% patches)
   -> ``<out>/clip_phase1``; phase 2 continues with the region-level loss added (50% patches) -> ``<out>/clip_fp32``
2. projector + LLM on the frozen ViT's cached features (llava_train.py): phase 1 -> ``<out>/llava_phase1``,
   phase 2 continues it (fresh schedule, new question order) -> ``<out>/llava_fp32``
3. fp16 export -> ``<out>/demo_llava`` (LlavaForConditionalGeneration + LlavaProcessor) and ``<out>/demo_clip``
   (CLIPModel + CLIPProcessor, vision weights == the LLaVA's vision tower); ``--install`` copies them to
   ``lmms_tokprune/assets/`` where ``pretrained=demo`` / ``text_encoder=demo`` find them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .common import Log, Sizes


@dataclass
class Recipe:
    sizes: Sizes = field(default_factory=Sizes)
    clip_steps: int = 240
    clip_full_steps: int = 16
    clip_batch: int = 32
    clip_keep: int = 144
    clip_lr: float = 1e-3
    # phase 2: continue with the region-level loss, half the patches
    clip2_steps: int = 360
    clip2_full_steps: int = 16
    clip2_keep: int = 288
    clip2_lr: float = 5e-4
    region_weight: float = 1.0
    llava_scenes: int = 6000
    llava_val: int = 100
    llava_epochs: float = 0.6  # 450 steps of 8 conversations
    llava_batch: int = 8
    llava_lr: float = 1.5e-3
    caption_prob: float = 0.5
    # phase 2 of the LLaVA stage: continue from phase 1 with a fresh schedule and a new question order
    llava2_epochs: float = 1.2  # 900 steps of 8 conversations
    llava2_stop_after: Optional[int] = None  # end early after this many steps (None: the whole schedule)
    llava2_lr: float = 1e-3
    seed: int = 0


def export_fp16(src: Path, dst: Path, kind: str) -> Path:
    """Re-save a checkpoint folder in float16 safetensors (+ its processor)."""
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    cls = LlavaForConditionalGeneration if kind == "llava" else CLIPModel
    model = cls.from_pretrained(src, dtype=torch.float32).to(torch.float16)
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst, safe_serialization=True)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)
    return dst


def train_demo(out_dir: str | Path, recipe: Optional[Recipe] = None, threads: int = 2, install: bool = False, log: Optional[Log] = None) -> dict:
    from transformers import CLIPModel

    from .clip_pretrain import pretrain_clip
    from .llava_train import train_llava

    recipe = recipe or Recipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    log = log or Log(out / "train.log")
    t0 = time.time()
    clip_dir = out / "clip_fp32"
    if (clip_dir / "config.json").exists():
        log(f"reusing {clip_dir}")
        clip_model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
        clip_s = None
    else:
        phase1 = out / "clip_phase1"
        if not (phase1 / "config.json").exists():
            pretrain_clip(phase1, recipe.sizes, steps=recipe.clip_steps, full_steps=recipe.clip_full_steps,
                          batch_size=recipe.clip_batch, keep=recipe.clip_keep, lr=recipe.clip_lr, seed=recipe.seed, log=log)
        clip_model = pretrain_clip(clip_dir, recipe.sizes, steps=recipe.clip2_steps, full_steps=recipe.clip2_full_steps,
                                   batch_size=recipe.clip_batch, keep=recipe.clip2_keep, lr=recipe.clip2_lr, seed=recipe.seed,
                                   region_weight=recipe.region_weight, init_from=phase1,
                                   first_scene=(recipe.clip_steps + recipe.clip_full_steps) * recipe.clip_batch, log=log)
        clip_s = time.time() - t0
        log(f"CLIP pre-training done in {clip_s:.0f}s")
    t1 = time.time()
    common = dict(n_scenes=recipe.llava_scenes, n_val=recipe.llava_val, batch_size=recipe.llava_batch, seed=recipe.seed,
                  caption_prob=recipe.caption_prob, cache_dir=out / "cache", log=log)
    phase1 = out / "llava_phase1"
    if not (phase1 / "config.json").exists():
        train_llava(clip_model, phase1, recipe.sizes, epochs=recipe.llava_epochs, lr=recipe.llava_lr, **common)
    if recipe.llava2_epochs > 0:
        _, val_acc = train_llava(clip_model, out / "llava_fp32", recipe.sizes, epochs=recipe.llava2_epochs, lr=recipe.llava2_lr,
                                 init_from=phase1, data_seed=recipe.seed + 1, save_every=150,
                                 stop_after=recipe.llava2_stop_after, **common)
    else:
        shutil.copytree(phase1, out / "llava_fp32", dirs_exist_ok=True)
        val_acc = None
    llava_s = time.time() - t1
    log(f"LLaVA training done in {llava_s:.0f}s")
    demo_llava = export_fp16(out / "llava_fp32", out / "demo_llava", "llava")
    demo_clip = export_fp16(clip_dir, out / "demo_clip", "clip")
    meta = {
        "recipe": {k: (v.as_dict() if isinstance(v, Sizes) else v) for k, v in recipe.__dict__.items()},
        "threads": threads,
        "clip_wall_s": clip_s,
        "llava_wall_s": llava_s,
        "val_first_turn_exact_match": val_acc,
        "torch": torch.__version__,
    }
    for d in (demo_llava, demo_clip):
        (d / "TRAINING.json").write_text(json.dumps(meta, indent=1) + "\n")
    if install:
        from ..assets import ASSETS_DIR

        for d in (demo_llava, demo_clip):
            target = ASSETS_DIR / d.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(d, target)
            log(f"installed {target}")
    log(f"total {time.time() - t0:.0f}s")
    return meta

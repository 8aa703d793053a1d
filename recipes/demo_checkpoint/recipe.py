"""`lmms-tokprune train-demo`: the whole recipe of the shipped demo checkpoint, fixed seeds, CPU.

1. CLIP pre-training (clip_pretrain.py) from scratch: global InfoNCE on captions + NegCLIP hard negatives + the
   dense per-patch region loss, FLIP (half the patches) then all 576 -> ``<out>/clip_fp32``
2. projector + LLM on the frozen ViT's cached features (llava_train.py), answers + grounding losses -> ``<out>/llava_fp32``
3. grid positions: a fixed 2-D sin-cos table added to the ViT's position embedding (positions.py: the CLIP
   captions never needed position, so the features had none) -> ``<out>/clip_pos_fp32``; then stage 2 continues
   from ``llava_fp32`` on that tower's features with a fresh schedule, plus the relation comparison loss ->
   ``<out>/llava2_fp32``. (Stage 2 starts from stage 1 rather than from scratch because that is the run the
   shipped weights come from: the position problem was found after stage 1.)
4. stage 3: continues from ``llava2_fp32`` on the same tower with the query loss added (grounding.py: the
   answer position says the colour/shape words its question names) -> ``<out>/llava3_fp32``. (Also a
   continuation for the same reason: the weak colour query was found after stage 2.)
5. fp16 export -> ``<out>/demo_llava`` (LlavaForConditionalGeneration + LlavaProcessor) and ``<out>/demo_clip``
   (CLIPModel + CLIPProcessor, vision weights == the LLaVA's vision tower); ``--export DIR`` copies them to
   ``DIR`` (in a checkout, ``lmms_tokprune/assets`` is where ``pretrained=demo`` / ``text_encoder=demo`` find
   them). Nothing is written outside ``<out>`` and ``DIR``.

A finished stage's folder is reused when the command is run again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch

from .common import Log, Sizes


@dataclass
class Recipe:
    sizes: Sizes = field(default_factory=Sizes)
    # one CLIP run from scratch: global InfoNCE + hard negatives + the dense per-patch loss; FLIP keeps half the
    # patches for clip_steps, then clip_full_steps see all 576 (as LLaVA will)
    clip_steps: int = 1400
    clip_full_steps: int = 100
    clip_batch: int = 24
    clip_keep: int = 288
    clip_lr: float = 1e-3
    patch_weight: float = 1.0
    llava_scenes: int = 6000
    llava_val: int = 100
    llava_steps: int = 4000
    llava_batch: int = 8
    llava_lr: float = 1e-3
    llava_projector_lr: float = 1e-3
    llava_per_family: int = 2
    caption_prob: float = 0.3
    # (until step, at most this many shapes per scene); empty: all scenes from the start
    llava_curriculum: Tuple[Tuple[int, int], ...] = ()
    # auxiliary losses (grounding.py): the answer position attends to the named objects; object tokens read out
    # their words. Without them the from-scratch LLM stayed at the answer prior.
    grounding_weight: float = 1.0
    readout_weight: float = 0.5
    # stage 2: the tower with grid positions (0 = no stage 2), continued from stage 1
    position_alpha: float = 1.0
    llava2_steps: int = 3000
    llava2_lr: float = 5e-4
    comparison_weight: float = 1.0
    # stage 3: continued from stage 2 on the same tower with the query loss (0 steps = no stage 3)
    llava3_steps: int = 1500
    llava3_lr: float = 5e-4
    query_weight: float = 1.0
    seed: int = 0

    @property
    def llava_epochs(self) -> float:
        return self.llava_steps * self.llava_batch / self.llava_scenes

    @property
    def llava2_epochs(self) -> float:
        return self.llava2_steps * self.llava_batch / self.llava_scenes

    @property
    def llava3_epochs(self) -> float:
        return self.llava3_steps * self.llava_batch / self.llava_scenes


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


def _llava_stage(name: str, llava_dir: Path, clip_model, recipe: Recipe, log: Log, **schedule) -> Tuple[Optional[dict], Optional[float]]:
    """Train one LLaVA stage into ``llava_dir`` (the recipe's data and losses, ``schedule`` = this stage's own
    arguments of ``train_llava``) unless a finished one is there; its validation accuracy and wall time, both
    None when reused (a reused stage has no numbers of its own: they are in the run that made it)."""
    from .llava_train import train_llava

    if (llava_dir / "config.json").exists():
        log(f"reusing {llava_dir}")
        return None, None
    t0 = time.time()
    _, val_acc = train_llava(clip_model, llava_dir, recipe.sizes, n_scenes=recipe.llava_scenes, n_val=recipe.llava_val,
                             batch_size=recipe.llava_batch, per_family=recipe.llava_per_family, seed=recipe.seed,
                             caption_prob=recipe.caption_prob, cache_dir=llava_dir.parent / "cache",
                             grounding_weight=recipe.grounding_weight, readout_weight=recipe.readout_weight,
                             save_every=300, log=log, **schedule)
    wall = time.time() - t0
    log(f"LLaVA {name} done in {wall:.0f}s")
    return val_acc, wall


def _positioned_tower(out: Path, recipe: Recipe, clip_model, log: Log):
    """(folder, model) of the CLIP with grid positions (positions.py) added to a copy of ``clip_model``; made once."""
    import copy

    from transformers import CLIPModel, CLIPProcessor

    from .positions import add_grid_positions

    clip_dir = out / "clip_pos_fp32"
    if (clip_dir / "config.json").exists():
        log(f"reusing {clip_dir}")
        return clip_dir, CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    clip_pos = copy.deepcopy(clip_model)
    add_grid_positions(clip_pos, recipe.position_alpha)
    clip_pos.save_pretrained(clip_dir, safe_serialization=True)
    CLIPProcessor.from_pretrained(out / "clip_fp32").save_pretrained(clip_dir)
    log(f"grid positions (alpha {recipe.position_alpha}) -> {clip_dir}")
    return clip_dir, clip_pos


def train_demo(out_dir: str | Path, recipe: Optional[Recipe] = None, threads: int = 2, export_dir: Optional[str | Path] = None,
               log: Optional[Log] = None) -> dict:
    from transformers import CLIPModel

    from .clip_pretrain import pretrain_clip

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
        clip_model = pretrain_clip(clip_dir, recipe.sizes, steps=recipe.clip_steps, full_steps=recipe.clip_full_steps,
                                   batch_size=recipe.clip_batch, keep=recipe.clip_keep, lr=recipe.clip_lr, seed=recipe.seed,
                                   patch_weight=recipe.patch_weight, save_every=250, log=log)
        clip_s = time.time() - t0
        log(f"CLIP pre-training done in {clip_s:.0f}s")
    llava_dir = out / "llava_fp32"
    val_acc, llava_s = _llava_stage("stage 1", llava_dir, clip_model, recipe, log, epochs=recipe.llava_epochs, lr=recipe.llava_lr,
                                    projector_lr=recipe.llava_projector_lr, curriculum=recipe.llava_curriculum)
    llava2_s = llava3_s = None
    if recipe.llava2_steps > 0:  # continued from stage 1 on the positioned tower, relation comparison loss on
        clip_dir, clip_model = _positioned_tower(out, recipe, clip_model, log)
        llava_dir, previous = out / "llava2_fp32", llava_dir
        val_acc, llava2_s = _llava_stage("stage 2", llava_dir, clip_model, recipe, log, epochs=recipe.llava2_epochs,
                                         lr=recipe.llava2_lr, projector_lr=recipe.llava2_lr, data_seed=recipe.seed + 1,
                                         comparison_weight=recipe.comparison_weight, init_from=previous)
    if recipe.llava3_steps > 0:  # continued from the last stage on the same tower, query loss on
        llava_dir, previous = out / "llava3_fp32", llava_dir
        val_acc, llava3_s = _llava_stage("stage 3", llava_dir, clip_model, recipe, log, epochs=recipe.llava3_epochs,
                                         lr=recipe.llava3_lr, projector_lr=recipe.llava3_lr, data_seed=recipe.seed + 2,
                                         comparison_weight=recipe.comparison_weight, query_weight=recipe.query_weight,
                                         init_from=previous)
    demo_llava = export_fp16(llava_dir, out / "demo_llava", "llava")
    demo_clip = export_fp16(clip_dir, out / "demo_clip", "clip")
    meta = {
        "recipe": {k: (v.as_dict() if isinstance(v, Sizes) else v) for k, v in recipe.__dict__.items()} | {"llava_epochs": recipe.llava_epochs},
        "threads": threads,
        "clip_wall_s": clip_s,
        "llava_wall_s": llava_s,
        "llava2_wall_s": llava2_s,
        "llava3_wall_s": llava3_s,
        "val_first_turn_exact_match": val_acc,
        "torch": torch.__version__,
    }
    for d in (demo_llava, demo_clip):
        (d / "TRAINING.json").write_text(json.dumps(meta, indent=1) + "\n")
    if export_dir is not None:
        for d in (demo_llava, demo_clip):
            target = Path(export_dir) / d.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(d, target)
            log(f"exported {target}")
    log(f"total {time.time() - t0:.0f}s")
    return meta

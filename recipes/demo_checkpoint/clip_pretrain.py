"""Stage 0: CLIP-style contrastive pre-training of a small ViT (LLaVA-1.5 geometry) and a small text tower.

Images are shapes_vqa train scenes rendered on the fly; texts are their generated captions. The loss is CLIP's
symmetric InfoNCE with a learnable temperature, plus NegCLIP-style hard negatives (the caption of the same scene
with one object's colour / shape / word changed, or two colours swapped) as extra text columns, so the image
embedding has to bind attributes to objects. Most steps drop a random 75% of the patches (FLIP), which makes
pre-training ~5x cheaper; the last steps see all 576 patches, as LLaVA will.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..shapes_vqa import caption, sample_scene
from ..shapes_vqa.generator import COLOURS, SHAPES, WORDS, box_patches, patch_coverage
from .common import Log, Sizes, clip_tokenizer, image_processor, scene_pixels, vision_config, vit_blocks


def hard_negative(scene, rng: random.Random):
    """The scene with one attribute changed (the image no longer matches its caption)."""
    neg = copy.deepcopy(scene)
    shapes = [o for o in neg.objects if o.kind != "text"]
    text = neg.text
    choice = rng.random()
    if text is not None and choice < 0.2:
        text.word = rng.choice([w for w in WORDS if w != text.word])
    elif len(shapes) >= 2 and choice < 0.45 and len({o.colour for o in shapes}) > 1:
        a, b = rng.sample([o for o in shapes], 2)
        while a.colour == b.colour:
            a, b = rng.sample(shapes, 2)
        a.colour, b.colour = b.colour, a.colour
    elif shapes:
        o = rng.choice(shapes)
        if rng.random() < 0.5:
            o.colour = rng.choice([c for c in COLOURS if c != o.colour])
        else:
            o.kind = rng.choice([s for s in SHAPES if s != o.kind])
    else:
        neg.background = "plain" if neg.background == "cluttered" else "cluttered"
    return neg


def build_clip(sizes: Sizes, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    vision = vision_config(sizes)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.text_width,
        "intermediate_size": 4 * sizes.text_width,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": sizes.projection_dim,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.projection_dim)
    return CLIPModel(config)


def image_embeds(model, pix: torch.Tensor, keep: Optional[int], return_tokens: bool = False):
    """Image embeddings with (FLIP) a random subset of ``keep`` patches, CLS always kept.

    ``return_tokens``: also the last block's patch outputs [B, K, D], their patch indices [B, K] (0..575) and the
    penultimate block's patch outputs [B, K, D] (what LLaVA feeds its projector).
    """
    vm = model.vision_model
    emb = vm.embeddings(pix)
    b, n = emb.shape[0], emb.shape[1] - 1
    idx = torch.arange(n).expand(b, n)
    if keep is not None and keep < n:
        idx = torch.rand(b, n).argsort(dim=1)[:, :keep].sort(dim=1).values
        emb = torch.cat([emb[:, :1], emb.gather(1, (idx + 1)[..., None].expand(-1, -1, emb.shape[-1]))], dim=1)
    penultimate = vit_blocks(vm.encoder.layers[:-1], vm.pre_layrnorm(emb))
    h = vit_blocks(vm.encoder.layers[-1:], penultimate)
    pooled = model.visual_projection(vm.post_layernorm(h[:, 0]))
    return (pooled, h[:, 1:], idx, penultimate[:, 1:]) if return_tokens else pooled


SHAPE_PHRASES = tuple(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c in COLOURS for k in SHAPES)
WORD_PHRASES = tuple(f'the word "{w}"' for w in WORDS)


def patch_targets(scenes, min_cover: float = 0.2):
    """Dense labels for :func:`patch_loss`: (image, patch, shape-phrase index) for every patch a shape covers by
    at least ``min_cover`` (always its best-covered patch, so small shapes count), and per word (image, patches,
    word index)."""
    shape_rows, words = [], []
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            if o.kind == "text":
                words.append((b, torch.tensor(box_patches(o)), WORDS.index(o.word)))
                continue
            cov = patch_coverage(o)
            best = max(c for _, c in cov)
            label = list(COLOURS).index(o.colour) * len(SHAPES) + SHAPES.index(o.kind)  # == SHAPE_PHRASES order
            shape_rows += [(b, p, label) for p, c in cov if c >= min_cover or c == best]
    return shape_rows, words


def keep_targets(targets, idx: torch.Tensor):
    """:func:`patch_targets` restricted to the kept patches (FLIP), re-indexed into the kept-token tensor."""
    shape_rows, words = targets
    b, k = idx.shape
    pos = torch.full((b, 576), -1, dtype=torch.long)
    pos.scatter_(1, idx, torch.arange(k).expand(b, k))
    shape_rows = [(i, int(pos[i, p]), y) for i, p, y in shape_rows if pos[i, p] >= 0]
    kept_words = []
    for i, patches, y in words:
        sel = pos[i, patches]
        if (sel >= 0).any():
            kept_words.append((i, sel[sel >= 0], y))
    return shape_rows, kept_words


def patch_loss(model, tokenizer, tokens: torch.Tensor, targets) -> torch.Tensor:
    """Dense region-level CLIP loss: EVERY patch a shape covers, through ``visual_projection``, against the 30
    colour-shape phrases (and each word's mean patch against the 16 word phrases). Why: a global caption loss
    teaches colour but barely shape (a linear probe read shape at 55% from object features); LLaVA's LLM and
    Recoverable Compression's text-patch similarity both need each object's own patches to say what it is."""
    shape_rows, words = targets
    scale = model.logit_scale.exp().clamp(max=100)
    txt = F.normalize(text_embeds(model, tokenizer, SHAPE_PHRASES + WORD_PHRASES), dim=-1)
    losses = []
    if shape_rows:
        b, p, y = (torch.tensor(v) for v in zip(*shape_rows))
        feats = F.normalize(model.visual_projection(tokens[b, p]), dim=-1)
        losses.append(F.cross_entropy(scale * feats @ txt[: len(SHAPE_PHRASES)].T, y))
    if words:
        feats = torch.stack([tokens[b, p].mean(0) for b, p, _ in words])
        feats = F.normalize(model.visual_projection(feats), dim=-1)
        y = torch.tensor([w for _, _, w in words])
        losses.append(F.cross_entropy(scale * feats @ txt[len(SHAPE_PHRASES):].T, y))
    return sum(losses) / len(losses)


def text_embeds(model, tokenizer, texts) -> torch.Tensor:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    out = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return model.text_projection(out.pooler_output)


def pretrain_clip(
    out_dir: Path,
    sizes: Sizes,
    *,
    steps: int = 300,
    full_steps: int = 30,
    batch_size: int = 32,
    keep: int = 144,
    lr: float = 1e-3,
    seed: int = 0,
    patch_weight: float = 0.0,
    init_from: Optional[Path] = None,
    first_scene: int = 0,
    save_every: Optional[int] = None,
    log: Optional[Log] = None,
):
    """Train and save a CLIPModel (+ CLIPProcessor) to ``out_dir``; return the model.

    ``patch_weight`` > 0 adds :func:`patch_loss` (on the kept patches); ``init_from`` continues an earlier run (fresh schedule) on
    scenes from ``first_scene`` on.
    """
    from transformers import CLIPModel

    log = log or Log()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = clip_tokenizer()
    if init_from is not None:
        model = CLIPModel.from_pretrained(init_from, dtype=torch.float32).train()
        log(f"CLIP: continuing from {init_from}")
    else:
        model = build_clip(sizes, tok).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    total = steps + full_steps
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    next_scene = first_scene
    for step in range(total):
        scenes = [sample_scene("train", next_scene + i) for i in range(batch_size)]
        next_scene += batch_size
        pix = scene_pixels(scenes)
        caps = [caption(s, rng) for s in scenes]
        negs = [caption(hard_negative(s, rng), rng) for s in scenes]
        img, tokens, idx, pen_tokens = image_embeds(model, pix, keep if step < steps else None, return_tokens=True)
        img = F.normalize(img, dim=-1)
        txt = F.normalize(text_embeds(model, tok, caps + negs), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T  # [B, 2B]: own caption, other captions, hard negatives
        target = torch.arange(batch_size)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch_size].T, target))
        dense = None
        if patch_weight > 0:
            targets = keep_targets(patch_targets(scenes), idx)
            # last block as is (Recoverable Compression's text-patch similarity); penultimate block (LLaVA's features)
            # centred per image: its large common component would otherwise swamp the cosine (the LLaVA projector
            # has a bias and removes it anyway)
            centred = pen_tokens - pen_tokens.mean(dim=1, keepdim=True)
            dense = 0.5 * (patch_loss(model, tok, tokens, targets) + patch_loss(model, tok, centred, targets))
            loss = loss + patch_weight * dense
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = (logits.argmax(1) == target).float().mean().item()
            hard = (logits[target, target] > logits[target, target + batch_size]).float().mean().item()
        if step % 10 == 0 or step == total - 1:
            log(f"clip step {step}/{total} loss {loss.item():.3f} dense {(dense.item() if dense is not None else 0):.3f} i2t-acc {acc:.2f} hard-neg-acc {hard:.2f} scale {scale.item():.1f}"
                f"{'' if step < steps else ' (all patches)'}")
        if save_every and (step + 1) % save_every == 0 and step < total - 1:
            _save_clip(model, tok, Path(str(out_dir) + "_partial"))
    _save_clip(model, tok, Path(out_dir))
    return model.eval()


def _save_clip(model, tok, out_dir: Path) -> None:
    from transformers import CLIPProcessor

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(out_dir)
    model.train()

"""Stage 1+2 in one: with the contrastively trained ViT frozen, train the 2-layer MLP projector and a small Llama
on shapes_vqa train questions in LLaVA-1.5's vicuna_v1 format, loss on the answers only.

The frozen ViT's penultimate features (LLaVA's ``vision_feature_layer=-2``, CLS dropped) are computed once and
cached. A training sequence is one scene as a multi-turn conversation, as in LLaVA-1.5's instruction data::

    <s>{system} USER: <image>\\n{q1}\\nAnswer the question using a single word or phrase. ASSISTANT: {a1}</s>
    USER: {q2}\\nAnswer the question using a single word or phrase. ASSISTANT: {a2}</s> ...

The first turn is token-for-token what ``prompt_style=llava_v1`` sends at evaluation time (checked).
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lmms_tokprune.llava.prompts import llava_v1_prompt
from lmms_tokprune.testing.tiny import NUM_PATCHES, llama_text_config

from ..shapes_vqa import POST_PROMPT, caption, sample_scene, scene_questions
from ..shapes_vqa.generator import box_patches
from .attention_rows import AttentionRows
from .common import Log, Sizes, llama_tokenizer, penultimate_tokens, scene_pixels, vision_config
from .grounding import GroundedRow, asked_words, attention_groups, attention_loss, canonical_relation, object_words, readout_loss

CAPTION_PROMPT = "Describe the image briefly."


def build_llava(sizes: Sizes, tok, clip_model):
    """A LlavaForConditionalGeneration whose vision tower is ``clip_model``'s ViT (weights copied)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = dict(vision_config(sizes), model_type="clip_vision_model")
    text_config = llama_text_config(tok, sizes.llm_width, sizes.llm_intermediate, sizes.llm_layers, sizes.llm_heads)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=NUM_PATCHES,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    model = LlavaForConditionalGeneration(config).float()
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    src = clip_model.vision_model
    missing, unexpected = tower.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"vision tower mismatch: missing={missing} unexpected={unexpected}")
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model


@torch.inference_mode()
def penultimate_features(model, pix: torch.Tensor) -> torch.Tensor:
    """[B, 576, D] = LLaVA's image features before the projector (penultimate block, CLS dropped)."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    return penultimate_tokens(vm, pix)[:, 1:]


def tower_fingerprint(model) -> str:
    """Short hash of the vision tower's weights: a feature cache is only reused for the ViT that made it."""
    import hashlib

    h = hashlib.sha1()
    for name, t in sorted(model.model.vision_tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def cache_features(model, split: str, n: int, batch: int = 32, log: Optional[Log] = None) -> torch.Tensor:
    feats = []
    for start in range(0, n, batch):
        scenes = [sample_scene(split, i) for i in range(start, min(n, start + batch))]
        feats.append(penultimate_features(model, scene_pixels(scenes)).to(torch.float16))
        if log and (start // batch) % 20 == 0:
            log(f"cached {split} features {start + len(scenes)}/{n}")
    return torch.cat(feats)


class Conversations:
    """Token ids / labels of multi-turn conversations about one scene (first turn == the eval prompt)."""

    def __init__(self, tok):
        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self._cache: Dict[str, List[int]] = {}

    def _ids(self, text: str, bos: bool = False) -> List[int]:
        key = f"{int(bos)}|{text}"
        if key not in self._cache:
            self._cache[key] = self.tok(text, add_special_tokens=bos).input_ids
        return self._cache[key]

    def first_prompt_ids(self, question: str) -> List[int]:
        """The eval prompt (one <image> placeholder, expanded to 576 image tokens)."""
        ids = self._ids(llava_v1_prompt(question + POST_PROMPT, 1), bos=True)
        out: List[int] = []
        for i in ids:
            out.extend([self.image_id] * NUM_PATCHES if i == self.image_id else [i])
        return out

    def build(self, qa: Sequence[tuple]) -> Tuple[List[int], List[int]]:
        """Turns are (question, answer) with the short-answer instruction, or (question, answer, "") without it."""
        row = self.build_grounded(qa)
        return row.ids, row.labels

    def build_grounded(self, qa: Sequence[tuple], objects: Sequence = (), word_id=None) -> GroundedRow:
        """As :meth:`build`, plus grounding targets: a turn's optional 4th item is the object groups its answer
        should attend to (:func:`grounding.attention_groups`; an empty group = the sink ``<s>``, position 0),
        its optional 5th the word its answer position's middle layers should say (:func:`grounding.canonical_relation`),
        its optional 6th the words its answer position's layers before the last should say (:func:`grounding.asked_words`);
        with ``objects`` (and ``word_id``: word -> token id), every object patch's image token gets readout words."""
        row = GroundedRow([], [])
        image_start = None
        for turn, item in enumerate(qa):
            q, a = item[0], item[1]
            post = item[2] if len(item) > 2 else POST_PROMPT
            groups = item[3] if len(item) > 3 else ()
            comparison = item[4] if len(item) > 4 else None
            asked = item[5] if len(item) > 5 else ()
            if turn == 0:
                prompt = self._ids(llava_v1_prompt(q + post, 1), bos=True)
                if self.image_id in prompt:
                    image_start = len(row.ids) + prompt.index(self.image_id)
                prompt = [t for i in prompt for t in ([i] * NUM_PATCHES if i == self.image_id else [i])]
            else:
                prompt = self._ids(f"USER: {q}{post} ASSISTANT:")
            ans = self._ids(a) + [self.tok.eos_token_id]
            row.ids += prompt
            row.labels += [-100] * len(prompt)
            if groups and image_start is not None:
                tokens = [[image_start + p for o in g for p in box_patches(o)] if g else [0] for g in groups]
                row.targets.append((len(row.ids) - 1, tokens))
            if comparison is not None:
                row.comparisons.append((len(row.ids) - 1, self._ids(comparison)[0]))
            row.asked += [(len(row.ids) - 1, self._ids(w)[0]) for w in asked]
            row.ids += ans
            row.labels += ans
        if objects and image_start is not None:
            row.readouts = [(image_start + p, w) for p, ws in object_words(objects, word_id).items() for w in ws]
        return row


@torch.no_grad()
def whiten_projector_input(projector, feats: torch.Tensor, sample: int = 500) -> None:
    """Data-dependent init of the projector's first layer: fold the per-channel mean/std of the ViT features in.

    Why: the frozen ViT's patch features share a large common component (token norm ~21, spread between the
    patches of one image ~1.4), so with a default init every image token looks alike to the LLM, attention
    over the 576 tokens stays uniform and the LLM learns the answer prior instead of looking. Folding the
    statistics into ``linear_1`` keeps the standard mlp2x_gelu projector (same weights file) and makes its
    input zero-mean unit-variance per channel at step 0.
    """
    x = feats[:sample].float().reshape(-1, feats.shape[-1])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    lin = projector.linear_1
    lin.weight.mul_(1.0 / std[None])
    if lin.bias is not None:
        lin.bias.sub_(lin.weight @ mean)


def _embed(model, ids: torch.Tensor, feats: torch.Tensor, image_id: int) -> torch.Tensor:
    """Token embeddings with the projected image features in the <image> slots (one image per row)."""
    emb = model.model.get_input_embeddings()(ids)
    proj = model.model.multi_modal_projector(feats.float())  # [B, 576, H]
    mask = ids == image_id
    emb = emb.masked_scatter(mask[..., None], proj.to(emb.dtype))
    return emb


def _batch(rows: List[Tuple[List[int], List[int]]], pad_id: int):
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return ids, labels, att


def _loss(model, ids, labels, att, feats, image_id):
    emb = _embed(model, ids, feats, image_id)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=att)
    logits = model.lm_head(out.last_hidden_state[:, :-1])
    tgt = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    return loss, logits, tgt


class LayerOutputs:
    """Context manager: ``outputs[i]`` = the output hidden states of decoder layer ``i`` (for the readout loss)."""

    def __init__(self, language_model):
        self.layers = language_model.layers
        self.outputs: List[torch.Tensor] = []
        self._handles: List = []

    def __enter__(self) -> "LayerOutputs":
        def hook(module, args, output):
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

        self._handles = [layer.register_forward_hook(hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def _grounded_step(model, rows: List[GroundedRow], feats, image_id, pad_id, grounding_weight: float, readout_weight: float,
                   comparison_weight: float = 0.0, query_weight: float = 0.0):
    """Answer loss + the grounding losses (grounding.py) of one batch; returns (total, parts for the log)."""
    ids, labels, att = _batch([(r.ids, r.labels) for r in rows], pad_id)
    queries = [(j, q, tg) for j, r in enumerate(rows) for q, tg in r.targets]
    lm = model.model.language_model
    n_layers = model.config.text_config.num_hidden_layers
    layers = list(range(1, n_layers))
    readouts = [(j, t, w) for j, r in enumerate(rows) for t, w in r.readouts]
    readout_on = readout_weight > 0 and bool(readouts)
    comparisons = [(j, t, w) for j, r in enumerate(rows) for t, w in r.comparisons]
    middle = slice(1, n_layers - 1)  # after the grounded heads' first layer, before the answer layer
    compare_on = comparison_weight > 0 and bool(comparisons) and n_layers > 2
    ground_on = grounding_weight > 0 and bool(queries) and bool(layers)
    asked = [(j, t, w) for j, r in enumerate(rows) for t, w in r.asked]
    before_answer = slice(0, n_layers - 1)  # the layers whose outputs form head 0's queries
    query_on = query_weight > 0 and bool(asked) and n_layers > 1
    parts: Dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        captured = outputs = None
        if ground_on:
            b = torch.tensor([j for j, _, _ in queries])
            q = torch.tensor([q for _, q, _ in queries])
            groups = max(len(tg) for _, _, tg in queries)
            masks = torch.zeros(len(queries), groups, ids.shape[1])
            for n, (_, _, tg) in enumerate(queries):
                for g, tokens in enumerate(tg):
                    masks[n, g, tokens] = 1.0
            captured = stack.enter_context(AttentionRows(lm, layers, b, q))
        if readout_on or compare_on or query_on:
            outputs = stack.enter_context(LayerOutputs(lm))
        loss, _, _ = _loss(model, ids, labels, att, feats, image_id)
    total = loss
    if captured is not None:
        ground = attention_loss(captured.rows, masks)
        parts["ground"] = ground.item()
        total = total + grounding_weight * ground
    if readout_on:
        ro = readout_loss(model.lm_head, lm.norm, outputs.outputs, readouts)
        parts["readout"] = ro.item()
        total = total + readout_weight * ro
    if compare_on:
        cmp = readout_loss(model.lm_head, lm.norm, outputs.outputs[middle], comparisons)
        parts["compare"] = cmp.item()
        total = total + comparison_weight * cmp
    if query_on:
        qry = readout_loss(model.lm_head, lm.norm, outputs.outputs[before_answer], asked)
        parts["query"] = qry.item()
        total = total + query_weight * qry
    parts["answer"] = loss.item()
    return total, parts


@torch.inference_mode()
def first_turn_accuracy(model, conv: Conversations, feats: torch.Tensor, items: List[dict], batch: int = 16) -> Dict[str, float]:
    """Teacher-forced exact match of the answer (+ </s>) on the FIRST turn, per family (== greedy exact match)."""
    model.eval()
    hits: Dict[str, List[float]] = {}
    rows, fams, idx = [], [], []
    for it in items:
        for fam, q, a in it["questions"]:
            rows.append(conv.build([(q, a)]))
            fams.append(fam)
            idx.append(it["row"])
    for s in range(0, len(rows), batch):
        ids, labels, att = _batch(rows[s : s + batch], conv.tok.pad_token_id)
        _, logits, tgt = _loss(model, ids, labels, att, feats[idx[s : s + batch]], conv.image_id)
        ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(dim=1)
        for f, v in zip(fams[s : s + batch], ok.tolist()):
            hits.setdefault(f, []).append(float(v))
    model.train()
    res = {f: sum(v) / len(v) for f, v in sorted(hits.items())}
    res["mean"] = sum(res.values()) / len(res)
    return res


def train_llava(
    clip_model,
    out_dir: Path,
    sizes: Sizes,
    *,
    n_scenes: int = 4000,
    n_val: int = 200,
    epochs: float = 2.0,
    batch_size: int = 8,
    lr: float = 1e-3,
    projector_lr: Optional[float] = None,
    seed: int = 0,
    caption_prob: float = 0.5,
    per_family: int = 2,
    whiten: bool = True,
    curriculum: Sequence[Tuple[int, int]] = (),
    grounding_weight: float = 0.0,
    readout_weight: float = 0.0,
    comparison_weight: float = 0.0,
    query_weight: float = 0.0,
    cache_dir: Optional[Path] = None,
    init_from: Optional[Path] = None,
    data_seed: Optional[int] = None,
    save_every: Optional[int] = None,
    stop_after: Optional[int] = None,
    log: Optional[Log] = None,
):
    """Train projector + LLM on cached features; save the LLaVA checkpoint + processor to ``out_dir``.

    ``init_from``: continue from an earlier run's LLaVA folder (same sizes and tokenizer) with a fresh schedule;
    its projector and LLM are loaded, the vision tower stays ``clip_model``'s (which may differ: positions.py);
    ``data_seed`` (default ``seed``) then gives that continuation its own question order.
    ``stop_after``: end after this many steps of the (longer) schedule.
    ``projector_lr``: the projector's own learning rate (LLaVA trains it at a higher rate than the LLM);
    ``per_family``: questions per family in each training conversation (the image is paid for once per scene).
    ``curriculum``: ``((until_step, max_shapes), ...)``: before ``until_step`` only scenes with at most
    ``max_shapes`` shapes. Why: with one object, any look at the image answers "What colour is the star?", so
    the LLM first learns to read object features; selecting the named object among many comes after. Without
    it the LLM sat on the answer prior for 900+ steps.
    ``grounding_weight`` / ``readout_weight`` / ``comparison_weight`` / ``query_weight``: the auxiliary losses of grounding.py
    (0 = answers only).
    """

    log = log or Log()
    torch.manual_seed(seed)
    rng = random.Random(seed if data_seed is None else data_seed)
    tok = llama_tokenizer()
    model = build_llava(sizes, tok, clip_model)
    if init_from is not None:
        from transformers import LlavaForConditionalGeneration

        prev = LlavaForConditionalGeneration.from_pretrained(init_from, dtype=torch.float32)
        state = {k: v for k, v in prev.state_dict().items() if ".vision_tower." not in f".{k}"}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if ".vision_tower." not in f".{m}"]:
            raise RuntimeError(f"init_from {init_from}: missing={missing} unexpected={unexpected}")
        log(f"initialised from {init_from}")
        del prev
    model.model.vision_tower.requires_grad_(False)
    conv = Conversations(tok)
    word_id = lambda w: conv._ids(w)[0]  # noqa: E731 - the answer's first token ("red" -> "▁red")

    cache = Path(cache_dir) / f"features_{n_scenes}_{n_val}_{tower_fingerprint(model)}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        blob = torch.load(cache)
        train_feats, val_feats = blob["train"], blob["val"]
        log(f"loaded cached features {cache}")
    else:
        train_feats = cache_features(model, "train", n_scenes, log=log)
        val_feats = cache_features(model, "val", n_val, log=log)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"train": train_feats, "val": val_feats}, cache)
    log(f"features: train {tuple(train_feats.shape)} val {tuple(val_feats.shape)}")
    if init_from is None and whiten:
        whiten_projector_input(model.model.multi_modal_projector, train_feats)

    val_items = []
    for i in range(n_val):
        scene = sample_scene("val", i)
        qs = scene_questions(scene, random.Random(scene.rng_state + 1), per_family=2)
        val_items.append({"row": i, "questions": [(q.family, q.question, q.answer) for q in qs]})

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if "multi_modal_projector" not in n], "lr": lr},
              {"params": [p for n, p in named if "multi_modal_projector" in n], "lr": projector_lr or lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
    steps = int(math.ceil(epochs * n_scenes / batch_size))
    warm = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    order: List[int] = []
    n_shapes = [len(sample_scene("train", i).shapes) for i in range(n_scenes)] if curriculum else []
    stage = None
    model.train()
    last = steps if stop_after is None else min(steps, stop_after)
    for step in range(last):
        max_shapes = next((m for until, m in curriculum if step < until), None)
        if max_shapes != stage:  # a new curriculum stage: draw from its scenes only
            stage, order = max_shapes, []
            log(f"llava step {step}: scenes with {'any number of' if stage is None else f'at most {stage}'} shapes")
        if len(order) < batch_size:
            perm = [i for i in range(n_scenes) if stage is None or n_shapes[i] <= stage]
            if not perm:
                raise ValueError(f"curriculum: none of the {n_scenes} training scenes has at most {stage} shapes; "
                                 "use more scenes or a looser curriculum")
            rng.shuffle(perm)
            order += perm
        rows_idx, order = order[:batch_size], order[batch_size:]
        rows = []
        for i in rows_idx:
            scene = sample_scene("train", i)
            turns = [(q.question, q.answer, POST_PROMPT, attention_groups(q), canonical_relation(q) if comparison_weight > 0 else None,
                      asked_words(q) if query_weight > 0 else ())
                     for q in scene_questions(scene, rng, per_family=per_family)]
            if rng.random() < caption_prob:  # a description turn (LLaVA's detail data in miniature): dense grounding signal
                turns.append((CAPTION_PROMPT, caption(scene, rng), ""))
            rng.shuffle(turns)
            rows.append(conv.build_grounded(turns, scene.objects if readout_weight > 0 else (), word_id))
        total, parts = _grounded_step(model, rows, train_feats[rows_idx], conv.image_id, tok.pad_token_id,
                                      grounding_weight, readout_weight, comparison_weight, query_weight)
        loss = total
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"llava step {step}/{steps} loss {loss.item():.4f} ({' '.join(f'{k} {v:.3f}' for k, v in parts.items())}) "
                f"lr {sched.get_last_lr()[0]:.2e}")
        if (step + 1) % 300 == 0 or step == last - 1:
            acc = first_turn_accuracy(model, conv, val_feats, val_items)
            log("val first-turn exact match: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        if save_every and (step + 1) % save_every == 0 and step < last - 1:
            _save(model, tok, Path(str(out_dir) + "_partial"))
            log(f"saved step {step + 1} to {out_dir}_partial")
    _save(model, tok, Path(out_dir))
    return model, acc


def _save(model, tok, out_dir: Path) -> None:
    from lmms_tokprune.testing.tiny import llava_processor

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    llava_processor(tok).save_pretrained(out_dir)
    model.train()

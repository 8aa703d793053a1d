"""CLIP text guidance for Recoverable Compression: text tower + projections, no second vision tower.

The visual side reuses LLaVA's own CLIP forward (the last block output); only the text tower,
`text_projection` and the `visual_projection` weight are loaded from `text_encoder`.

text_source=question (default): the question of each sample (placeholder and answer-format
instructions removed), standard CLIP pooling at EOS with an attention mask, max_length 77 —
longer questions are truncated to 77 CLIP tokens (CLIP's context size) with a warning.
text_source=reference: the released code's behaviour — the first line of the prompt (under
vicuna_v1 the system prompt), max_length 20, padded, no attention mask, pooled at the last
position, and sample 0's text for the whole batch.
"""

from __future__ import annotations

import os
from typing import Any, List, Sequence, Tuple

import torch
from loguru import logger

from .checkpoint_files import check_tokenizer_files, check_weight_files, looks_like_path, quiet_transformers
from .prompts import IMAGE_PLACEHOLDER, question_text

# What the released CDPruner loader removes from a question (model_vqa_loader.py); other instructions stay.
CDPRUNER_STRIPPED = "\nAnswer the question using a single word or phrase."


def cdpruner_text(context: str) -> str:
    """The question CDPruner conditions on: the lmms-eval context minus the image placeholder and minus exactly
    the single-word answer instruction (no other change: the released loader does not strip whitespace)."""
    return context.replace(IMAGE_PLACEHOLDER, "").replace(CDPRUNER_STRIPPED, "")

REFERENCE_MAX_LENGTH = 20
CLIP_MAX_LENGTH = 77


def _load_visual_projection(path: str) -> torch.Tensor:
    """Read only `visual_projection.weight` from a CLIPModel checkpoint (local folder or hub id)."""
    from transformers.utils import cached_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        except Exception:
            file = None
        if not file:
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as fh:
                if "visual_projection.weight" in fh.keys():
                    return fh.get_tensor("visual_projection.weight")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            if "visual_projection.weight" in state:
                return state["visual_projection.weight"]
    raise ValueError(f"text_encoder={path!r} has no visual_projection weight (a full CLIPModel checkpoint is needed)")


class TextGuide:
    """Embeds question texts with CLIP's text tower; hands out the visual projection weight."""

    def __init__(self, text_model: torch.nn.Module, tokenizer: Any, visual_projection: torch.Tensor, source: str) -> None:
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.visual_projection = visual_projection
        self.source = source
        self._warned = False

    @property
    def device(self) -> torch.device:
        return self.visual_projection.device

    def texts_for(self, contexts: Sequence[str], prompts: Sequence[str]) -> List[str]:
        """One text per image: its question, or (reference) the first prompt line of sample 0."""
        if self.source == "reference":
            return [prompts[0].split("\n")[0]] * len(prompts)
        return [question_text(c) for c in contexts]

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, Dt] text embeddings after text_projection, and the [Dt, D] visual projection."""
        if self.source == "reference":
            enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=REFERENCE_MAX_LENGTH, return_tensors="pt")
            out = self.text_model(input_ids=enc["input_ids"].to(self.device))
            pooled = out.last_hidden_state[:, -1]  # after final_layer_norm; last position, pads included
            embeds = self.text_model.text_projection(pooled)
        else:
            enc = self.tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
            if enc["input_ids"].shape[1] > CLIP_MAX_LENGTH:
                if not self._warned:
                    logger.warning(f"question text longer than {CLIP_MAX_LENGTH} CLIP tokens: truncated for text guidance")
                    self._warned = True
                enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt")
            out = self.text_model(input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device))
            embeds = out.text_embeds
        return embeds, self.visual_projection

    @torch.inference_mode()
    def segments(self, texts: Sequence[str]) -> List[torch.Tensor]:
        """CDPruner's text: per text, one text_embeds row per 77-token segment of its CLIP tokens.

        Tokenised without truncation or padding (BOS ... EOS); the ids are right-padded with 0 (mask 0) to a
        multiple of 77 and the rows of 77 run through the text tower with projection, as the released loader
        does; pooling is transformers' for the checkpoint's text config (the openai configs carry the legacy
        eos id: each row pools at its highest token id). float32.
        """
        out = []
        for text in texts:
            ids = self.tokenizer(text, padding=False, truncation=False)["input_ids"]
            rows = -(-len(ids) // CLIP_MAX_LENGTH)
            padded = torch.zeros(rows * CLIP_MAX_LENGTH, dtype=torch.long)
            mask = torch.zeros_like(padded)
            padded[: len(ids)] = torch.tensor(ids)
            mask[: len(ids)] = 1
            embeds = self.text_model(input_ids=padded.view(rows, CLIP_MAX_LENGTH).to(self.device),
                                     attention_mask=mask.view(rows, CLIP_MAX_LENGTH).to(self.device)).text_embeds
            out.append(embeds.float())
        return out


def load_text_guide(text_encoder: str, llava_model: torch.nn.Module, device: torch.device, source: str = "question") -> TextGuide:
    """Load the CLIP text tower at model-load time, so a missing encoder fails before any request."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from ..assets import resolve_checkpoint

    text_encoder = resolve_checkpoint(text_encoder, kind="clip")
    path = os.path.expanduser(text_encoder)
    if looks_like_path(text_encoder) and not os.path.isdir(path):
        raise ValueError(f"text_encoder folder {text_encoder!r} does not exist")
    from transformers import AutoConfig

    check_weight_files(path, f"text_encoder={text_encoder!r}")
    check_tokenizer_files(path, f"text_encoder={text_encoder!r}")
    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "model_type", None) != "clip":
            raise ValueError(f"it is a {getattr(config, 'model_type', 'unknown')!r} checkpoint, not a CLIPModel (text tower + projections)")
        with quiet_transformers():  # its LOAD REPORT lists the vision tower's keys, which a text model leaves out on purpose
            text_model, info = CLIPTextModelWithProjection.from_pretrained(path, output_loading_info=True)
        if info.get("missing_keys"):  # never run a randomly initialised text tower
            raise ValueError(f"its weights lack {len(info['missing_keys'])} text-tower tensors (e.g. {sorted(info['missing_keys'])[0]})")
        tokenizer = AutoTokenizer.from_pretrained(path)
        visual_projection = _load_visual_projection(path)
    except Exception as err:
        raise ValueError(
            f"cannot load the CLIP text encoder text_encoder={text_encoder!r} needed by recover: {str(err).splitlines()[0]}"
        ) from None
    width = llava_model.config.vision_config.hidden_size
    if visual_projection.shape[1] != width:
        raise ValueError(f"text_encoder {text_encoder!r} projects {visual_projection.shape[1]}-d vision states; LLaVA's CLIP is {width}-d")
    # float32 whatever the LLaVA dtype: CLIP signals are computed in fp32 (the CDPruner release loads its text tower
    # and visual_projection in fp32; the text tower is small)
    text_model.to(device=device, dtype=torch.float32).eval()
    return TextGuide(text_model, tokenizer, visual_projection.to(device=device, dtype=torch.float32), source)

"""The one table of methods and model ids (torch-free: the leaderboard, the entry points and the CLI read it
without importing torch).

Adding a method is one line in ``METHODS`` plus its module under ``lmms_tokprune/methods/``. Everything else
is derived from this table: the registry's names, stages and variants, the lmms-eval model ids and their
entry-point manifests, the preset model classes, the demo's default method list and the leaderboard's labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# Where a method acts (what it computes lives in its module).
STAGE_PRE_PROJECTOR = "pre_projector"  # on captured CLIP states, before the projector
STAGE_IN_LLM = "in_llm"  # cuts at decoder layer boundaries (the one decoder loop)
STAGE_IN_CLIP_AND_LLM = "in_clip_and_llm"  # also prunes inside CLIP and inside the LLM
STAGES = (STAGE_PRE_PROJECTOR, STAGE_IN_LLM, STAGE_IN_CLIP_AND_LLM)

# What a method is to a comparison.
FAMILY_BASELINE = "baseline"  # every comparison needs them in the same harness
FAMILY_SEED = "seed"  # the three seed papers (shared/METHODS.md)
FAMILY_PEER = "peer"  # the standard set every new method is compared with (shared/PEERS.md)
FAMILIES = (FAMILY_BASELINE, FAMILY_SEED, FAMILY_PEER)

BOTH_VARIANTS = ("fixed", "reference")
GENERIC_MODEL_ID = "llava_tokprune"  # any method, chosen with method=


@dataclass(frozen=True)
class MethodEntry:
    """One method: its name, the module under ``methods/`` that implements it, where it acts, its family,
    the variants it accepts (the first is the default), the lmms-eval model id that presets it (if any), and whether
    its released evaluation casts the CLIP tower to fp16 (the LLaVA 1.1.x forks' `load_pretrained_model` does so
    unconditionally; LLaVA >= 1.2 never casts it), which `vision_dtype=auto` reproduces for `reference`."""

    name: str
    module: str
    stage: str = STAGE_PRE_PROJECTOR
    family: str = FAMILY_BASELINE
    variants: Tuple[str, ...] = BOTH_VARIANTS
    model_id: Optional[str] = None
    release_half_tower: bool = False


METHODS: Tuple[MethodEntry, ...] = (
    MethodEntry("none", "baselines"),
    MethodEntry("random", "baselines"),
    MethodEntry("topk_cls", "baselines"),
    MethodEntry("spatial", "baselines"),
    MethodEntry("prumerge", "prumerge", family=FAMILY_SEED, model_id="llava_prumerge", release_half_tower=True),
    MethodEntry("prumerge_plus", "prumerge", family=FAMILY_SEED, model_id="llava_prumerge_plus", release_half_tower=True),
    MethodEntry("recover", "recover", family=FAMILY_SEED, model_id="llava_recover", release_half_tower=True),
    MethodEntry("longtail", "longtail", stage=STAGE_IN_CLIP_AND_LLM, family=FAMILY_SEED, variants=("fixed",), model_id="llava_longtail"),
    MethodEntry("visionzip", "visionzip", family=FAMILY_PEER, model_id="llava_visionzip"),
    MethodEntry("vispruner", "vispruner", family=FAMILY_PEER, model_id="llava_vispruner"),
    MethodEntry("fastervlm", "vispruner", family=FAMILY_PEER, model_id="llava_fastervlm"),
    MethodEntry("divprune", "divprune", family=FAMILY_PEER, model_id="llava_divprune"),
    MethodEntry("cdpruner", "cdpruner", family=FAMILY_PEER, model_id="llava_cdpruner"),
    MethodEntry("fastv", "fastv", stage=STAGE_IN_LLM, family=FAMILY_PEER, model_id="llava_fastv", release_half_tower=True),
    MethodEntry("pdrop", "pdrop", stage=STAGE_IN_LLM, family=FAMILY_PEER, model_id="llava_pdrop"),
    MethodEntry("dart", "dart", stage=STAGE_IN_LLM, family=FAMILY_PEER, model_id="llava_dart"),
    MethodEntry("sparsevlm", "sparsevlm", stage=STAGE_IN_LLM, family=FAMILY_PEER, model_id="llava_sparsevlm"),
)

BY_NAME: Dict[str, MethodEntry] = {m.name: m for m in METHODS}


def method_entry(name: str) -> MethodEntry:
    """The entry of a method; an unknown name is a ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in BY_NAME:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def model_ids() -> Dict[str, Optional[str]]:
    """lmms-eval model id -> the method it presets (None: the generic id, method= picks it)."""
    return {GENERIC_MODEL_ID: None, **{m.model_id: m.name for m in METHODS if m.model_id is not None}}


def preset_method(model_id: str) -> Optional[str]:
    return model_ids().get(model_id)


def class_name(model_id: str) -> str:
    """The harness class of a model id: llava_prumerge_plus -> LlavaPrumergePlus (the generic one: LlavaTokPrune)."""
    if model_id == GENERIC_MODEL_ID:
        return "LlavaTokPrune"
    return "".join(part.capitalize() for part in model_id.split("_"))


def methods_of(family: str) -> Tuple[str, ...]:
    return tuple(m.name for m in METHODS if m.family == family)


@dataclass(frozen=True)
class ModelFamily:
    """A LLaVA model family: its name, the transformers `model_type` of its checkpoints (what picks it: the family is
    read from the checkpoint, never from a flag) and the adapter module under ``llava/families/``."""

    name: str
    model_type: str
    module: str
    title: str


MODEL_FAMILIES: Tuple[ModelFamily, ...] = (
    ModelFamily("llava15", "llava", "llava15", "LLaVA-1.5"),
    ModelFamily("llava_next", "llava_next", "llava_next", "LLaVA-NeXT (1.6)"),
    ModelFamily("video_llava", "video_llava", "video_llava", "Video-LLaVA"),
)


def family_of_model_type(model_type: str) -> ModelFamily:
    """The family of a transformers model_type; an unsupported one is a ValueError naming the supported ones."""
    for family in MODEL_FAMILIES:
        if family.model_type == model_type:
            return family
    supported = ", ".join(f"{f.model_type!r} ({f.title})" for f in MODEL_FAMILIES)
    raise ValueError(f"a {model_type!r} checkpoint is not a supported LLaVA family; supported model types: {supported}")

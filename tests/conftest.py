"""Shared fixtures: offline mode, 2 CPU threads, and tiny LLaVA-1.5-shaped checkpoints on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the build-time recipes/ folder beside the package (not installed)
    sys.path.insert(0, str(REPO))
TASKS_DIR = REPO / "tasks"


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A tiny random LLaVA-1.5-shaped checkpoint folder (loaded through pretrained=<folder>)."""
    from lmms_tokprune.testing.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, tiny_llava) -> Path:
    """A tiny CLIPModel (text tower + projections) matching the tiny LLaVA's vision tower."""
    from lmms_tokprune.testing.tiny import build_tiny_clip_text_encoder

    return build_tiny_clip_text_encoder(tmp_path_factory.mktemp("ckpt") / "tiny-clip", llava_dir=tiny_llava)


@pytest.fixture(scope="session")
def tiny_llava32(tmp_path_factory) -> Path:
    """The tiny LLaVA with a 32-layer LLM: methods that cut at decoder layers 2..24 run where their released layers are."""
    from lmms_tokprune.testing.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt32") / "tiny-llava-32", text_layers=32)


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory) -> Path:
    """A tiny random LLaVA-NeXT checkpoint (Llama decoder, the released anyres pinpoints)."""
    from lmms_tokprune.testing.tiny_next import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("next") / "tiny-llava-next")


@pytest.fixture(scope="session")
def tiny_next_mistral(tmp_path_factory) -> Path:
    """The tiny LLaVA-NeXT with a Mistral decoder (grouped-query attention), as llava-v1.6-mistral-7b-hf."""
    from lmms_tokprune.testing.tiny_next import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("next-mistral") / "tiny-llava-next-mistral", decoder="mistral", seed=3)


@pytest.fixture(scope="session")
def tiny_next32(tmp_path_factory) -> Path:
    """The tiny LLaVA-NeXT with a 32-layer LLM: in-LLM methods cut at their released layers."""
    from lmms_tokprune.testing.tiny_next import build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("next32") / "tiny-llava-next-32", text_layers=32)

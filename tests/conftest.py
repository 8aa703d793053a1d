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


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory) -> Path:
    """A tiny random Video-LLaVA checkpoint (image + video towers at 224 px, a 4-layer Llama decoder)."""
    from lmms_tokprune.testing.tiny_video import build_tiny_video_llava

    return build_tiny_video_llava(tmp_path_factory.mktemp("video") / "tiny-video-llava", text_layers=4)


@pytest.fixture(scope="session")
def video_clips(tmp_path_factory) -> dict:
    """Synthetic clips written with av: four good mp4s (12..24 frames), a webm, and the bad inputs of `write_bad_clips`."""
    from lmms_tokprune.testing.tiny_video import moving_shapes, write_bad_clips, write_clip

    out = tmp_path_factory.mktemp("clips")
    clips = {k: str(v) for k, v in write_bad_clips(out / "bad").items()}
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        clips[f"good{i}"] = str(write_clip(out / f"good{i}.mp4", moving_shapes(12 + 4 * i, 64, 48, colour=colour, seed=i)))
    return clips

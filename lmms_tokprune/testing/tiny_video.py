"""Tiny, offline, Video-LLaVA-shaped checkpoints (LanguageBind/Video-LLaVA-7B-hf in miniature) and synthetic clips.

``build_tiny_video_llava(d)`` writes a folder that loads through the path a real Video-LLaVA checkpoint takes
(``VideoLlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor``): two CLIP towers (``image_tower`` and
``video_tower``, 224 px, patch 14: CLS + 16 x 16 patches per image or frame), a 2-layer MLP projector shared by both,
a small Llama decoder, random weights scaled like ``tiny.build_tiny_llava``'s so greedy answers depend on the pixels,
and the tiny local Llama tokenizer with ``<image>`` and ``<video>`` added. The processor is transformers'
``VideoLlavaProcessor`` with the released preprocessing (``VideoLlavaImageProcessor`` for images,
``VideoLlavaVideoProcessor`` for the frames of a video: shortest edge 224, bicubic, centre crop 224, CLIP mean / std).

``write_clip(path, frames, fps)`` encodes frames (uint8 [T, H, W, 3]) with ``av`` (H.264 in mp4 unless the suffix
says otherwise); ``moving_shapes(...)`` draws deterministic frames (coloured shapes moving over a background);
``write_bad_clips(d)`` writes the inputs a video document can fail on (too short, not a video, truncated, a raw
H.264 stream whose container neither announces a frame count nor seeks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..offline_processors import VIDEO_CHAT_TEMPLATE, VIDEO_IMAGE_SIZE, video_llava_processor, video_tokenizer  # re-exported
from .tiny import PATCH_SIZE, TINY_HIDDEN, TINY_VERSION, _prepare_out, llama_text_config

__all__ = ["VIDEO_IMAGE_SIZE", "VIDEO_CHAT_TEMPLATE", "build_tiny_video_llava", "moving_shapes", "video_llava_processor",
           "video_tokenizer", "write_bad_clips", "write_clip"]

NUM_FRAMES = 8


def _vision_config(layers: int) -> dict:
    return {
        "model_type": "clip_vision_model", "hidden_size": TINY_HIDDEN, "intermediate_size": 2 * TINY_HIDDEN,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_channels": 3, "image_size": VIDEO_IMAGE_SIZE,
        "patch_size": PATCH_SIZE, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "projection_dim": 32,
    }


def _rescale(model, seed: int, quiet_ids: set) -> None:
    """`tiny._rescale_for_variety` for two towers: the LLM and projector redrawn at 1/sqrt(fan_in), both CLIP towers'
    q / k sharpened x4 (a peaked CLS attention with a few outliers, what PruMerge keys on), noisy pieces quietened."""
    import torch

    towers = ("model.image_tower", "model.video_tower")
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or name.startswith(towers):
                continue
            fan_in = p.shape[-1] if "embed" not in name else 1
            std = 1.0 / (fan_in**0.5) if "embed" not in name else 1.0
            if "q_proj" in name or "k_proj" in name:
                std *= 2.0
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, p in model.named_parameters():
            if name.startswith(towers) and ("q_proj" in name or "k_proj" in name):
                p.mul_(4.0)
        head = model.get_output_embeddings().weight
        head[torch.as_tensor(sorted(quiet_ids))] *= 0.05


def build_tiny_video_llava(out_dir: str | Path, *, seed: int = 0, text_layers: int = 2, vision_layers: int = 4,
                           overwrite: bool = False) -> Path:
    """Write a tiny random Video-LLaVA checkpoint (model + VideoLlavaProcessor) to ``out_dir``; return it."""
    if vision_layers < 2:
        raise ValueError(f"vision_layers must be >= 2 (vision_feature_layer=-2), got {vision_layers}")
    import torch
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    out = _prepare_out(out_dir, overwrite)
    tok = video_tokenizer()
    image_id, video_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>")
    side = VIDEO_IMAGE_SIZE // PATCH_SIZE
    text = llama_text_config(tok, TINY_HIDDEN, 2 * TINY_HIDDEN, text_layers, 4)
    text["max_position_embeddings"] = 4096  # Video-LLaVA's Vicuna context
    config = VideoLlavaConfig(
        vision_config=_vision_config(vision_layers), text_config=text, image_token_index=image_id, video_token_index=video_id,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=side * side, video_seq_length=NUM_FRAMES * (side * side + 1), multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).float().eval()
    quiet = {i for t, i in tok.get_vocab().items() if t.startswith("<0x") and t.endswith(">") and len(t) == 6}
    quiet |= {tok.unk_token_id, tok.bos_token_id, tok.pad_token_id, image_id, video_id}
    _rescale(model, seed, quiet)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    video_llava_processor(tok).save_pretrained(out)
    (out / "TINY_README.txt").write_text(f"lmms_tokprune tiny Video-LLaVA ({TINY_VERSION}), seed={seed}, text_layers={text_layers}, "
                                         f"vision_layers={vision_layers} (image and video towers); random weights, for tests only.\n")
    return out


# --------------------------------------------------------------------------------------------- clips
COLOURS: Dict[str, Tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20)}


def moving_shapes(frames: int, width: int, height: int, *, colour: str = "red", shape: str = "circle", direction: str = "right",
                  count: int = 1, background: Tuple[int, int, int] = (255, 255, 255), seed: int = 0) -> np.ndarray:
    """Deterministic frames uint8 [frames, height, width, 3]: `count` shapes of one colour moving in `direction`
    (left / right / up / down) over a plain background with a little fixed texture (so frames are not flat)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(-12, 13, (height, width, 1))
    yy, xx = np.mgrid[0:height, 0:width]
    r = max(2.0, min(width, height) / 8)
    starts = [(rng.uniform(r, width - r), rng.uniform(r, height - r)) for _ in range(count)]
    dx, dy = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[direction]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        canvas = np.clip(np.array(background, dtype=np.int64)[None, None, :] + texture, 0, 255)
        for cx, cy in starts:
            step = (t / max(1, frames - 1)) * (0.5 * (width if dx else height))
            x = (cx + dx * step - r) % (width - 2 * r) + r
            y = (cy + dy * step - r) % (height - 2 * r) + r
            if shape == "circle":
                inside = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
            elif shape == "square":
                inside = (abs(xx - x) <= r) & (abs(yy - y) <= r)
            elif shape == "triangle":
                inside = (yy >= y - r) & (yy <= y + r) & (abs(xx - x) <= (yy - (y - r)) / 2)
            else:
                raise ValueError(f"unknown shape {shape!r}")
            canvas[inside] = COLOURS[colour]
        out[t] = canvas.astype(np.uint8)
    return out


def write_clip(path: str | Path, frames: np.ndarray, fps: int = 8, codec: Optional[str] = None, options: Optional[dict] = None) -> Path:
    """Encode frames (uint8 [T, H, W, 3], even H and W for yuv420p) to `path` with av; the container follows the
    suffix (mp4 / mkv / webm / avi / h264 for a raw elementary stream). H.264 (libx264, near-lossless, no B-frames)
    unless `codec` says otherwise (webm: VP9)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    codec = codec or ("libvpx-vp9" if suffix == ".webm" else "libx264")
    options = dict(options or ({"crf": "4", "bf": "0", "preset": "medium"} if codec == "libx264" else {}))
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(str(path), mode="w", format="h264" if suffix == ".h264" else None) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_bad_clips(out_dir: str | Path) -> Dict[str, Path]:
    """The inputs a video document can fail on: `short` (5 frames: fewer than Video-LLaVA's 8), `not_video` (random
    bytes named .mp4), `truncated` (an mp4 cut to a third), `empty` (0 bytes), `raw_stream` (a raw H.264 elementary
    stream: no frame count, no seeking -- decodable, so it is sampled after counting its frames)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = {"short": write_clip(out / "short.mp4", moving_shapes(5, 64, 48, seed=1))}
    rng = np.random.default_rng(7)
    (out / "not_video.mp4").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    clips["not_video"] = out / "not_video.mp4"
    full = write_clip(out / "full.mp4", moving_shapes(24, 64, 48, colour="blue", seed=2))
    data = full.read_bytes()
    (out / "truncated.mp4").write_bytes(data[: len(data) // 3])
    clips["truncated"] = out / "truncated.mp4"
    (out / "empty.mp4").write_bytes(b"")
    clips["empty"] = out / "empty.mp4"
    clips["raw_stream"] = write_clip(out / "raw.h264", moving_shapes(20, 64, 48, colour="green", seed=3))
    return clips


def frame_strip(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Frames side by side (uint8 [H, sum W, 3]) -- a quick look at a clip."""
    return np.concatenate(list(frames), axis=1)


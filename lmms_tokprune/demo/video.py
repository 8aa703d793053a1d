"""`lmms-tokprune demo --video`: the Video-LLaVA pipeline offline on a CPU, through lmms-eval, on the video smoke task.

No Video-LLaVA checkpoint ships with the package, so unless `--pretrained` names one, a tiny Video-LLaVA with random
weights is built from its config (the bench's `tiny-video` shapes: two 224-px CLIP towers, a 2-layer decoder) and the
small local tokenizer, and saved under a temporary folder. Its answers are noise: what the demo shows is the pipeline
(clips read as lmms-eval reads them, 8 frames per video, each frame's CLS a layout token, images through the image
tower) and the token counts per method.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

VIDEO_TASK = "tokprune_video_smoke"
VIDEO_METHODS = ("none", "prumerge", "prumerge_plus", "visionzip", "divprune")
NOISE_NOTE = ("demo --video: a tiny Video-LLaVA with random weights (built here, no download) unless --pretrained names one; "
              "its answers are noise -- only the pipeline and the token counts are shown (per video: 2,048 visual tokens in, "
              "8 frame CLS layout tokens, 8 units; per image 256)")


def build_random_video_llava(out_dir: Path) -> Path:
    """A tiny random Video-LLaVA (bench preset `tiny-video`) with its processor, saved to `out_dir`."""
    import torch

    from ..bench.llava_bench import bench_processor, build_model

    processor = bench_processor("tiny-video")
    tok = processor.tokenizer
    model = build_model("tiny-video", None, torch.device("cpu"), torch.float32, tok.convert_tokens_to_ids("<image>"),
                        video_token_id=tok.convert_tokens_to_ids("<video>"))
    cfg = model.config
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def run_video_demo(pretrained: Optional[str], methods: Optional[Sequence[str]], budgets: Sequence[int], batch_size: int,
                   limit: Optional[int] = None, progress: Optional[Callable[[str], None]] = None, verbose: bool = False) -> List:
    """`none` once, every other method at every budget (visual tokens per video), on the video smoke task."""
    from .run import held_back_stderr, run_method

    methods = list(methods) if methods else list(VIDEO_METHODS)
    runs = [(m, None) for m in methods if m == "none"] + [(m, b) for m in methods if m != "none" for b in budgets]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokprune-video-demo-") as tmp:
        if pretrained is None:
            with held_back_stderr(enabled=not verbose):
                pretrained = str(build_random_video_llava(Path(tmp) / "tiny-video-llava"))
        for i, (m, b) in enumerate(runs, 1):
            with held_back_stderr(enabled=not verbose):
                rows.append(run_method(pretrained, m, b, batch_size, limit, tasks=[VIDEO_TASK], text_encoder=None,
                                       verbosity="INFO" if verbose else "WARNING"))
            if progress is not None:
                row = rows[-1]
                progress(f"[{i}/{len(runs)}] {m}{'' if b is None else f' budget {b}'}: {row.visual_tokens:.0f} visual tokens kept "
                         f"(mean over videos and images), LLM prefill {row.llm_prefill_tokens:.0f}")
    return rows

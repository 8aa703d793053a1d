"""`lmms-tokprune bench`: prefill cost per method on a full-width LLaVA-1.5 built from its config.

Random weights (no download) at the real widths; `llm_layers` shortens the LLM so a CPU can run it
(FLOPs are reported for the layers actually run). Every method sees the same images and the same
text; per method we report visual tokens, analytic prefill TFLOPs, measured LLM prefill time, the
compression's own time, the vision tower time and peak memory.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from ..methods import compress, get_method
from .flops import from_llava_config, llm_prefill_flops
from .timing import StepClock, peak_memory_mb, reset_peak_memory

SYSTEM_PROMPT_TOKENS = 35  # the vicuna_v1 system prompt + "USER:" in the LLaVA tokenizer

PRESET_SHAPES = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),  # for tests
}
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)


@dataclass
class BenchRow:
    method: str
    visual_tokens: float
    llm_seq_len: float
    prefill_tflops: float
    prefill_ms: float
    compress_ms: float
    vision_ms: float
    peak_memory_mb: Optional[float]
    speedup: float = 1.0  # full prefill time / this prefill time
    flops_ratio: float = 1.0  # full prefill FLOPs / this prefill FLOPs
    overhead_pct: float = 0.0  # compress_ms as % of the full prefill


def hf_config(preset: str, llm_layers: Optional[int] = None):
    """A transformers LlavaConfig with LLaVA-1.5's shapes (CLIP ViT-L/14-336 + Vicuna)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if preset not in PRESET_SHAPES:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESET_SHAPES)}")
    shape = dict(PRESET_SHAPES[preset])
    if llm_layers is not None:
        if llm_layers < 1:
            raise ValueError("--llm-layers must be >= 1")
        shape["num_hidden_layers"] = llm_layers
    clip = CLIP_TINY if preset == "tiny" else CLIP_L_336
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5, **clip)
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, num_key_value_heads=shape["num_attention_heads"], **shape)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def build_model(preset: str, llm_layers: Optional[int], device: torch.device, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    cfg = hf_config(preset, llm_layers)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def bench_images(n: int) -> List[Any]:
    """The smoke task's images (real shapes and colours), cycled to n."""
    from PIL import Image

    from ..paths import tasks_dir

    files = sorted((tasks_dir() / "tokprune_smoke" / "images").glob("*.png"))
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(n)]


class _TextTower:
    """A random CLIP ViT-L/14-336-shaped text tower for recover (embeds random question ids)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, vision_width: int) -> None:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
        torch.manual_seed(1)
        self.model = CLIPTextModelWithProjection(cfg).to(device, dtype).eval()
        self.visual_projection = (torch.randn(768, vision_width) * vision_width**-0.5).to(device, dtype)
        self.ids = torch.randint(0, cfg.vocab_size - 2, (1, 12), device=device)

    def embed(self) -> torch.Tensor:
        return self.model(input_ids=self.ids).text_embeds


@torch.inference_mode()
def run_bench(preset: str = "llava-1.5-7b", methods: Sequence[str] = ("none",), llm_layers: Optional[int] = None,
              images: int = 4, text_tokens: int = 60, repeats: int = 2, device: Optional[str] = None,
              dtype: Optional[str] = None, method_params: Optional[Dict[str, Dict[str, Any]]] = None, progress: bool = True) -> List[BenchRow]:
    from ..llava.images import ImagePreparer
    from ..llava.vision import as_vision_inputs, run_clip
    from ..testing.tiny import _image_processor

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype or ("float16" if dev.type == "cuda" else "float32")]
    for m in methods:
        get_method(m)  # unknown names fail before the model is built
    model = build_model(preset, llm_layers, dev, torch_dtype)
    flops_cfg = from_llava_config(model.config)
    pixel_values = ImagePreparer(_image_processor(), pad_to_square=True).prepare(bench_images(images)).to(dev, torch_dtype)
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    text_ids = torch.randint(3, 31000, (1, SYSTEM_PROMPT_TOKENS + text_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    tower = None
    rows: List[BenchRow] = []
    params_of = method_params or {}
    work = [(m, i, r) for m in methods for i in range(images) for r in range(repeats + 1)]
    bar = tqdm(total=len(work), disable=not progress, desc="bench")
    for method in methods:
        spec = get_method(method)
        if spec.stage != "pre_projector":
            raise ValueError(f"bench measures pre-projector methods; {method!r} prunes inside the LLM (not supported by bench yet)")
        if "text" in spec.needs and tower is None:
            tower = _TextTower(dev, torch_dtype, model.config.vision_config.hidden_size)
        times: Dict[str, List[float]] = {"prefill": [], "compress": [], "vision": []}
        kept: List[int] = []
        reset_peak_memory(dev)
        for i in range(images):
            for r in range(repeats + 1):  # the first pass warms up
                clock = StepClock(dev)
                clock.mark()
                states = run_clip(model.model.vision_tower, pixel_values[i:i + 1], need_qk=spec.needs_qk, need_last_block=spec.needs_last_block)
                text_embeds = tower.embed() if "text" in spec.needs else None
                clock.mark()
                inp = as_vision_inputs(states, text_embeds, tower.visual_projection if text_embeds is not None else None, [i])
                out = compress(method, inp, **params_of.get(method, {}))[0]
                clock.mark()
                visual = model.model.multi_modal_projector(out.features.to(dev, torch_dtype)).unsqueeze(0)
                text = embed(text_ids)
                seq = torch.cat([text[:, :SYSTEM_PROMPT_TOKENS], visual, text[:, SYSTEM_PROMPT_TOKENS:]], dim=1)
                clock.mark()
                hidden = lm(inputs_embeds=seq, use_cache=False).last_hidden_state
                model.lm_head(hidden[:, -1:])
                clock.mark()
                if r > 0:
                    times["vision"].append(clock.elapsed_ms(0, 1))
                    times["compress"].append(clock.elapsed_ms(1, 2))
                    times["prefill"].append(clock.elapsed_ms(3, 4))
                    kept.append(out.num_tokens)
                bar.update(1)
        seq_len = SYSTEM_PROMPT_TOKENS + text_tokens + statistics.mean(kept)
        rows.append(BenchRow(
            method=method,
            visual_tokens=statistics.mean(kept),
            llm_seq_len=seq_len,
            prefill_tflops=statistics.mean(llm_prefill_flops(flops_cfg.text, SYSTEM_PROMPT_TOKENS + text_tokens + k) for k in kept) / 1e12,
            prefill_ms=min(times["prefill"]),  # best of the timed passes: least disturbed by other load
            compress_ms=min(times["compress"]),
            vision_ms=min(times["vision"]),
            peak_memory_mb=peak_memory_mb(dev),
        ))
    bar.close()
    base = next((r for r in rows if r.method == "none"), rows[0])
    for r in rows:
        r.speedup = base.prefill_ms / r.prefill_ms
        r.flops_ratio = base.prefill_tflops / r.prefill_tflops
        r.overhead_pct = 100.0 * r.compress_ms / base.prefill_ms
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    head = "| method | visual tokens | LLM seq len | prefill TFLOPs | prefill ms | compress ms | vision ms | speed-up | FLOPs ratio | speed-up / FLOPs ratio | overhead % | peak MB |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.method} | {r.visual_tokens:.1f} | {r.llm_seq_len:.1f} | {r.prefill_tflops:.4f} | {r.prefill_ms:.1f} | {r.compress_ms:.2f} | "
                     f"{r.vision_ms:.1f} | {r.speedup:.2f}x | {r.flops_ratio:.2f}x | {100 * r.speedup / r.flops_ratio:.0f}% | {r.overhead_pct:.2f} | "
                     f"{'-' if r.peak_memory_mb is None else f'{r.peak_memory_mb:.0f}'} |")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[BenchRow]) -> dict:
    return {"results": [asdict(r) for r in rows]}

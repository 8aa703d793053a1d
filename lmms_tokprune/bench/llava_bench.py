"""`lmms-tokprune bench`: prefill cost per method on a full-width LLaVA-1.5 built from its config.

Random weights (no download) at the real widths; `llm_layers` shortens the LLM so a CPU can run it (FLOPs
are reported for the layers actually run). Each method runs through the real engine (`open_engine`, the
path lmms-eval runs: images, CLIP with capture, the method, the projector, the LLM stage of in-LLM methods),
one image per call, with latency measurement on; we report visual tokens, analytic prefill TFLOPs from
the real per-layer lengths, the measured LLM prefill, the method's own time, the rest of the input
preparation, and peak memory.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from ..efficiency.timing import reset_peak_memory
from ..llava.batch import Sample
from ..llava.options import engine_options
from ..methods import get_method

SYSTEM_PROMPT_TOKENS = 35  # the vicuna_v1 system prompt + "USER:" in the LLaVA tokenizer

PRESET_SHAPES = {
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),  # for tests
}
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
QUESTION_WORDS = "what colour is the large object on the left of the picture and how many small shapes are there".split()


@dataclass
class BenchRow:
    method: str
    visual_tokens: float  # kept: what the last layer sees for an in-LLM method
    visual_tokens_equivalent: float  # layer-averaged visual tokens (= kept for a method acting before the LLM)
    llm_seq_len: float  # layer-averaged when the method prunes inside the LLM
    prefill_tflops: float
    prefill_ms: float
    compress_ms: float
    vision_ms: float  # image preprocessing, CLIP, projector and input assembly (the method's own time excluded)
    peak_memory_mb: Optional[float]
    speedup: float = 1.0  # full prefill time / this prefill time
    flops_ratio: float = 1.0  # full prefill FLOPs / this prefill FLOPs
    overhead_pct: float = 0.0  # compress_ms as % of the full prefill


def hf_config(preset: str, llm_layers: Optional[int] = None, image_token_id: int = 32000, llm_width: Optional[int] = None):
    """A transformers LlavaConfig with LLaVA-1.5's shapes (CLIP ViT-L/14-336 + Vicuna). `llm_width` narrows the LLM
    (heads of 128 as in Vicuna, the MLP in Vicuna's 11008/4096 proportion) so all 32 layers fit a CPU: where the
    in-LLM methods cut matters more than how wide the layers are."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if preset not in PRESET_SHAPES:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESET_SHAPES)}")
    shape = dict(PRESET_SHAPES[preset])
    if llm_layers is not None:
        if llm_layers < 1:
            raise ValueError("--llm-layers must be >= 1")
        shape["num_hidden_layers"] = llm_layers
    if llm_width is not None:
        if llm_width < 128 or llm_width % 128:
            raise ValueError(f"--llm-width must be a multiple of 128 (heads of 128), got {llm_width}")
        shape.update(hidden_size=llm_width, num_attention_heads=llm_width // 128,
                     intermediate_size=int(round(llm_width * 11008 / 4096 / 64)) * 64)
    clip = CLIP_TINY if preset == "tiny" else CLIP_L_336
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5, **clip)
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, num_key_value_heads=shape["num_attention_heads"], **shape)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def build_model(preset: str, llm_layers: Optional[int], device: torch.device, dtype: torch.dtype, image_token_id: int = 32000,
                llm_width: Optional[int] = None):
    from transformers import LlavaForConditionalGeneration

    cfg = hf_config(preset, llm_layers, image_token_id, llm_width)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def bench_processor():
    """LLaVA-1.5's processor setup with the small local Llama tokenizer (no download)."""
    from ..testing.tiny import llama_tokenizer, llava_processor

    return llava_processor(llama_tokenizer())


def bench_images(n: int) -> List[Any]:
    """The smoke task's images (real shapes and colours), cycled to n."""
    from PIL import Image

    from ..paths import tasks_dir

    files = sorted((tasks_dir() / "tokprune_smoke" / "images").glob("*.png"))
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(n)]


def bench_question(tokenizer: Any, text_tokens: int) -> str:
    """A question whose llava_v1 prompt has about SYSTEM_PROMPT_TOKENS + text_tokens text tokens (image excluded)."""
    from ..llava.prompts import llava_v1_prompt

    words: List[str] = []
    while len(tokenizer(llava_v1_prompt(" ".join(words), 1))["input_ids"]) - 1 < SYSTEM_PROMPT_TOKENS + text_tokens:
        words.append(QUESTION_WORDS[len(words) % len(QUESTION_WORDS)])
    return " ".join(words)


def random_text_guide(device: torch.device, dtype: torch.dtype, vision_width: int):
    """A random CLIP ViT-L/14-336-shaped text tower + visual projection for text-guided methods."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ..llava.text_guide import TextGuide
    from ..testing.tiny import clip_tokenizer

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    torch.manual_seed(1)
    text_model = CLIPTextModelWithProjection(cfg).to(device, dtype).eval()
    projection = (torch.randn(768, vision_width) * vision_width**-0.5).to(device, dtype)
    return TextGuide(text_model, clip_tokenizer(), projection, "question")


@torch.inference_mode()
def run_bench(preset: str = "llava-1.5-7b", methods: Sequence[str] = ("none",), llm_layers: Optional[int] = None,
              images: int = 4, text_tokens: int = 60, repeats: int = 2, device: Optional[str] = None,
              dtype: Optional[str] = None, method_params: Optional[Dict[str, Dict[str, Any]]] = None, progress: bool = True,
              llm_width: Optional[int] = None) -> List[BenchRow]:
    from ..llava.opener import open_engine

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = dtype or ("float16" if dev.type == "cuda" else "float32")
    params_of = method_params or {}
    configs = [engine_options({"method": m, "measure_latency": True, "dtype": dtype_name, **params_of.get(m, {})}) for m in methods]
    processor = bench_processor()
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    hf_config(preset, llm_layers, image_token_id, llm_width)  # bad shapes fail before anything is built
    model = build_model(preset, llm_layers, dev, {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name],
                        image_token_id, llm_width)
    question = bench_question(processor.tokenizer, text_tokens)
    samples = [Sample(question, [im], [i]) for i, im in enumerate(bench_images(images))]
    guide = None
    if any(get_method(o.method.name).needs_text_encoder for o in configs):
        guide = random_text_guide(dev, model.dtype, model.config.vision_config.hidden_size)
    engines = [open_engine(options, dev, model, processor, guide) for options in configs]  # every check before any timing
    rows: List[BenchRow] = []
    bar = tqdm(total=len(methods) * images * (repeats + 1), disable=not progress, desc="bench")
    for options, engine in zip(configs, engines):
        times: Dict[str, List[float]] = {"prefill": [], "compress": [], "vision": []}
        kept: List[float] = []
        equivalent: List[float] = []
        seq: List[float] = []
        tflops: List[float] = []
        peak: Optional[float] = None
        reset_peak_memory(dev)
        for sample in samples:
            for r in range(repeats + 1):  # the first pass warms up
                st = engine.generate([sample], {"max_new_tokens": 1}).stats[0]
                bar.update(1)
                if r == 0:
                    continue
                lat = st.latency
                times["prefill"].append(lat["prefill_ms"])
                times["compress"].append(lat["compress_ms"])
                times["vision"].append(lat["vision_and_compress_ms"] - (lat["compress_ms"] - lat["cut_ms"]))
                kept.append(st.visual_tokens_kept)
                equivalent.append(st.visual_tokens_equivalent)
                seq.append(st.llm_prefill_tokens)
                tflops.append(st.prefill_tflops)
                peak = lat.get("peak_memory_mb", peak)
        rows.append(BenchRow(
            method=options.method.name,
            visual_tokens=statistics.mean(kept),
            visual_tokens_equivalent=statistics.mean(equivalent),
            llm_seq_len=statistics.mean(seq),
            prefill_tflops=statistics.mean(tflops),
            prefill_ms=min(times["prefill"]),  # best of the timed passes: least disturbed by other load
            compress_ms=min(times["compress"]),
            vision_ms=min(times["vision"]),
            peak_memory_mb=peak,
        ))
    bar.close()
    base = next((r for r in rows if r.method == "none"), rows[0])
    for r in rows:
        r.speedup = base.prefill_ms / r.prefill_ms
        r.flops_ratio = base.prefill_tflops / r.prefill_tflops
        r.overhead_pct = 100.0 * r.compress_ms / base.prefill_ms
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    head = "| method | visual kept | equivalent tokens | LLM seq len | prefill TFLOPs | prefill ms | compress ms | vision ms | speed-up | FLOPs ratio | speed-up / FLOPs ratio | overhead % | peak MB |"
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r.method} | {r.visual_tokens:.1f} | {r.visual_tokens_equivalent:.1f} | {r.llm_seq_len:.1f} | {r.prefill_tflops:.4f} | {r.prefill_ms:.1f} | {r.compress_ms:.2f} | "
                     f"{r.vision_ms:.1f} | {r.speedup:.2f}x | {r.flops_ratio:.2f}x | {100 * r.speedup / r.flops_ratio:.0f}% | {r.overhead_pct:.2f} | "
                     f"{'-' if r.peak_memory_mb is None else f'{r.peak_memory_mb:.0f}'} |")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[BenchRow]) -> dict:
    return {"results": [asdict(r) for r in rows]}

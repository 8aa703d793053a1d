"""`lmms-tokprune bench`: prefill cost per method on a full-width LLaVA-1.5 or LLaVA-NeXT built from its config.

Random weights (no download) at the real widths; `llm_layers` shortens the LLM so a CPU can run it (FLOPs
are reported for the layers actually run). Each method runs through the real engine (`open_engine`, the
path lmms-eval runs: the family's units, CLIP with capture, the method, the projector, the family's re-assembly,
the LLM stage of in-LLM methods), one image per call, with latency measurement on; we report visual tokens (in,
kept, layer-averaged equivalent), layout tokens (NeXT newlines), CLIP units, analytic prefill TFLOPs from the real
per-layer lengths, the measured LLM prefill, the method's own time, the rest of the input preparation, and peak memory.

LLaVA-NeXT presets (`llava-next-7b` = llava-hf/llava-v1.6-vicuna-7b-hf's shapes, `llava-next-mistral-7b`, `llava-next-13b`,
`tiny-next` for tests) use the released anyres pinpoints and a `image_size` image (default 640x480: a 2x2 grid, 5
units, 576 + 36*48 = 2304 patch tokens + 36 newlines).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..efficiency.timing import reset_peak_memory
from ..llava.batch import Sample
from ..llava.options import engine_options
from ..methods import get_method

SYSTEM_PROMPT_TOKENS = 35  # the vicuna_v1 system prompt + "USER:" in the LLaVA tokenizer

LLAVA, NEXT, VIDEO = "llava", "llava_next", "video_llava"


@dataclass(frozen=True)
class BenchPreset:
    """The shapes a bench model is built with: its family (transformers model_type), the LLM and the CLIP tower."""

    family: str
    llm: Dict[str, int] = field(hash=False)
    decoder: str = "llama"  # or "mistral" (grouped-query attention, NeXT's Mistral release)
    tiny: bool = False  # the tiny CLIP (tests)


_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
_VICUNA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40)
_MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
_TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)

BENCH_PRESETS: Dict[str, BenchPreset] = {
    "llava-1.5-7b": BenchPreset(LLAVA, _VICUNA_7B),
    "llava-1.5-13b": BenchPreset(LLAVA, _VICUNA_13B),
    "tiny": BenchPreset(LLAVA, _TINY_LLM, tiny=True),  # for tests
    "llava-next-7b": BenchPreset(NEXT, _VICUNA_7B),  # llava-hf/llava-v1.6-vicuna-7b-hf
    "llava-next-mistral-7b": BenchPreset(NEXT, _MISTRAL_7B, decoder="mistral"),  # llava-hf/llava-v1.6-mistral-7b-hf
    "llava-next-13b": BenchPreset(NEXT, _VICUNA_13B),  # llava-hf/llava-v1.6-vicuna-13b-hf
    "tiny-next": BenchPreset(NEXT, _TINY_LLM, tiny=True),  # for tests
    "video-llava-7b": BenchPreset(VIDEO, _VICUNA_7B),  # LanguageBind/Video-LLaVA-7B-hf: 8-frame videos (8 units of 256 + CLS)
    "tiny-video": BenchPreset(VIDEO, _TINY_LLM, tiny=True),  # for tests
}
PRESET_SHAPES = {name: dict(p.llm) for name, p in BENCH_PRESETS.items()}  # the LLM shapes (kept for callers of the old table)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
QUESTION_WORDS = "what colour is the large object on the left of the picture and how many small shapes are there".split()
NEXT_IMAGE_SIZE = (640, 480)  # COCO's usual size: LLaVA-NeXT's 2x2 grid (5 units), unpadded to 36 x 48 patches


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
    label: str = ""  # the row's name: the method, with its budget when several budgets run ("topk_cls@640")
    budget: Optional[int] = None  # the --budget the row ran with (per image; equivalent tokens for an in-LLM method)
    visual_tokens_in: float = 0.0  # patch tokens the uncompressed model feeds the LLM (NeXT: 576 + unpadded grid)
    layout_tokens: float = 0.0  # tokens that are not patches (NeXT newlines, one per kept grid row)
    units: float = 0.0  # CLIP passes per image (LLaVA-1.5: 1; NeXT: base + crops)


def bench_preset(name: str) -> BenchPreset:
    if name not in BENCH_PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(BENCH_PRESETS)}")
    return BENCH_PRESETS[name]


def hf_config(preset: str, llm_layers: Optional[int] = None, image_token_id: int = 32000, llm_width: Optional[int] = None,
              vision_layers: Optional[int] = None, video_token_id: Optional[int] = None):
    """A transformers LlavaConfig (LLaVA-1.5: CLIP ViT-L/14-336 + Vicuna) or LlavaNextConfig (NeXT: the same tower, the
    released anyres pinpoints, an image_newline; Vicuna or Mistral) with the preset's shapes. `llm_width` narrows the LLM
    (heads of 128 as in Vicuna / Mistral, the MLP and the key/value heads in the preset's proportions) so all layers fit a
    CPU: where the in-LLM methods cut matters more than how wide the layers are. `vision_layers` shortens CLIP (>= 2: the
    features come from block -2) so a CPU run of a 5-unit NeXT image is not mostly CLIP: every tensor a method or the LLM
    sees keeps its shape (only the tower's own time, `vision_ms`, shrinks)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig

    spec = bench_preset(preset)
    shape = dict(spec.llm)
    if llm_layers is not None:
        if llm_layers < 1:
            raise ValueError("--llm-layers must be >= 1")
        shape["num_hidden_layers"] = llm_layers
    if llm_width is not None:
        if llm_width < 128 or llm_width % 128:
            raise ValueError(f"--llm-width must be a multiple of 128 (heads of 128), got {llm_width}")
        heads = llm_width // 128
        group = spec.llm["num_attention_heads"] // spec.llm["num_key_value_heads"]
        shape.update(hidden_size=llm_width, num_attention_heads=heads, num_key_value_heads=max(1, heads // group),
                     intermediate_size=int(round(llm_width * spec.llm["intermediate_size"] / spec.llm["hidden_size"] / 64)) * 64)
    clip = dict(CLIP_TINY if spec.tiny else CLIP_L_336)
    if vision_layers is not None:
        if vision_layers < 2:
            raise ValueError(f"--vision-layers must be >= 2 (LLaVA reads CLIP's block -2), got {vision_layers}")
        clip["num_hidden_layers"] = vision_layers
    side = 224 if spec.family == VIDEO else 336  # Video-LLaVA's LanguageBind towers run at 224 px
    vision = CLIPVisionConfig(image_size=side, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5, **clip)
    if spec.decoder == "mistral":  # Mistral-7B-Instruct-v0.2: rope 1e6, no sliding window, 32k positions
        text: Any = MistralConfig(vocab_size=32064, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                                  sliding_window=None, **shape)
    else:
        text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, **shape)
    if spec.family == VIDEO:
        from transformers import VideoLlavaConfig

        return VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                video_token_index=image_token_id + 1 if video_token_id is None else video_token_id, projector_hidden_act="gelu",
                                vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=256,
                                video_seq_length=8 * 257, tie_word_embeddings=False)
    if spec.family == NEXT:
        from ..offline_processors import GRID_PINPOINTS

        return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id, projector_hidden_act="gelu",
                               vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=GRID_PINPOINTS,
                               tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def build_model(preset: str, llm_layers: Optional[int], device: torch.device, dtype: torch.dtype, image_token_id: int = 32000,
                llm_width: Optional[int] = None, vision_layers: Optional[int] = None, video_token_id: Optional[int] = None):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, VideoLlavaForConditionalGeneration

    cfg = hf_config(preset, llm_layers, image_token_id, llm_width, vision_layers, video_token_id)
    family = bench_preset(preset).family
    cls = {NEXT: LlavaNextForConditionalGeneration, VIDEO: VideoLlavaForConditionalGeneration}.get(family, LlavaForConditionalGeneration)
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def bench_processor(preset: str = "llava-1.5-7b"):
    """The preset's processor setup (LLaVA-1.5's CLIP processor, or NeXT's anyres one with the PIL backend, the
    pipeline of the default prompt_style llava_v1) with the small local Llama tokenizer (no download)."""
    from ..offline_processors import llama_tokenizer, llava_next_processor, llava_processor, video_llava_processor, video_tokenizer

    if bench_preset(preset).family == VIDEO:
        return video_llava_processor(video_tokenizer())
    if bench_preset(preset).family == NEXT:
        return llava_next_processor(llama_tokenizer(), backend="pil")
    return llava_processor(llama_tokenizer())


def bench_images(n: int, size: Optional[Tuple[int, int]] = None) -> List[Any]:
    """The smoke task's images (real shapes and colours), cycled to n; resized to `size` (width, height) when given."""
    from PIL import Image

    from ..paths import tasks_dir

    files = sorted((tasks_dir() / "tokprune_smoke" / "images").glob("*.png"))
    images = [Image.open(files[i % len(files)]).convert("RGB") for i in range(n)]
    return [im.resize(size, Image.BICUBIC) for im in images] if size else images


def bench_videos(n: int) -> List[Any]:
    """The video smoke task's clips (8 frames each once read), cycled to n."""
    from ..llava.video import VideoClip
    from ..paths import tasks_dir

    files = sorted((tasks_dir() / "tokprune_video_smoke" / "clips").glob("*.mp4"))
    return [VideoClip(str(files[i % len(files)])) for i in range(n)]


def bench_question(tokenizer: Any, text_tokens: int, conversation: str = "vicuna_v1") -> str:
    """A question whose prompt has about SYSTEM_PROMPT_TOKENS + text_tokens text tokens (image excluded)."""
    from ..llava.prompts import llava_v1_prompt

    fixed = SYSTEM_PROMPT_TOKENS if conversation == "vicuna_v1" else len(tokenizer(llava_v1_prompt("", 1, conversation))["input_ids"]) - 1
    words: List[str] = []
    while len(tokenizer(llava_v1_prompt(" ".join(words), 1, conversation))["input_ids"]) - 1 < fixed + text_tokens:
        words.append(QUESTION_WORDS[len(words) % len(QUESTION_WORDS)])
    return " ".join(words)


def random_text_guide(device: torch.device, dtype: torch.dtype, vision_width: int):
    """A random CLIP ViT-L/14-336-shaped text tower + visual projection for text-guided methods."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ..llava.text_guide import TextGuide
    from ..offline_processors import clip_tokenizer

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    torch.manual_seed(1)
    text_model = CLIPTextModelWithProjection(cfg).to(device, dtype).eval()
    projection = (torch.randn(768, vision_width) * vision_width**-0.5).to(device, dtype)
    return TextGuide(text_model, clip_tokenizer(), projection, "question")


def bench_runs(methods: Sequence[str], budgets: Sequence[Optional[int]] = (None,),
               method_params: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Tuple[str, str, Optional[int], Dict[str, Any]]]:
    """(label, method, budget, params) per row: `none` once, every other method at every budget (the budget is set
    unless its parameters already give one)."""
    runs = []
    budgets = list(budgets) or [None]
    for m in methods:
        params = dict((method_params or {}).get(m, {}))
        if m == "none" or "budget" in params:
            runs.append((m, m, params.get("budget"), params))
            continue
        for b in budgets:
            label = m if len(budgets) == 1 else f"{m}@{b}"
            runs.append((label, m, b, {**params, **({"budget": b} if b is not None else {})}))
    return runs


@torch.inference_mode()
def run_bench(preset: str = "llava-1.5-7b", methods: Sequence[str] = ("none",), llm_layers: Optional[int] = None,
              images: int = 4, text_tokens: int = 60, repeats: int = 2, device: Optional[str] = None,
              dtype: Optional[str] = None, method_params: Optional[Dict[str, Dict[str, Any]]] = None, progress: bool = True,
              llm_width: Optional[int] = None, budgets: Sequence[Optional[int]] = (None,),
              image_size: Optional[Tuple[int, int]] = None, vision_layers: Optional[int] = None) -> List[BenchRow]:
    """One row per (method, budget) (see `bench_runs`), timed over `images` images x `repeats` passes after a warm-up
    pass each. `image_size` (width, height) resizes the images (NeXT presets default to NEXT_IMAGE_SIZE: 5 units)."""
    from ..llava.opener import open_engine

    spec = bench_preset(preset)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = dtype or ("float16" if dev.type == "cuda" else "float32")
    runs = bench_runs(methods, budgets, method_params)
    configs = [engine_options({"method": m, "measure_latency": True, "dtype": dtype_name, **params}) for _, m, _, params in runs]
    processor = bench_processor(preset)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = processor.tokenizer.convert_tokens_to_ids("<video>") if spec.family == VIDEO else None
    hf_config(preset, llm_layers, image_token_id, llm_width, vision_layers, video_token_id)  # bad shapes fail before anything is built
    model = build_model(preset, llm_layers, dev, {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name],
                        image_token_id, llm_width, vision_layers, video_token_id)
    size = image_size or (NEXT_IMAGE_SIZE if spec.family == NEXT else None)
    guide = None
    if any(get_method(o.method.name).needs_text_encoder for o in configs):
        guide = random_text_guide(dev, model.dtype, model.config.vision_config.hidden_size)
    engines = [open_engine(options, dev, model, processor, guide) for options in configs]  # every check before any timing
    question = bench_question(processor.tokenizer, text_tokens, engines[0].family.conversation)
    visuals = bench_videos(images) if spec.family == VIDEO else bench_images(images, size)  # Video-LLaVA: `images` videos
    samples = [engines[0].admit(Sample(question, [im], [i])) for i, im in enumerate(visuals)]
    rows: List[BenchRow] = []
    bar = tqdm(total=len(runs) * images * (repeats + 1), disable=not progress, desc="bench")
    for (label, _, budget, _), options, engine in zip(runs, configs, engines):
        times: Dict[str, List[float]] = {"prefill": [], "compress": [], "vision": []}
        counts: Dict[str, List[float]] = {k: [] for k in ("kept", "equivalent", "seq", "tflops", "in", "layout", "units")}
        peak: Optional[float] = None
        reset_peak_memory(dev)
        for sample in samples:
            engine.admit(sample)  # the method's own limits (a budget a NeXT image cannot meet) fail before it is timed
            for r in range(repeats + 1):  # the first pass warms up
                st = engine.generate([sample], {"max_new_tokens": 1}).stats[0]
                bar.update(1)
                if r == 0:
                    continue
                lat = st.latency
                times["prefill"].append(lat["prefill_ms"])
                times["compress"].append(lat["compress_ms"])
                times["vision"].append(lat["vision_and_compress_ms"] - (lat["compress_ms"] - lat["cut_ms"]))
                for key, value in (("kept", st.visual_tokens_kept), ("equivalent", st.visual_tokens_equivalent), ("seq", st.llm_prefill_tokens),
                                   ("tflops", st.prefill_tflops), ("in", st.visual_tokens_in), ("layout", st.layout_tokens), ("units", st.units)):
                    counts[key].append(float(value))
                peak = lat.get("peak_memory_mb", peak)
        mean = {k: statistics.mean(v) for k, v in counts.items()}
        rows.append(BenchRow(
            method=options.method.name,
            visual_tokens=mean["kept"],
            visual_tokens_equivalent=mean["equivalent"],
            llm_seq_len=mean["seq"],
            prefill_tflops=mean["tflops"],
            prefill_ms=min(times["prefill"]),  # best of the timed passes: least disturbed by other load
            compress_ms=min(times["compress"]),
            vision_ms=min(times["vision"]),
            peak_memory_mb=peak,
            label=label,
            budget=budget,
            visual_tokens_in=mean["in"],
            layout_tokens=mean["layout"],
            units=mean["units"],
        ))
    bar.close()
    base = next((r for r in rows if r.method == "none"), rows[0])
    for r in rows:
        r.speedup = base.prefill_ms / r.prefill_ms
        r.flops_ratio = base.prefill_tflops / r.prefill_tflops
        r.overhead_pct = 100.0 * r.compress_ms / base.prefill_ms
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    head = ("| method | visual in | visual kept | equivalent tokens | layout tokens | units | LLM seq len | prefill TFLOPs | prefill ms | "
            "compress ms | vision ms | speed-up | FLOPs ratio | speed-up / FLOPs ratio | overhead % | peak MB |")
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        lines.append(f"| {r.label or r.method} | {r.visual_tokens_in:.0f} | {r.visual_tokens:.1f} | {r.visual_tokens_equivalent:.1f} | {r.layout_tokens:.0f} | "
                     f"{r.units:.0f} | {r.llm_seq_len:.1f} | {r.prefill_tflops:.4f} | {r.prefill_ms:.1f} | {r.compress_ms:.2f} | "
                     f"{r.vision_ms:.1f} | {r.speedup:.2f}x | {r.flops_ratio:.2f}x | {100 * r.speedup / r.flops_ratio:.0f}% | {r.overhead_pct:.2f} | "
                     f"{'-' if r.peak_memory_mb is None else f'{r.peak_memory_mb:.0f}'} |")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[BenchRow]) -> dict:
    return {"results": [asdict(r) for r in rows]}

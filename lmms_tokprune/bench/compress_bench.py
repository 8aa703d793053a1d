"""`lmms-tokprune bench --compress-only`: the methods' own cost per image on CLIP-L-shaped inputs.

Inputs are synthetic but shaped and peaked like LLaVA-1.5's CLIP states ([B, 577, 1024]; the CLS
query is aligned with a few patch keys so the attention has the long tail that the outlier rules
look for), so timings reflect the real tensor sizes without needing weights.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..methods import VisionInputs, bind, get_method


@dataclass
class CompressTiming:
    method: str
    variant: str
    batch: int
    tokens: float  # mean output tokens per image
    ms_per_image_best: float
    ms_per_image_median: float


def clip_like_inputs(batch: int, n: int = 576, dim: int = 1024, text_dim: int = 768, seed: int = 0, device: str = "cpu",
                     llm_dim: int = 4096, heads: int = 16) -> VisionInputs:
    """CLIP-L-shaped states (+ block-22 q/k with 16 heads, 4096-d projector outputs, 768-d patch / text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 1 + n, dim, generator=g)
    k = torch.randn(batch, 1 + n, dim, generator=g)
    q = torch.randn(batch, 1 + n, dim, generator=g) * 0.1
    for b in range(batch):  # a few salient patches per image, different per image
        salient = torch.randperm(n, generator=g)[:24] + 1
        q[b, 0] = k[b, salient].sum(0) * 0.35
    last = hidden + 0.1 * torch.randn(batch, 1 + n, dim, generator=g)
    text = torch.randn(batch, text_dim, generator=g)
    proj = torch.randn(text_dim, dim, generator=g) / dim**0.5
    feature_k = k + 0.05 * torch.randn(batch, 1 + n, dim, generator=g)
    feature_q = q + 0.05 * torch.randn(batch, 1 + n, dim, generator=g)
    projected = torch.randn(batch, n, llm_dim, generator=g)
    patch_embeds = torch.randn(batch, n, text_dim, generator=g)
    segments = [torch.randn(1, text_dim, generator=g).to(device) for _ in range(batch)]
    return VisionInputs(hidden.to(device), q.to(device), k.to(device), last.to(device), text.to(device), proj.to(device),
                        image_keys=list(range(batch)), feature_q=feature_q.to(device), feature_k=feature_k.to(device), num_heads=heads,
                        projected=projected.to(device), patch_embeds=patch_embeds.to(device), text_segments=segments)


def time_compress(method: str, variant: str = "fixed", batch: int = 8, repeats: int = 10, device: str = "cpu",
                  params: Optional[Dict[str, object]] = None) -> CompressTiming:
    spec = get_method(method)
    inp = clip_like_inputs(batch, device=device)
    if "text" not in spec.needs:
        inp.text_embeds = inp.visual_projection = None
    bound = bind(method, variant, **(params or {}))  # validated once, as the engine holds it
    outs = bound(inp)  # warm-up
    times: List[float] = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        bound(inp)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0 / batch)
    return CompressTiming(method, variant, batch, statistics.mean(o.num_tokens for o in outs), min(times), statistics.median(times))


def run_compress_bench(methods: Sequence[str], variants: Sequence[str] = ("fixed",), batch: int = 8, repeats: int = 10,
                       device: Optional[str] = None, method_params: Optional[Dict[str, Dict[str, object]]] = None) -> List[CompressTiming]:
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for method in methods:
        for variant in variants:
            if variant not in get_method(method).variants:
                continue
            b = batch
            if variant == "reference" and get_method(method).reference_batch_one:
                b = 1  # the released code only runs one image at a time
            rows.append(time_compress(method, variant, b, repeats, dev, (method_params or {}).get(method)))
    return rows


def format_compress_rows(rows: Sequence[CompressTiming]) -> str:
    lines = ["| method | variant | batch | tokens/image | ms/image (best) | ms/image (median) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.variant} | {r.batch} | {r.tokens:.1f} | {r.ms_per_image_best:.2f} | {r.ms_per_image_median:.2f} |")
    return "\n".join(lines)


def compress_rows_as_json(rows: Sequence[CompressTiming]) -> dict:
    return {"results": [asdict(r) for r in rows]}

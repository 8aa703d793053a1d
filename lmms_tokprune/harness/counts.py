"""Per-sample token counts in lmms-eval's samples output, and run-level means across ranks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional

from lmms_eval.api.instance import TokenCounts

COUNT_FIELDS = ("visual_tokens_in", "visual_tokens_kept", "llm_prefill_tokens", "prefill_tflops")
# Measured per batch when model_args measure_latency=true (run with batch_size=1 for per-sample figures).
LATENCY_FIELDS = ("compress_ms", "vision_and_compress_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "peak_memory_mb")


@dataclass
class TokPruneTokenCounts(TokenCounts):
    """lmms-eval's TokenCounts plus what a token-compression comparison needs."""

    visual_tokens_in: Optional[int] = None
    visual_tokens_kept: Optional[int] = None
    llm_prefill_tokens: Optional[float] = None
    prefill_tflops: Optional[float] = None
    compress_ms: Optional[float] = None
    vision_and_compress_ms: Optional[float] = None
    prefill_ms: Optional[float] = None
    ttft_ms: Optional[float] = None
    decode_ms_per_token: Optional[float] = None
    peak_memory_mb: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = super().to_dict()
        for key in COUNT_FIELDS + LATENCY_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class SampleRecord:
    """What clean() gathers from every rank (padding copies are never recorded)."""

    task: str
    doc_id: Any
    visual_tokens_in: int
    visual_tokens_kept: int
    llm_prefill_tokens: float
    output_tokens: int
    prefill_tflops: Optional[float] = None
    seconds: float = 0.0
    latency: Optional[Dict[str, float]] = None


def run_means(records: Iterable[SampleRecord]) -> Dict[str, float]:
    """Run-level and per-task means of the count fields (flat keys: 'visual_tokens_kept', 'pope/visual_tokens_kept')."""
    rows = [{**asdict(r), **(r.latency or {})} for r in records]
    out: Dict[str, float] = {}
    if not rows:
        return out

    def mean_of(subset: List[Dict[str, Any]], prefix: str) -> None:
        for key in COUNT_FIELDS + LATENCY_FIELDS:
            values = [r[key] for r in subset if r.get(key) is not None]
            if values:
                out[prefix + key] = sum(values) / len(values)
        out[prefix + "num_samples"] = float(len(subset))

    mean_of(rows, "")
    for task in sorted({r["task"] for r in rows}):
        mean_of([r for r in rows if r["task"] == task], f"{task}/")
    in_mean = out.get("visual_tokens_in")
    if in_mean:
        out["visual_retention"] = out["visual_tokens_kept"] / in_mean
    return out

"""Per-sample token counts in lmms-eval's samples output, and run-level means across ranks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Iterable, List, Mapping, Optional

from lmms_eval.api.instance import TokenCounts

COUNT_FIELDS = ("visual_tokens_in", "visual_tokens_kept", "visual_tokens_equivalent", "llm_prefill_tokens", "prefill_tflops",
                "layout_tokens", "units")
# Measured per batch when model_args measure_latency=true (run with batch_size=1 for per-sample figures).
LATENCY_FIELDS = ("compress_ms", "cut_ms", "vision_and_compress_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "peak_memory_mb")
# Provenance: `config` = digest of the resolved configuration, `method_args` = the resolved method and the
# parameters set (what a label must show even when a config file changed later); `error` = why this
# document was not run; `provenance` = versions, source commit, checkpoint, prompt style (harness/provenance.py).
NOTE_FIELDS = ("config", "method_args", "error", "provenance")


@dataclass
class TokPruneTokenCounts(TokenCounts):
    """lmms-eval's TokenCounts plus what a token-compression comparison needs."""

    visual_tokens_in: Optional[int] = None
    visual_tokens_kept: Optional[int] = None
    visual_tokens_equivalent: Optional[float] = None
    llm_prefill_tokens: Optional[float] = None
    prefill_tflops: Optional[float] = None
    layout_tokens: Optional[int] = None  # tokens the LLM receives that are not patches (NeXT newlines)
    units: Optional[int] = None  # CLIP passes (images; NeXT base images + crops)
    compress_ms: Optional[float] = None
    cut_ms: Optional[float] = None
    vision_and_compress_ms: Optional[float] = None
    prefill_ms: Optional[float] = None
    ttft_ms: Optional[float] = None
    decode_ms_per_token: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    config: Optional[str] = None
    method_args: Optional[str] = None
    error: Optional[str] = None
    provenance: Optional[Dict[str, str]] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = super().to_dict()
        for key in COUNT_FIELDS + LATENCY_FIELDS + NOTE_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TokPruneTokenCounts":
        """The inverse of to_dict (a stored cache entry back to counts); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def latency(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in LATENCY_FIELDS if getattr(self, k) is not None}


@dataclass
class SampleRecord:
    """What clean() gathers from every rank (padding copies are never recorded)."""

    task: str
    doc_id: Any
    visual_tokens_in: Optional[int]
    visual_tokens_kept: Optional[int]
    llm_prefill_tokens: Optional[float]
    output_tokens: int
    prefill_tflops: Optional[float] = None
    seconds: float = 0.0
    latency: Optional[Dict[str, float]] = None
    visual_tokens_equivalent: Optional[float] = None
    layout_tokens: Optional[int] = None
    units: Optional[int] = None
    error: Optional[str] = None  # the document was not run: its counts are left out of the means
    cached: bool = False  # the answer (and its counts) came from the response cache

    @classmethod
    def of(cls, task: str, doc_id: Any, counts: TokPruneTokenCounts, seconds: float = 0.0, cached: bool = False) -> "SampleRecord":
        return cls(task, doc_id, counts.visual_tokens_in, counts.visual_tokens_kept, counts.llm_prefill_tokens,
                   int(counts.output_tokens or 0), prefill_tflops=counts.prefill_tflops, seconds=seconds,
                   latency=counts.latency or None, visual_tokens_equivalent=counts.visual_tokens_equivalent,
                   layout_tokens=counts.layout_tokens, units=counts.units, error=counts.error, cached=cached)


def run_means(records: Iterable[SampleRecord]) -> Dict[str, float]:
    """Run-level and per-task means of the count fields over the documents that ran (flat keys:
    'visual_tokens_kept', 'pope/visual_tokens_kept'), plus how many failed and how many came from the cache."""
    records = list(records)
    rows = [{**asdict(r), **(r.latency or {})} for r in records if r.error is None]
    out: Dict[str, float] = {}
    failed = sum(r.error is not None for r in records)
    if failed:
        out["failed_docs"] = float(failed)
    cached = sum(r.cached for r in records)
    if cached:
        out["served_from_cache"] = float(cached)
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

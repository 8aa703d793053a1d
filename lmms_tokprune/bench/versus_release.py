"""Side-by-side timing of our `compress` against the released FasterVLM and VisionZip selection code.

    python -m lmms_tokprune.bench.versus_release [--batch 8] [--budget 64] [--repeats 20] [--device cpu]

The released functions below are plain torch transcriptions of what the releases compute after their CLIP
forward (shared/PEERS.md; Theia-4869/FasterVLM @ f5d5f12 llava_arch.encode_images + clip_encoder.feature_select,
dvlab-research/VisionZip @ 3151f6d clip_encoder.CLIPVisionTower_VisionZip.forward):

- FasterVLM: attentions[-2][:, :, 0, 1:] -> mean over heads -> topk -> index mask -> the kept patch rows in
  ascending order (the release indexes the projected features with the mask; we gather the pre-projector rows,
  the same work minus the projector, which is not part of the method);
- VisionZip: attentions[-2][:, :, 0, 1:] summed over heads -> top (dominant - 1) -> [CLS + dominant] by
  masked_select, the remaining rows and metric rows by mask, the metric L2-normalised, 1-D stride targets, argmax
  assignment, target + mean of members.

What they get for free, explicitly: the block-22 attention maps `attentions[-2]`, a full [B, 16, 577, 577] fp32
tensor that the release's eager CLIP forward (output_attentions=True) materialises anyway; it is computed here
once, outside the timed region, from the same `feature_q` / `feature_k` our methods read. VisionZip's merge metric
(`raw_key_states.mean(1)`, the head-mean of block 22's keys, which the release's patched CLIP attention computes
during the tower's forward) is timed both ways: computed inside the timed region from `feature_k` ("metric
computed"), and given for free too ("metric free").

Ours (`compress`, bound once, as the engine holds it) gets no attention map: it computes the CLS rows from q / k
(`fixed`: float64 and settled, so its picks do not depend on the BLAS summation order; `reference`: fp32, as
released), validates its inputs and returns one CompressedImage per image. topk_cls (one head over all 1024 dims of
the last block's q / k) is listed beside the FasterVLM release: the same top-k of a CLS attention row.

Timing: every candidate runs once to warm up, then `repeats` rounds, each round timing every candidate once in
turn (so a load spike on a shared machine hits all of them alike); ms per image, best and median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..methods import VisionInputs, bind
from .compress_bench import clip_like_inputs


def attention_maps(feature_q: torch.Tensor, feature_k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, 1+N, D] raw q / k -> [B, H, 1+N, 1+N] fp32 softmax attention (CLIP's eager attention, scale on q)."""
    b, t, d = feature_q.shape
    w = d // num_heads
    q = (feature_q * w**-0.5).view(b, t, num_heads, w).transpose(1, 2)
    k = feature_k.view(b, t, num_heads, w).transpose(1, 2)
    return torch.softmax(q @ k.transpose(2, 3), dim=-1)


def released_fastervlm(hidden: torch.Tensor, attentions: torch.Tensor, budget: int) -> torch.Tensor:
    """FasterVLM's selection given the block's attention maps: [B, budget, D] kept patch rows, ascending."""
    features = hidden[:, 1:]  # feature_select 'patch'
    image_attentions = attentions[:, :, 0, 1:]  # (B, H, N)
    b, n, c = features.shape
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=budget, dim=1)[1]  # (B, T)
    index_masks = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    index_masks.scatter_(1, token_indices, True)
    return torch.stack([feature[mask] for feature, mask in zip(features, index_masks)])


def released_metric(feature_k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """VisionZip's merge metric as its patched CLIP attention returns it: raw_key_states.mean(1), [B, 1+N, D/H]."""
    b, t, d = feature_k.shape
    return feature_k.view(b, t, num_heads, d // num_heads).transpose(1, 2).mean(1)


def released_visionzip(hidden: torch.Tensor, attentions: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip's tensor branch (dominant counts the CLS token): [B, dominant + contextual, D]."""
    hidden_states, attn_weights = hidden, attentions
    dominant_num = dominant - 1  # apply_info's dominant_num
    contextual_num = contextual
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype, device=topk_indices.device), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool, device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    rest = ~torch.isin(torch.arange(metric_normalized.shape[1], device=metric_normalized.device), target_indices)
    tokens_to_merge = metric_normalized[:, rest, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype,
                                 device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1], device=hidden_states_filtered.device),
                                                           target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


@dataclass
class VersusRow:
    name: str
    compares_to: str  # the release row this one is read against
    ms_per_image_best: float
    ms_per_image_median: float


def _time_rounds(candidates: Dict[str, Callable[[], object]], batch: int, repeats: int, device: str) -> Dict[str, List[float]]:
    cuda = device.startswith("cuda")
    for fn in candidates.values():
        fn()  # warm-up
    times: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1000.0 / batch)
    return times


def run_versus_release(batch: int = 8, budget: int = 64, repeats: int = 20, device: str = "cpu", seed: int = 0) -> List[VersusRow]:
    """Time the released FasterVLM / VisionZip selections (attention maps given) beside our compress rows."""
    full = clip_like_inputs(batch, seed=seed, device=device)
    heads = int(full.num_heads)
    inp = VisionInputs(full.hidden, full.q, full.k, feature_q=full.feature_q, feature_k=full.feature_k, num_heads=heads)
    with torch.no_grad():
        maps = attention_maps(full.feature_q, full.feature_k, heads)  # free: outside the timed region
        metric = released_metric(full.feature_k, heads)
    contextual = 5 * budget // 32
    dominant = budget - contextual
    ours = {f"{m} {v}": bind(m, v, budget=budget) for m in ("fastervlm", "visionzip", "topk_cls") for v in ("fixed", "reference")}
    release_fvlm, release_vz, release_vz_free = "release fastervlm (maps free)", "release visionzip (maps free, metric computed)", \
        "release visionzip (maps + metric free)"

    @torch.no_grad()
    def vz_computed() -> torch.Tensor:
        return released_visionzip(full.hidden, maps, released_metric(full.feature_k, heads), dominant, contextual)

    candidates: Dict[str, Callable[[], object]] = {
        release_fvlm: torch.no_grad()(lambda: released_fastervlm(full.hidden, maps, budget)),
        release_vz: vz_computed,
        release_vz_free: torch.no_grad()(lambda: released_visionzip(full.hidden, maps, metric, dominant, contextual)),
    }
    candidates.update({name: (lambda b=b: b(inp)) for name, b in ours.items()})
    times = _time_rounds(candidates, batch, repeats, device)
    against = {"fastervlm": release_fvlm, "topk_cls": release_fvlm, "visionzip": release_vz_free}
    rows = []
    for name, ts in times.items():
        method = name.split()[0]
        compares = against[method] if method in against and not name.startswith("release") else ""
        rows.append(VersusRow(name, compares, min(ts), statistics.median(ts)))
    return rows


def format_versus_rows(rows: Sequence[VersusRow]) -> str:
    best = {r.name: r for r in rows}
    lines = ["| candidate | ms/image (best) | ms/image (median) | x release (best) | x release (median) |", "|---|---|---|---|---|"]
    for r in rows:
        ref: Optional[VersusRow] = best.get(r.compares_to)
        ratio = (f"{r.ms_per_image_best / ref.ms_per_image_best:.2f}", f"{r.ms_per_image_median / ref.ms_per_image_median:.2f}") if ref else ("", "")
        lines.append(f"| {r.name} | {r.ms_per_image_best:.3f} | {r.ms_per_image_median:.3f} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmms_tokprune.bench.versus_release", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"batch {args.batch}, budget {args.budget}, {torch.get_num_threads()} threads, device {args.device}; "
          "x release = ours / the release row it does the work of (fastervlm, topk_cls: release fastervlm; visionzip: maps + metric free)")
    print(format_versus_rows(run_versus_release(args.batch, args.budget, args.repeats, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

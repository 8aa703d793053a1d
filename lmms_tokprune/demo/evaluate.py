"""`lmms-tokprune eval-demo`: the documented accuracy of a demo checkpoint (EVAL.json, README table, Pareto plot).

Every number comes from a real lmms-eval run of the committed ``shapes_vqa`` test tasks (``demo.run_method``):
the uncompressed model on the first ``subset`` questions per family (what ``tests/demo/test_demo_checkpoint.py``
checks) and every method at every budget on the whole test split.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .run import default_methods, run_method

BUDGETS = (192, 128, 64, 32)
SUBSET = 10


def _row(r, wall_s: float) -> dict:
    return {"method": r.method, "budget": r.budget, "visual_tokens": r.visual_tokens, "visual_tokens_equivalent": r.visual_tokens_equivalent,
            "llm_prefill_tokens": r.llm_prefill_tokens,
            "accuracy": r.accuracy, "per_task": {k.replace("shapes_vqa_", ""): v for k, v in r.per_task.items()}, "wall_s": wall_s}


def evaluate_demo(pretrained: str = "demo", text_encoder: Optional[str] = "demo", methods: Optional[Sequence[str]] = None,
                  budgets: Sequence[int] = BUDGETS, subset: int = SUBSET, batch_size: int = 8,
                  progress: Callable[[str], None] = print) -> dict:
    """{subset, subset_accuracy, subset_per_task, note, full_test: [row per (method, budget)]}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    methods = list(methods) if methods else default_methods()
    sub = run_method(pretrained, "none", None, batch_size=batch_size, limit=subset, text_encoder=text_encoder)
    full: List[dict] = []
    for method in ["none"] + [m for m in methods if m != "none"]:
        for budget in ([None] if method == "none" else budgets):
            t0 = time.time()
            row = _row(run_method(pretrained, method, budget, batch_size=batch_size, limit=None, text_encoder=text_encoder), time.time() - t0)
            progress(json.dumps(row))
            full.append(row)
    return {
        "subset": subset,
        "subset_accuracy": sub.accuracy,
        "subset_per_task": sub.per_task,
        "note": f"lmms-eval, shapes_vqa test tasks; subset = first {subset} questions per family; full = all questions per family, "
                f"batch {batch_size}, fp32 CPU",
        "full_test": full,
    }


def equivalent_of(row: dict) -> float:
    """Equivalent visual tokens of a row (rows written before the field existed: the tokens kept)."""
    return float(row.get("visual_tokens_equivalent") or row["visual_tokens"])


def markdown_table(full: Sequence[dict]) -> str:
    """One row per (method, budget): visual tokens kept (the last layer's, for a method inside the LLM), equivalent
    tokens (per decoder layer, averaged), mean accuracy and per-family accuracy."""
    fams = list(full[0]["per_task"])
    lines = ["| method | budget | visual tokens | equivalent tokens | mean | " + " | ".join(fams) + " |",
             "|---|---|---|---|---|" + "---|" * len(fams)]
    for r in full:
        budget = "-" if r["budget"] is None else str(r["budget"])
        cells = " | ".join(f"{r['per_task'][f]:.2f}" for f in fams)
        lines.append(f"| {r['method']} | {budget} | {r['visual_tokens']:.0f} | {equivalent_of(r):.1f} | {r['accuracy']:.3f} | {cells} |")
    return "\n".join(lines)


def pareto_plot(full: Sequence[dict], path: Path) -> Path:
    """Mean accuracy vs equivalent visual tokens (= kept, before the LLM), one line per method (dashed: inside the
    LLM), the uncompressed model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..catalog import STAGE_IN_LLM, method_entry

    fig, ax = plt.subplots(figsize=(7.6, 5.0), dpi=110)
    methods = sorted({r["method"] for r in full if r["method"] != "none"})
    colours = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        pts = sorted((equivalent_of(r), r["accuracy"]) for r in full if r["method"] == m)
        style = "--" if method_entry(m).stage == STAGE_IN_LLM else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=4, color=colours[i % len(colours)], label=m)
    for r in full:
        if r["method"] == "none":
            ax.scatter([equivalent_of(r)], [r["accuracy"]], marker="*", s=160, color="black", label="none (576)", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("equivalent visual tokens per image (log scale; dashed = pruned inside the LLM)")
    ax.set_ylabel("shapes_vqa mean exact match")
    ax.set_title("demo checkpoint: accuracy vs equivalent visual tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

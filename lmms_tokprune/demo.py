"""`lmms-tokprune demo`: the whole pipeline offline on a CPU, through lmms-eval, in minutes.

By default it evaluates the shipped demo checkpoint (``pretrained=demo``: a small LLaVA-1.5-shaped model trained
on the synthetic shapes_vqa benchmark, ``text_encoder=demo`` for recover) on a fixed subset of the shapes_vqa test
tasks (the first ``--limit`` questions of each of the five families), uncompressed and with every registered
method at one visual-token budget. Accuracy is the unweighted mean of the families' exact match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from .shapes.generator import FAMILIES

DEMO_TASKS = tuple(f"shapes_vqa_{f}" for f in FAMILIES)
DEMO_LIMIT = 12  # questions per family: a fixed subset that keeps the demo at ~2-3 minutes on 2 CPU cores
BASELINES = ("none", "random", "topk_cls", "spatial")
PAPER_METHODS = ("prumerge", "prumerge_plus", "recover", "longtail")
# Kept for callers of the earlier demo: the always-available methods.
DEMO_METHODS = BASELINES
DEMO_TASK = DEMO_TASKS[0]


def default_methods() -> List[str]:
    """The baselines, then every paper method that is registered in this install."""
    from .methods import method_names

    names = set(method_names())
    return [m for m in BASELINES if m in names] + [m for m in PAPER_METHODS if m in names]


@dataclass
class DemoRow:
    method: str
    budget: Optional[int]
    visual_tokens: float
    llm_prefill_tokens: float
    accuracy: float
    per_task: Dict[str, float] = field(default_factory=dict)


def _model_args(pretrained: str, method: str, budget: Optional[int], text_encoder: Optional[str]) -> str:
    args = f"pretrained={pretrained},method={method}"
    if budget is not None and method != "none":
        args += f",budget={budget}"
    if method == "recover" and text_encoder:
        args += f",text_encoder={text_encoder}"
    return args


def run_method(pretrained: str, method: str, budget: Optional[int], batch_size: int, limit: Optional[int] = None,
               tasks: Sequence[str] = DEMO_TASKS, text_encoder: Optional[str] = "demo") -> DemoRow:
    """One lmms-eval run of the demo tasks; numbers come from lmms-eval's own results dict."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .paths import tasks_dir

    results = simple_evaluate(
        model="llava_tokprune",
        model_args=_model_args(pretrained, method, budget, text_encoder),
        tasks=list(tasks),
        batch_size=batch_size,
        limit=limit,
        task_manager=TaskManager("WARNING", include_path=str(tasks_dir()), model_name="llava_tokprune"),
        verbosity="WARNING",
    )
    per_task = {}
    for task in tasks:
        if not results or task not in results.get("results", {}):
            raise RuntimeError(f"lmms-eval returned no results for {method} on {task}")
        per_task[task] = float(results["results"][task]["exact_match,none"])
    throughput = results.get("throughput", {})
    return DemoRow(
        method=method,
        budget=None if method == "none" else budget,
        visual_tokens=float(throughput["avg_visual_tokens_kept"]),
        llm_prefill_tokens=float(throughput["avg_llm_prefill_tokens"]),
        accuracy=sum(per_task.values()) / len(per_task),
        per_task=per_task,
    )


def run_demo(pretrained: Optional[str], methods: Optional[Sequence[str]], budget: Union[int, Sequence[int]], batch_size: int,
             limit: Optional[int] = DEMO_LIMIT, text_encoder: Optional[str] = None) -> List[DemoRow]:
    """``none`` once, then every other method at every budget (a list gives the accuracy-vs-tokens trade-off)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if pretrained is None:
        pretrained = "demo"
        text_encoder = text_encoder or "demo"
    methods = list(methods) if methods else default_methods()
    if "recover" in methods and not text_encoder:
        raise ValueError("method recover needs --text-encoder for a checkpoint other than the shipped demo one")
    budgets = [budget] if isinstance(budget, int) else list(budget)
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"budgets must be positive visual-token counts, got {budgets}")
    runs = [(m, None) for m in methods if m == "none"] + [(m, b) for m in methods if m != "none" for b in budgets]
    return [run_method(pretrained, m, b, batch_size, limit, text_encoder=text_encoder) for m, b in runs]


def format_table(rows: Sequence[DemoRow]) -> str:
    fams = [t.replace("shapes_vqa_", "") for t in (rows[0].per_task if rows else {})]
    lines = ["| method | budget | visual tokens | LLM prefill tokens | accuracy | " + " | ".join(fams) + " |",
             "|---|---|---|---|---|" + "---|" * len(fams)]
    for r in rows:
        budget = "-" if r.budget is None else str(r.budget)
        cells = " | ".join(f"{v:.2f}" for v in r.per_task.values())
        lines.append(f"| {r.method} | {budget} | {r.visual_tokens:.1f} | {r.llm_prefill_tokens:.1f} | {r.accuracy:.3f} | {cells} |")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[DemoRow]) -> dict:
    return {"results": [{"method": r.method, "budget": r.budget, "visual_tokens": r.visual_tokens, "accuracy": r.accuracy,
                         "llm_prefill_tokens": r.llm_prefill_tokens, "per_task": r.per_task} for r in rows]}

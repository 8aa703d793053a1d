"""`lmms-tokprune demo`: the whole pipeline offline on a CPU, through lmms-eval, in minutes."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

DEMO_TASK = "tokprune_smoke"
DEMO_METHODS = ("none", "random", "topk_cls", "spatial")


@dataclass
class DemoRow:
    method: str
    budget: Optional[int]
    visual_tokens: float
    llm_prefill_tokens: float
    accuracy: float


def run_method(pretrained: str, method: str, budget: Optional[int], batch_size: int, limit: Optional[int] = None) -> DemoRow:
    """One lmms-eval run of the demo task; numbers come from lmms-eval's own results dict."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .paths import tasks_dir

    model_args = f"pretrained={pretrained},method={method}"
    if budget is not None and method != "none":
        model_args += f",budget={budget}"
    results = simple_evaluate(
        model="llava_tokprune",
        model_args=model_args,
        tasks=[DEMO_TASK],
        batch_size=batch_size,
        limit=limit,
        task_manager=TaskManager("WARNING", include_path=str(tasks_dir()), model_name="llava_tokprune"),
        verbosity="WARNING",
    )
    if not results or DEMO_TASK not in results.get("results", {}):
        raise RuntimeError(f"lmms-eval returned no results for {method}")
    task_result = results["results"][DEMO_TASK]
    throughput = results.get("throughput", {})
    return DemoRow(
        method=method,
        budget=None if method == "none" else budget,
        visual_tokens=float(throughput["avg_visual_tokens_kept"]),
        llm_prefill_tokens=float(throughput["avg_llm_prefill_tokens"]),
        accuracy=float(task_result["exact_match,none"]),
    )


def run_demo(pretrained: Optional[str], methods: Sequence[str], budget: int, batch_size: int, limit: Optional[int] = None) -> List[DemoRow]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if pretrained is None:
        from .testing.tiny import tiny_llava_dir

        pretrained = str(tiny_llava_dir())
    return [run_method(pretrained, m, budget, batch_size, limit) for m in methods]


def format_table(rows: Sequence[DemoRow]) -> str:
    lines = ["| method | budget | visual tokens | LLM prefill tokens | accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r.budget is None else str(r.budget)
        lines.append(f"| {r.method} | {budget} | {r.visual_tokens:.1f} | {r.llm_prefill_tokens:.1f} | {r.accuracy:.3f} |")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[DemoRow]) -> dict:
    return {"results": [{k: v for k, v in asdict(r).items() if k != "llm_prefill_tokens"} | {"llm_prefill_tokens": r.llm_prefill_tokens} for r in rows]}

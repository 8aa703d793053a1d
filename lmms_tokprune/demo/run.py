"""`lmms-tokprune demo`: the whole pipeline offline on a CPU, through lmms-eval, in minutes.

By default it evaluates the shipped demo checkpoint (``pretrained=demo``: a small LLaVA-1.5-shaped model trained
on the synthetic shapes_vqa benchmark, ``text_encoder=demo`` for recover) on a fixed subset of the shapes_vqa test
tasks (the first ``--limit`` questions of each of the five families), uncompressed and with every registered
method at one visual-token budget. Accuracy is the unweighted mean of the families' exact match.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import yaml

from ..catalog import METHODS
from ..paths import tasks_dir

DEMO_GROUP = "shapes_vqa"  # the committed test split of the synthetic benchmark the demo checkpoint was trained on
DEMO_LIMIT = 12  # questions per family: a fixed subset that keeps the demo at ~2-3 minutes on 2 CPU cores


def demo_tasks() -> List[str]:
    """The shapes_vqa family tasks, as the committed group YAML lists them."""
    group = yaml.safe_load((tasks_dir() / DEMO_GROUP / f"{DEMO_GROUP}.yaml").read_text())
    return list(group["task"])


def default_methods() -> List[str]:
    """Every method of the catalog (baselines first), in the order users see them."""
    return [m.name for m in METHODS]


@dataclass
class DemoRow:
    method: str
    budget: Optional[int]
    visual_tokens: float
    llm_prefill_tokens: float
    accuracy: float
    per_task: Dict[str, float] = field(default_factory=dict)
    visual_tokens_equivalent: float = 0.0  # visual tokens per decoder layer, averaged (= visual_tokens before the LLM)


def needs_text(method: str) -> bool:
    """Does the method read a CLIP text encoder (text_encoder=)?"""
    from ..methods import get_method

    return get_method(method).needs_text_encoder


# A decoder too shallow for the released cut layers (the demo LLM has 3): each in-LLM method cuts as early as it can.
SHALLOW_CUTS = {"fastv": {"k": 1}, "dart": {"k": 1}, "pdrop": {"layer_list": "1/2"}, "sparsevlm": {"prune_layers": "0/1"}}
SHALLOW_BELOW = 16  # decoder layers


def decoder_layers(pretrained: str) -> int:
    import json

    from ..assets import resolve_checkpoint

    config = json.loads((Path(resolve_checkpoint(pretrained)) / "config.json").read_text())
    return int(config["text_config"]["num_hidden_layers"])


def method_args(method: str, budget: Optional[int], layers: int, patches: int = 576) -> Dict[str, object]:
    """The model_args of one demo run. Before the LLM `budget` = tokens kept per image. Inside the LLM on a shallow
    decoder, the methods cut before layer 1 (SHALLOW_CUTS) and `budget` is the equivalent of keeping that many from
    there on, (N + (L - 1) * budget) / L rounded, so their rows keep as many visual tokens as the others' after the
    first layer (which sees all N); on a deep decoder `budget` is passed as is (equivalent visual tokens)."""
    from ..catalog import STAGE_IN_LLM, method_entry

    if budget is None or method == "none":
        return {}
    if method_entry(method).stage != STAGE_IN_LLM or layers >= SHALLOW_BELOW:
        return {"budget": budget}
    return {**SHALLOW_CUTS.get(method, {}), "budget": round((patches + (layers - 1) * budget) / layers)}


def _model_args(pretrained: str, method: str, budget: Optional[int], text_encoder: Optional[str]) -> str:
    args = f"pretrained={pretrained},method={method}"
    for key, value in method_args(method, budget, decoder_layers(pretrained)).items():
        args += f",{key}={value}"
    if text_encoder and needs_text(method):
        args += f",text_encoder={text_encoder}"
    return args


def run_method(pretrained: str, method: str, budget: Optional[int], batch_size: int, limit: Optional[int] = None,
               tasks: Optional[Sequence[str]] = None, text_encoder: Optional[str] = "demo", verbosity: str = "WARNING") -> DemoRow:
    """One lmms-eval run of the demo tasks; numbers come from lmms-eval's own results dict."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tasks = list(tasks or demo_tasks())
    results = simple_evaluate(
        model="llava_tokprune",
        model_args=_model_args(pretrained, method, budget, text_encoder),
        tasks=list(tasks),
        batch_size=batch_size,
        limit=limit,
        task_manager=TaskManager(verbosity, include_path=str(tasks_dir()), model_name="llava_tokprune"),
        verbosity=verbosity,
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
        visual_tokens_equivalent=float(throughput.get("avg_visual_tokens_equivalent", throughput["avg_visual_tokens_kept"])),
        accuracy=sum(per_task.values()) / len(per_task),
        per_task=per_task,
    )


@contextlib.contextmanager
def held_back_stderr(enabled: bool = True) -> Iterator[None]:
    """Collect sys.stderr inside the block; replay its tail if the block raises."""
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-20000:])
        raise


def run_demo(pretrained: Optional[str], methods: Optional[Sequence[str]], budget: Union[int, Sequence[int]], batch_size: int,
             limit: Optional[int] = DEMO_LIMIT, text_encoder: Optional[str] = None,
             progress: Optional[Callable[[str], None]] = None, verbose: bool = False) -> List[DemoRow]:
    """``none`` once, then every other method at every budget (a list gives the accuracy-vs-tokens trade-off).

    `progress` gets one line per finished run. Unless `verbose`, what lmms-eval and transformers write to
    stderr while a run goes (progress bars, load reports) is held back, and shown only if the run fails.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if pretrained is None:
        pretrained = "demo"
        text_encoder = text_encoder or "demo"
    methods = list(methods) if methods else default_methods()
    guided = [m for m in methods if needs_text(m)]
    if guided and not text_encoder:
        raise ValueError(f"method(s) {', '.join(guided)} need --text-encoder for a checkpoint other than the shipped demo one")
    budgets = [budget] if isinstance(budget, int) else list(budget)
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"budgets must be positive visual-token counts, got {budgets}")
    runs = [(m, None) for m in methods if m == "none"] + [(m, b) for m in methods if m != "none" for b in budgets]
    rows = []
    for i, (m, b) in enumerate(runs, 1):
        started = time.time()
        with held_back_stderr(enabled=not verbose):
            rows.append(run_method(pretrained, m, b, batch_size, limit, text_encoder=text_encoder, verbosity="INFO" if verbose else "WARNING"))
        if progress is not None:
            row = rows[-1]
            equivalent = f", {row.visual_tokens_equivalent:.0f} equivalent" if abs(row.visual_tokens_equivalent - row.visual_tokens) >= 0.5 else ""
            progress(f"[{i}/{len(runs)}] {m}{'' if b is None else f' budget {b}'}: accuracy {row.accuracy:.3f}, "
                     f"{row.visual_tokens:.0f} visual tokens{equivalent} ({time.time() - started:.0f} s)")
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    fams = [t.replace("shapes_vqa_", "") for t in (rows[0].per_task if rows else {})]
    lines = ["| method | budget | visual tokens | equivalent tokens | LLM prefill tokens | accuracy | " + " | ".join(fams) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(fams)]
    for r in rows:
        budget = "-" if r.budget is None else str(r.budget)
        cells = " | ".join(f"{v:.2f}" for v in r.per_task.values())
        lines.append(f"| {r.method} | {budget} | {r.visual_tokens:.1f} | {r.visual_tokens_equivalent:.1f} | {r.llm_prefill_tokens:.1f} | "
                     f"{r.accuracy:.3f} | {cells} |")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[DemoRow]) -> dict:
    return {"results": [{"method": r.method, "budget": r.budget, "visual_tokens": r.visual_tokens,
                         "visual_tokens_equivalent": r.visual_tokens_equivalent, "accuracy": r.accuracy,
                         "llm_prefill_tokens": r.llm_prefill_tokens, "per_task": r.per_task} for r in rows]}

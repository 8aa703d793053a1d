"""`lmms-tokprune leaderboard RUNS... --out DIR`: one table (md + csv) and a Pareto plot from lmms-eval runs.

Input: lmms-eval output folders — a sweep's ``output_dir`` or any run folders. Every ``*_results.json``
below them is found; lmms-eval writes ``<output_path>/<model>/<date>_results.json``, so the run folder
is ``<output_path>`` and its name is the row's name. The newest results file of each run folder is used.

Per run (row):
- method / variant / budget or ratio: from ``results["config"]["model_args"]`` and the model id
  (``llava_prumerge`` presets ``prumerge`` etc.; ``config=<yaml>`` model_args are read too);
- each task's main metric: ``--metric task=name`` if given, else the benchmark's headline metric
  (MME: ``mme_perception_score``, POPE: ``pope_accuracy``, SEED: ``seed_image``, MMBench:
  ``gpt_eval_score``, the VQA-style tasks: ``exact_match``), else the first numeric metric of the task
  that is not a stderr;
- visual tokens kept, retention (%), LLM prefill tokens: the run means in ``throughput.avg_*``;
- prefill TFLOPs: ``throughput.avg_prefill_tflops`` if the run logged it, else computed (marked ``*``)
  from the mean LLM prefill length with :mod:`lmms_tokprune.efficiency.flops` and the checkpoint's
  config (a local ``pretrained`` folder, a known preset id, or a cached hub config), else blank;
- relative score (%): mean over tasks of 100 x score / baseline score, where the baseline is the
  uncompressed run (method ``none``) of the same sweep folder (``--baseline NAME`` picks one). Without
  any baseline, scores are relative to the best run of each task.

Rows: baselines first, then by relative score, best first. Outputs: ``leaderboard.md``,
``leaderboard.csv``, ``pareto.png`` (relative score vs visual tokens and vs prefill TFLOPs, one line per
method and variant, the baseline marked with a star).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..catalog import FAMILY_BASELINE, GENERIC_MODEL_ID, METHODS, model_ids

# model id -> the method it presets, from the torch-free catalog (the report imports neither the harness nor torch)
PRESET_METHODS = {mid: method for mid, method in model_ids().items() if method is not None}
TOKPRUNE_MODELS = set(model_ids())
VARIANT_METHODS = {m.name for m in METHODS if m.family != FAMILY_BASELINE}  # the baselines have no variant worth naming
BASELINE_METHOD = "none"

# Headline metric of the benchmarks of the papers' tables (lmms-eval 0.7.3 task names).
MAIN_METRICS = {
    "scienceqa_img": "exact_match",
    "textvqa_val": "exact_match",
    "vqav2_val": "exact_match",
    "gqa": "exact_match",
    "mme": "mme_perception_score",
    "pope": "pope_accuracy",
    "mmbench_en_dev_static": "gpt_eval_score",
    "seedbench": "seed_image",
}


@dataclass
class RunRow:
    name: str
    run_dir: Path
    results_file: Path
    group: Path
    model: str
    model_args: Dict[str, str]
    method: str
    variant: str
    budget: Optional[str]
    ratio: Optional[str]
    limit: Optional[float]
    scores: Dict[str, Tuple[str, float]] = field(default_factory=dict)  # task -> (metric, value)
    visual_tokens: Optional[float] = None
    visual_tokens_equivalent: Optional[float] = None  # per decoder layer, averaged (= kept for methods before the LLM)
    retention_pct: Optional[float] = None
    llm_prefill_tokens: Optional[float] = None
    prefill_tflops: Optional[float] = None
    tflops_computed: bool = False
    relative_pct: Optional[float] = None
    baseline_name: Optional[str] = None

    @property
    def mean_score(self) -> Optional[float]:
        values = [v for _, v in self.scores.values()]
        return sum(values) / len(values) if values else None

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE_METHOD

    @property
    def label(self) -> str:
        """Line label in the plot: method (+ variant for the seed methods)."""
        return f"{self.method} ({self.variant})" if self.method in VARIANT_METHODS else self.method

    @property
    def setting(self) -> str:
        if self.budget is not None:
            return f"budget {self.budget}"
        if self.ratio is not None:
            return f"ratio {self.ratio}"
        return "all" if self.is_baseline else "default"


# -- reading -------------------------------------------------------------------------------------
def _parse_args(text: Any) -> Dict[str, str]:
    if isinstance(text, Mapping):
        return {str(k): str(v) for k, v in text.items()}
    out: Dict[str, str] = {}
    for part in str(text or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _config_file_args(path: str) -> Tuple[Dict[str, str], Optional[str]]:
    """model_args (+ model) of a model_configs YAML named by `config=`; empty if unreadable."""
    try:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # best effort: the run's own args still apply
        return {}, None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        return {}, None
    return _parse_args(data.get("model_args", "")), data.get("model")


def _setting(value: Optional[str]) -> Optional[str]:
    """A budget / ratio label: `none` (allowed where the default is none) is no setting."""
    return None if value is None or value.strip().lower() in ("", "none", "null") else value


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def main_metric(task: str, task_results: Mapping[str, Any], preferred: Optional[str] = None) -> Optional[Tuple[str, float]]:
    """(metric name, value) of a task's headline metric in lmms-eval's results[task]."""
    entries = []
    for key, value in task_results.items():
        if key == "alias" or "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if "_stderr" in metric:
            continue
        number = _number(value)
        if number is None:
            continue
        entries.append((metric, filt, number))
    if not entries:
        return None
    if preferred:  # asked for explicitly: that metric or nothing
        for metric, filt, number in entries:
            if metric == preferred or f"{metric},{filt}" == preferred:
                return (metric if filt == "none" else f"{metric},{filt}"), number
        return None
    for metric, filt, number in entries:
        if metric == MAIN_METRICS.get(task):
            return (metric if filt == "none" else f"{metric},{filt}"), number
    metric, filt, number = entries[0]
    return (metric if filt == "none" else f"{metric},{filt}"), number


def _run_dir_of(results_file: Path, data: Mapping[str, Any]) -> Path:
    parent = results_file.parent
    if data.get("model_name_sanitized") and parent.name == data["model_name_sanitized"]:
        return parent.parent
    return parent


@dataclass
class Found:
    """The results files to report (one per run) and a named warning for every file that cannot be."""

    entries: List[Tuple[Path, Path, Dict[str, Any]]]  # (run folder, results file, its JSON)
    warnings: List[str] = field(default_factory=list)


def _identity(run_dir: Path, data: Mapping[str, Any]) -> Tuple[str, str, str, str]:
    """Two results files are the same run when folder, model, model_args and limit agree (a rerun: the newest
    is reported); different model args in one folder are two runs."""
    config = data.get("config") or {}
    return str(run_dir), str(config.get("model")), str(config.get("model_args")), str(config.get("limit"))


def find_results(paths: Sequence[os.PathLike]) -> Found:
    """Every *_results.json below `paths`: one entry per run (newest file of a rerun), a warning per unreadable file."""
    newest: Dict[Tuple[str, str, str, str], Tuple[Path, Path, Dict[str, Any]]] = {}
    warnings: List[str] = []
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise ValueError(f"{str(root)!r} does not exist")
        files = [root] if root.is_file() else sorted(root.rglob("*_results.json"))
        for results_file in files:
            try:
                data = json.loads(results_file.read_text())
            except (OSError, ValueError) as err:
                warnings.append(f"skipped {results_file}: not a complete results JSON ({str(err).splitlines()[0]})")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
                warnings.append(f"skipped {results_file}: no 'results' mapping (not an lmms-eval results file)")
                continue
            run_dir = _run_dir_of(results_file.resolve(), data)
            key = _identity(run_dir, data)
            stamp = (results_file.name, results_file.stat().st_mtime)
            if key not in newest or stamp > (newest[key][1].name, newest[key][1].stat().st_mtime):
                newest[key] = (run_dir, results_file.resolve(), data)
    if not newest:
        detail = ("; " + "; ".join(warnings)) if warnings else ""
        raise ValueError(f"no lmms-eval *_results.json found under {', '.join(map(str, paths))}{detail}")
    return Found(list(newest.values()), warnings)


def resolved_method_args(results_file: Path) -> Optional[Dict[str, str]]:
    """The resolved method of a run as its own samples recorded it (`token_counts[0].method_args`), or None."""
    stamp = results_file.name[: -len("_results.json")]
    for samples in sorted(results_file.parent.glob(f"{stamp}_samples_*.jsonl")):
        try:
            with open(samples) as fh:
                for line in fh:
                    counts = (json.loads(line).get("token_counts") or [None])[0] or {}
                    if counts.get("method_args"):
                        return _parse_args(counts["method_args"])
                    break
        except (OSError, ValueError):
            continue
    return None


def _flops_config(pretrained: Optional[str]) -> Any:
    if not pretrained:
        return None
    from ..efficiency.flops import llava_config_for

    try:
        return llava_config_for(pretrained)
    except ValueError:
        pass
    if os.path.isabs(pretrained) or pretrained.startswith("."):
        return None  # a checkpoint folder that is gone
    try:  # a hub id whose config is in the local cache
        from transformers import AutoConfig

        return llava_config_for(AutoConfig.from_pretrained(pretrained, local_files_only=True))
    except Exception:  # not loadable: the TFLOPs cell stays blank
        return None


def read_run(run_dir: Path, results_file: Path, data: Mapping[str, Any], metrics: Optional[Mapping[str, str]] = None,
             warnings: Optional[List[str]] = None) -> RunRow:
    config = data.get("config") or {}
    model = str(config.get("model") or data.get("model_name") or "?")
    args = _parse_args(config.get("model_args", ""))
    resolved = resolved_method_args(results_file)
    if resolved is not None:  # what the run itself resolved (a config file may have changed since)
        args = {**{k: v for k, v in args.items() if k not in ("budget", "ratio")}, **resolved}
    elif "config" in args:
        from_file, _ = _config_file_args(args["config"])
        args = {**from_file, **args}
        if warnings is not None:
            warnings.append(f"{run_dir.name}: labelled from the current contents of {args['config']} (the run logged no samples "
                            "with its resolved method)")
    method = args.get("method") or PRESET_METHODS.get(model) or (BASELINE_METHOD if model == GENERIC_MODEL_ID else model)
    if model not in TOKPRUNE_MODELS:
        variant = "-"
    elif "variant" in args:
        variant = args["variant"]
    else:  # the seed methods default to 'fixed'; the baselines have no variants worth naming
        variant = "fixed" if method in VARIANT_METHODS else "-"
    row = RunRow(
        name=run_dir.name, run_dir=run_dir, results_file=results_file, group=run_dir.parent, model=model, model_args=args,
        method=method, variant=variant, budget=_setting(args.get("budget")), ratio=_setting(args.get("ratio")),
        limit=_number(config.get("limit")),
    )
    for task, task_results in (data.get("results") or {}).items():
        if isinstance(task_results, Mapping):
            picked = main_metric(task, task_results, (metrics or {}).get(task))
            if picked is not None:
                row.scores[task] = picked
    tp = data.get("throughput") or {}
    row.visual_tokens = _number(tp.get("avg_visual_tokens_kept"))
    equivalent = _number(tp.get("avg_visual_tokens_equivalent"))
    row.visual_tokens_equivalent = row.visual_tokens if equivalent is None else equivalent  # runs before the field: kept
    retention = _number(tp.get("avg_visual_retention"))
    if retention is None and row.visual_tokens is not None and _number(tp.get("avg_visual_tokens_in")):
        retention = row.visual_tokens / float(tp["avg_visual_tokens_in"])
    row.retention_pct = None if retention is None else 100.0 * retention
    row.llm_prefill_tokens = _number(tp.get("avg_llm_prefill_tokens"))
    row.prefill_tflops = _number(tp.get("avg_prefill_tflops"))
    if row.prefill_tflops is None and row.llm_prefill_tokens is not None:
        cfg = _flops_config(args.get("pretrained") or ("llava-1.5-7b" if model in TOKPRUNE_MODELS else None))
        if cfg is not None:
            from ..efficiency.flops import llm_prefill_flops

            row.prefill_tflops = llm_prefill_flops(cfg.text, row.llm_prefill_tokens) / 1e12
            row.tflops_computed = True
    return row


# -- table ---------------------------------------------------------------------------------------
def _relative(rows: List[RunRow], baseline_name: Optional[str]) -> bool:
    """Fill relative_pct; True when a baseline run was used (else: relative to the best run per task)."""
    baselines = [r for r in rows if r.is_baseline]
    if baseline_name is not None:
        chosen = [r for r in rows if r.name == baseline_name]
        if not chosen:
            raise ValueError(f"--baseline {baseline_name!r}: no such run; runs: {', '.join(r.name for r in rows)}")
        baselines = chosen
    if baselines:
        for row in rows:
            same_group = [b for b in baselines if b.group == row.group]
            base = row if row in baselines else (same_group or baselines)[0]
            ratios = [100.0 * v / base.scores[t][1] for t, (_, v) in row.scores.items() if t in base.scores and base.scores[t][1]]
            row.relative_pct = sum(ratios) / len(ratios) if ratios else None
            row.baseline_name = base.name
        return True
    best: Dict[str, float] = {}
    for row in rows:
        for task, (_, value) in row.scores.items():
            best[task] = max(best.get(task, value), value)
    for row in rows:
        ratios = [100.0 * v / best[t] for t, (_, v) in row.scores.items() if best.get(t)]
        row.relative_pct = sum(ratios) / len(ratios) if ratios else None
    return False


def _task_columns(rows: Sequence[RunRow]) -> List[Tuple[str, str]]:
    """(task, metric) columns in order of first appearance."""
    cols: List[Tuple[str, str]] = []
    for row in rows:
        for task, (metric, _) in row.scores.items():
            if (task, metric) not in cols:
                cols.append((task, metric))
    return cols


def _qualify(rows: List[RunRow], name_of) -> None:
    """Rows sharing a name get `name_of(row)` in front of (or after) it, until names are unique."""
    names: Dict[str, int] = {}
    for row in rows:
        names[row.name] = names.get(row.name, 0) + 1
    for row in rows:
        if names[row.name] > 1:
            row.name = name_of(row)


def build_rows(paths: Sequence[os.PathLike], metrics: Optional[Mapping[str, str]] = None,
               baseline: Optional[str] = None, warnings: Optional[List[str]] = None) -> Tuple[List[RunRow], bool]:
    """The rows (baselines first, then best relative score first) and whether a baseline run was found.
    Files that cannot be rows, and labels that could not be read from the run itself, go to `warnings`."""
    found = find_results(paths)
    notes = warnings if warnings is not None else []
    notes.extend(found.warnings)
    rows = [read_run(run_dir, f, data, metrics, notes) for run_dir, f, data in found.entries]
    for task, metric in (metrics or {}).items():  # a typo in --metric is an error, not an empty column
        if not any(task in r.scores for r in rows):
            available = sorted({m.split(",", 1)[0] for _, f, d in found.entries for m in (d.get("results") or {}).get(task, {})
                                if "," in m and "_stderr" not in m})
            if available:
                raise ValueError(f"--metric {task}={metric}: no run has it; {task} metrics: {', '.join(available)}")
    # several runs in one output folder: told apart by what they ran; the same run name in two sweeps: by the sweep folder
    _qualify(rows, lambda r: f"{r.name}/{r.method}" + ("" if r.setting in ("all", "default") else f"-{r.setting.replace(' ', '')}"))
    _qualify(rows, lambda r: f"{r.name}/{r.results_file.name[: -len('_results.json')]}")
    _qualify(rows, lambda r: f"{r.group.name}/{r.name}")
    has_baseline = _relative(rows, baseline)
    rows.sort(key=lambda r: (not (r.is_baseline or r.name == baseline),
                             -(r.relative_pct if r.relative_pct is not None else -math.inf), r.name))
    return rows, has_baseline


def _fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return ""
    if value != 0 and abs(value) < 0.001:
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.4f}"


CSV_FIXED = ["run", "model", "method", "variant", "budget", "ratio"]
CSV_TAIL = ["visual_tokens_kept", "visual_tokens_equivalent", "visual_retention_pct", "llm_prefill_tokens", "prefill_tflops", "relative_score_pct",
            "baseline", "limit", "results_file"]


def csv_rows(rows: Sequence[RunRow]) -> Tuple[List[str], List[Dict[str, Any]]]:
    cols = _task_columns(rows)
    header = CSV_FIXED + [f"{t}/{m}" for t, m in cols] + CSV_TAIL
    out = []
    for r in rows:
        rec: Dict[str, Any] = {"run": r.name, "model": r.model, "method": r.method, "variant": r.variant,
                               "budget": r.budget or "", "ratio": r.ratio or ""}
        for t, m in cols:
            rec[f"{t}/{m}"] = r.scores[t][1] if t in r.scores and r.scores[t][0] == m else ""
        rec.update({
            "visual_tokens_kept": "" if r.visual_tokens is None else r.visual_tokens,
            "visual_tokens_equivalent": "" if r.visual_tokens_equivalent is None else r.visual_tokens_equivalent,
            "visual_retention_pct": "" if r.retention_pct is None else r.retention_pct,
            "llm_prefill_tokens": "" if r.llm_prefill_tokens is None else r.llm_prefill_tokens,
            "prefill_tflops": "" if r.prefill_tflops is None else r.prefill_tflops,
            "relative_score_pct": "" if r.relative_pct is None else r.relative_pct,
            "baseline": r.baseline_name or "",
            "limit": "" if r.limit is None else r.limit,
            "results_file": str(r.results_file),
        })
        out.append(rec)
    return header, out


def markdown_table(rows: Sequence[RunRow], has_baseline: bool) -> str:
    cols = _task_columns(rows)
    rel = "vs baseline (%)" if has_baseline else "vs best run (%)"
    header = ["run", "method", "variant", "setting"] + [f"{t} ({m})" for t, m in cols] + [
        "visual tokens", "equivalent tokens", "retention (%)", "LLM prefill tokens", "prefill TFLOPs", rel]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = f"**{r.name}** (baseline)" if r.is_baseline else r.name
        cells = [name, r.method, r.variant, r.setting]
        for t, m in cols:
            cells.append(_fmt(r.scores[t][1], 4) if t in r.scores and r.scores[t][0] == m else "")
        tflops = _fmt(r.prefill_tflops, 3) + ("*" if r.tflops_computed and r.prefill_tflops is not None else "")
        cells += [_fmt(r.visual_tokens, 1), _fmt(r.visual_tokens_equivalent, 1), _fmt(r.retention_pct, 1), _fmt(r.llm_prefill_tokens, 1), tflops, _fmt(r.relative_pct, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if any(r.tflops_computed for r in rows):
        notes.append("\\* TFLOPs computed from the mean LLM prefill length and the checkpoint config (lmms_tokprune.efficiency.flops).")
    if has_baseline:
        notes.append("vs baseline: mean over tasks of 100 × score / score of the uncompressed run (method none) of the same sweep.")
    else:
        notes.append("No uncompressed (method none) run found: relative scores are against the best run of each task.")
    limits = sorted({r.limit for r in rows if r.limit is not None})
    if limits:
        shown = ", ".join(_fmt(x, 0) if x >= 1 else str(x) for x in limits)
        notes.append(f"Partial runs: evaluated with --limit {shown} (not full benchmarks).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def pareto_plot(rows: Sequence[RunRow], path: Path, has_baseline: bool) -> None:
    """Score vs visual tokens and vs prefill TFLOPs; one line per method (and variant), baseline starred.

    The score is the relative score (%) when every scored run has one; otherwise (e.g. a baseline
    scoring 0 on a task) the mean of the raw main metrics.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [r for r in rows if r.scores]
    use_relative = bool(scored) and all(r.relative_pct is not None for r in scored)
    ylabel = ("score vs baseline (%)" if has_baseline else "score vs best run (%)") if use_relative else "mean main metric (raw)"

    def score_of(r: RunRow) -> Optional[float]:
        return r.relative_pct if use_relative else r.mean_score
    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    for ax, attr, xlabel in ((fig.add_subplot(1, 2, 1), "visual_tokens_equivalent", "equivalent visual tokens (per decoder layer, mean)"),
                             (fig.add_subplot(1, 2, 2), "prefill_tflops", "LLM prefill TFLOPs (mean)")):
        plotted = False
        groups: Dict[str, List[RunRow]] = {}
        for r in rows:
            if not r.is_baseline and getattr(r, attr) is not None and score_of(r) is not None:
                groups.setdefault(r.label, []).append(r)
        for label, members in sorted(groups.items()):
            members.sort(key=lambda r: getattr(r, attr))
            xs = [getattr(r, attr) for r in members]
            ys = [score_of(r) for r in members]
            ax.plot(xs, ys, marker="o", label=label)
            for r, x, y in zip(members, xs, ys):
                if r.budget is not None or r.ratio is not None:
                    ax.annotate(str(r.budget or r.ratio), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            plotted = True
        for r in rows:
            if r.is_baseline and getattr(r, attr) is not None and score_of(r) is not None:
                ax.scatter([getattr(r, attr)], [score_of(r)], marker="*", s=220, color="black", zorder=5, label=f"baseline: {r.name}")
                ax.axhline(score_of(r), color="gray", linestyle="--", linewidth=0.8)
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "no run has both a score and this quantity", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Visual-token compression: score vs cost")
    fig.tight_layout()
    fig.savefig(str(path))


def write_leaderboard(paths: Sequence[os.PathLike], out_dir: os.PathLike, metrics: Optional[Mapping[str, str]] = None,
                      baseline: Optional[str] = None) -> Dict[str, Any]:
    """Write leaderboard.md, leaderboard.csv and pareto.png into out_dir; returns their paths, the rows and the warnings."""
    warnings: List[str] = []
    rows, has_baseline = build_rows(paths, metrics, baseline, warnings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path, png_path = out / "leaderboard.md", out / "leaderboard.csv", out / "pareto.png"
    md = markdown_table(rows, has_baseline)
    if warnings:
        md += "\n" + "\n".join(f"warning: {w}" for w in warnings) + "\n"
    md_path.write_text("# Leaderboard\n\n" + md)
    header, records = csv_rows(rows)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(records)
    pareto_plot(rows, png_path, has_baseline)
    return {"markdown": md_path, "csv": csv_path, "png": png_path, "rows": rows, "table": md, "warnings": warnings}


def parse_metric_overrides(items: Optional[Sequence[str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"--metric {part!r}: expected TASK=METRIC, e.g. pope=pope_f1_score")
            task, metric = part.split("=", 1)
            out[task.strip()] = metric.strip()
    return out

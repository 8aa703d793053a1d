"""`lmms-tokprune leaderboard DIR [DIR ...] --out OUT`: one table from any number of lmms-eval run folders.

Rows come from `report.runs` (one per run; shards of one sweep downloaded as separate folders merge; the same run
twice with different results is an error). Columns: per task its headline metric(s) (MME perception and
cognition apart) and that score relative to the uncompressed run (method ``none``) on the same checkpoint
(``--baseline NAME`` picks one run for all; with no ``none`` run at all, scores are relative to the best run of
each task); the mean of those relative scores; visual tokens kept; equivalent visual tokens; retention; LLM
prefill tokens; prefill TFLOPs; measured prefill ms when logged. A provenance block gives each run's checkpoint,
prompt style, configuration digest, package versions and source commit, and a warning names the runs when a
table mixes checkpoints, prompt styles or lmms-eval versions.

LLM-judged tasks (``llava_in_the_wild``, ``mmvet``, ...) whose judge failed for any sample, and every column of a
``--predict_only`` run, are "not judged" (see `report.judged`): shown as such, left out of the row's means and of
the relative scores, named in a warning (run, task, how many judge calls failed).

Outputs in OUT: ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.json``, ``pareto.png`` (relative score vs
equivalent visual tokens and vs prefill TFLOPs). Everything is read and checked before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .files import write_atomic
from .judged import NOT_JUDGED
from .runs import BASELINE_METHOD, Column, RunRow, column_name, find_results, main_metric, read_run  # noqa: F401  (re-exported)

PROVENANCE_KEYS = ("lmms_tokprune", "lmms_eval", "transformers", "torch", "git_commit")


# -- rows ----------------------------------------------------------------------------------------
def _relative_to(row: RunRow, base: RunRow) -> None:
    row.relative = {c: 100.0 * v / base.scores[c] for c, v in row.scores.items() if base.scores.get(c)}
    row.relative_pct = sum(row.relative.values()) / len(row.relative) if row.relative else None
    row.baseline_name = base.name


def _baseline_of(row: RunRow, baselines: Sequence[RunRow]) -> Optional[RunRow]:
    """The uncompressed run on the row's checkpoint: of its own folder first, then with the same --limit."""
    same = [b for b in baselines if b.checkpoint == row.checkpoint]
    for candidates in ([b for b in same if b.group == row.group and b.limit == row.limit], [b for b in same if b.limit == row.limit], same):
        if candidates:
            return candidates[0]
    return None


def _relative(rows: List[RunRow], baseline_name: Optional[str], warnings: List[str]) -> bool:
    """Fill the relative scores; True when baseline runs were used (else: relative to the best run per task)."""
    if baseline_name is not None:
        chosen = [r for r in rows if r.name == baseline_name]
        if not chosen:
            raise ValueError(f"--baseline {baseline_name!r}: no such run; runs: {', '.join(r.name for r in rows)}")
        for row in rows:
            _relative_to(row, chosen[0])
        return True
    baselines = [r for r in rows if r.is_baseline]
    if baselines:
        orphans = []
        for row in rows:
            base = row if row.is_baseline else _baseline_of(row, baselines)
            if base is None:
                orphans.append(row)
            else:
                _relative_to(row, base)
        for checkpoint in sorted({r.checkpoint for r in orphans}):
            names = ", ".join(r.name for r in orphans if r.checkpoint == checkpoint)
            warnings.append(f"no uncompressed (method none) run on checkpoint {checkpoint}: no relative scores for {names}")
        return True
    best: Dict[Column, float] = {}
    for row in rows:
        for column, value in row.scores.items():
            best[column] = max(best.get(column, value), value)
    for row in rows:
        row.relative = {c: 100.0 * v / best[c] for c, v in row.scores.items() if best.get(c)}
        row.relative_pct = sum(row.relative.values()) / len(row.relative) if row.relative else None
    return False


def _qualify(rows: List[RunRow], name_of) -> None:
    """Rows sharing a name get `name_of(row)` instead, until names are unique."""
    names: Dict[str, int] = {}
    for row in rows:
        names[row.name] = names.get(row.name, 0) + 1
    for row in rows:
        if names[row.name] > 1:
            row.name = name_of(row)


def consistency_warnings(rows: Sequence[RunRow]) -> List[str]:
    """A line per property the runs of one table should share but do not."""
    out = []
    for what, value_of in (("checkpoint", lambda r: r.checkpoint), ("prompt style", lambda r: r.prompt_style),
                           ("lmms-eval version", lambda r: r.lmms_eval_version)):
        groups: Dict[str, List[str]] = {}
        for row in rows:
            groups.setdefault(value_of(row), []).append(row.name)
        if len(groups) > 1:
            out.append(f"runs differ in {what}: " + "; ".join(f"{value} ({', '.join(names)})" for value, names in sorted(groups.items())))
    return out


def judge_warnings(rows: Sequence[RunRow]) -> List[str]:
    """A line per column that is not judged (run, task, why) and per judged column whose judge cannot be checked."""
    out = []
    for row in rows:
        for (task, metric), why in row.not_judged.items():
            reported = row.reported.get((task, metric))
            shown = "" if reported is None else f"; lmms-eval reported {reported}, which is not a score"
            out.append(f"{row.name}: {column_name(task, metric)} not judged: {why}{shown}; left out of the means "
                       "(judge it with an API key: README, Judged tasks)")
        for (task, metric), why in row.unverified.items():
            out.append(f"{row.name}: {column_name(task, metric)} is LLM-judged but {why}: its score is shown unchecked")
    return out


def build_rows(paths: Sequence[os.PathLike], metrics: Optional[Mapping[str, str]] = None,
               baseline: Optional[str] = None, warnings: Optional[List[str]] = None) -> Tuple[List[RunRow], bool]:
    """The rows (baselines first, then best relative score first) and whether a baseline run was used.
    Files that cannot be rows, labels read from a config file, missing baselines and mixed settings go to `warnings`."""
    found = find_results(paths)
    notes = warnings if warnings is not None else []
    notes.extend(found.warnings)
    rows = [read_run(run_dir, f, data, metrics, notes) for run_dir, f, data in found.entries]
    for task, metric in (metrics or {}).items():  # a typo in --metric is an error, not an empty column
        if not any(t == task for r in rows for t, _ in r.columns):
            available = sorted({m.split(",", 1)[0] for _, f, d in found.entries for m in (d.get("results") or {}).get(task, {})
                                if "," in m and "_stderr" not in m})
            if available:
                raise ValueError(f"--metric {task}={metric}: no run has it; {task} metrics: {', '.join(available)}")
    # several runs in one output folder: told apart by what they ran; the same run name in two folders: by the folder
    _qualify(rows, lambda r: f"{r.name}/{r.method}" + ("" if r.setting in ("all", "default") else f"-{r.setting.replace(' ', '')}"))
    _qualify(rows, lambda r: f"{r.name}/{r.results_file.name[: -len('_results.json')]}")
    _qualify(rows, lambda r: f"{r.group.name}/{r.name}")
    has_baseline = _relative(rows, baseline, notes)
    notes.extend(judge_warnings(rows))
    notes.extend(consistency_warnings(rows))
    rows.sort(key=lambda r: (not (r.is_baseline or r.name == baseline),
                             -(r.relative_pct if r.relative_pct is not None else -math.inf), r.name))
    return rows, has_baseline


def task_columns(rows: Sequence[RunRow]) -> List[Column]:
    """(task, metric) columns (scored or not judged) in order of first appearance."""
    cols: List[Column] = []
    for row in rows:
        for column in row.columns or row.scores:
            if column not in cols:
                cols.append(column)
    return cols


# -- formats -------------------------------------------------------------------------------------
def _fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return ""
    if value == 0:
        return f"{0:.{digits}f}"
    if abs(value) < 0.001:
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.4f}"


def _blank(value: Any) -> Any:
    return "" if value is None else value


CSV_FIXED = ["run", "model", "method", "variant", "budget", "ratio"]
CSV_TAIL = ["visual_tokens_kept", "visual_tokens_equivalent", "visual_retention_pct", "llm_prefill_tokens", "prefill_tflops", "prefill_ms",
            "relative_score_pct", "baseline", "limit", "checkpoint", "prompt_style", "config"] + list(PROVENANCE_KEYS) + ["results_file"]


def csv_rows(rows: Sequence[RunRow]) -> Tuple[List[str], List[Dict[str, Any]]]:
    cols = task_columns(rows)
    header = CSV_FIXED + [f"{t}/{m}" for t, m in cols] + [f"{t}/{m} vs baseline (%)" for t, m in cols] + CSV_TAIL
    out = []
    for r in rows:
        rec: Dict[str, Any] = {"run": r.name, "model": r.model, "method": r.method, "variant": r.variant,
                               "budget": r.budget or "", "ratio": r.ratio or ""}
        for t, m in cols:
            rec[f"{t}/{m}"] = NOT_JUDGED if (t, m) in r.not_judged else _blank(r.scores.get((t, m)))
            rec[f"{t}/{m} vs baseline (%)"] = _blank(r.relative.get((t, m)))
        rec.update({
            "visual_tokens_kept": _blank(r.visual_tokens), "visual_tokens_equivalent": _blank(r.visual_tokens_equivalent),
            "visual_retention_pct": _blank(r.retention_pct), "llm_prefill_tokens": _blank(r.llm_prefill_tokens),
            "prefill_tflops": _blank(r.prefill_tflops), "prefill_ms": _blank(r.prefill_ms), "relative_score_pct": _blank(r.relative_pct),
            "baseline": r.baseline_name or "", "limit": _blank(r.limit), "checkpoint": r.checkpoint, "prompt_style": r.prompt_style,
            "config": r.config_hash or "", **{k: r.provenance.get(k, "") for k in PROVENANCE_KEYS}, "results_file": str(r.results_file),
        })
        out.append(rec)
    return header, out


def markdown_table(rows: Sequence[RunRow], has_baseline: bool) -> str:
    cols = task_columns(rows)
    rel = "vs baseline (%)" if has_baseline else "vs best run (%)"
    show_ms = any(r.prefill_ms is not None for r in rows)
    header = ["run", "method", "variant", "setting"]
    for t, m in cols:
        header += [column_name(t, m), f"{t} {rel}"]
    header += ["mean " + rel, "visual tokens", "equivalent tokens", "retention (%)", "LLM prefill tokens", "prefill TFLOPs"]
    header += ["prefill ms"] if show_ms else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"**{r.name}** (baseline)" if r.is_baseline else r.name, r.method, r.variant, r.setting]
        for c in cols:
            cells += [NOT_JUDGED if c in r.not_judged else _fmt(r.scores.get(c), 4), _fmt(r.relative.get(c), 1)]
        tflops = _fmt(r.prefill_tflops, 3) + ("*" if r.tflops_computed and r.prefill_tflops is not None else "")
        cells += [_fmt(r.relative_pct, 1), _fmt(r.visual_tokens, 1), _fmt(r.visual_tokens_equivalent, 1), _fmt(r.retention_pct, 1),
                  _fmt(r.llm_prefill_tokens, 1), tflops]
        cells += [_fmt(r.prefill_ms, 1)] if show_ms else []
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if any(r.tflops_computed for r in rows):
        notes.append("\\* TFLOPs computed from the mean LLM prefill length and the checkpoint config (lmms_tokprune.efficiency.flops).")
    if has_baseline:
        notes.append("vs baseline: 100 × score / score of the uncompressed run (method none) on the same checkpoint; the mean is over "
                     "the run's task columns (MME perception and cognition are two columns).")
    else:
        notes.append("No uncompressed (method none) run found: relative scores are against the best run of each task.")
    notes.append("equivalent tokens: visual tokens per decoder layer, averaged over the layers (= visual tokens for methods that act "
                 "before the LLM).")
    if any(r.not_judged for r in rows):
        notes.append(f"{NOT_JUDGED}: an LLM-judged task whose judge failed for some of its samples (no API key, no network; "
                     "the warnings give the counts), or a --predict_only run. lmms-eval still reports a number for it "
                     "(llava_in_the_wild 100.0, mmvet 0.0 when every call fails): not a score, so the column is left out "
                     "of the means, and --check refuses to compare it.")
    limits = sorted({r.limit for r in rows if r.limit is not None})
    if limits:
        shown = ", ".join(_fmt(x, 0) if x >= 1 else str(x) for x in limits)
        notes.append(f"Partial runs: evaluated with --limit {shown} (not full benchmarks).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def provenance_table(rows: Sequence[RunRow]) -> str:
    header = ["run", "checkpoint", "prompt style", "config", "lmms_tokprune", "lmms-eval", "transformers", "torch", "git commit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.name, r.checkpoint, r.prompt_style, r.config_hash or ""] + [r.provenance.get(k, "") for k in PROVENANCE_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _score_record(r: RunRow, column: Column) -> Dict[str, Any]:
    t, m = column
    if column in r.not_judged:  # no score: what lmms-eval reported is kept apart, with why it is not one
        return {"task": t, "metric": m, "score": None, "relative_pct": None, "not_judged": r.not_judged[column],
                "reported": r.reported.get(column)}
    return {"task": t, "metric": m, "score": r.scores.get(column), "relative_pct": r.relative.get(column)}


def as_json(rows: Sequence[RunRow], has_baseline: bool, warnings: Sequence[str]) -> Dict[str, Any]:
    def record(r: RunRow) -> Dict[str, Any]:
        return {
            "run": r.name, "model": r.model, "method": r.method, "variant": r.variant, "setting": r.setting, "budget": r.budget,
            "ratio": r.ratio, "limit": r.limit, "is_baseline": r.is_baseline, "baseline": r.baseline_name,
            "scores": [_score_record(r, c) for c in (r.columns or list(r.scores))],
            "relative_score_pct": r.relative_pct, "visual_tokens_kept": r.visual_tokens, "visual_tokens_equivalent": r.visual_tokens_equivalent,
            "visual_retention_pct": r.retention_pct, "llm_prefill_tokens": r.llm_prefill_tokens, "prefill_tflops": r.prefill_tflops,
            "prefill_tflops_computed": r.tflops_computed, "prefill_ms": r.prefill_ms, "checkpoint": r.checkpoint,
            "prompt_style": r.prompt_style, "config": r.config_hash, "provenance": dict(r.provenance), "results_file": str(r.results_file),
        }
    return {"relative_to": "baseline" if has_baseline else "best run", "rows": [record(r) for r in rows], "warnings": list(warnings)}


def pareto_png(rows: Sequence[RunRow], has_baseline: bool) -> bytes:
    """Score vs equivalent visual tokens and vs prefill TFLOPs; one line per method (and variant), baseline starred.

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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# -- writing -------------------------------------------------------------------------------------
def render(rows: Sequence[RunRow], has_baseline: bool, warnings: Sequence[str], extra_markdown: str = "") -> Dict[str, Any]:
    """Every output in memory: {'leaderboard.md': str, 'leaderboard.csv': str, 'leaderboard.json': str, 'pareto.png': bytes}."""
    table = markdown_table(rows, has_baseline)
    md = "# Leaderboard\n\n" + table
    if warnings:
        md += "\n" + "\n".join(f"warning: {w}" for w in warnings) + "\n"
    md += "\n## Provenance\n\n" + provenance_table(rows) + extra_markdown
    header, records = csv_rows(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header)
    writer.writeheader()
    writer.writerows(records)
    return {"leaderboard.md": md, "leaderboard.csv": text.getvalue(),
            "leaderboard.json": json.dumps(as_json(rows, has_baseline, warnings), indent=2) + "\n",
            "pareto.png": pareto_png(rows, has_baseline), "table": table}


def write_outputs(out_dir: os.PathLike, files: Mapping[str, Any]) -> Dict[str, Path]:
    """Write the rendered files (each through a temporary name, so none is ever half-written)."""
    return {name: write_atomic(Path(out_dir) / name, content) for name, content in files.items() if name != "table"}


def write_leaderboard(paths: Sequence[os.PathLike], out_dir: os.PathLike, metrics: Optional[Mapping[str, str]] = None,
                      baseline: Optional[str] = None) -> Dict[str, Any]:
    """Write leaderboard.md / .csv / .json and pareto.png into out_dir; returns their paths, the rows and the warnings."""
    warnings: List[str] = []
    rows, has_baseline = build_rows(paths, metrics, baseline, warnings)
    files = render(rows, has_baseline, warnings)
    written = write_outputs(out_dir, files)
    return {"markdown": written["leaderboard.md"], "csv": written["leaderboard.csv"], "json": written["leaderboard.json"],
            "png": written["pareto.png"], "rows": rows, "table": files["table"], "warnings": warnings, "has_baseline": has_baseline}


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

"""lmms-eval run folders -> one `RunRow` per run: what it ran, its scores, its counts and how it was made.

lmms-eval writes ``<output_path>/<model>/<date>_results.json`` (+ ``<date>_samples_<task>.jsonl``), so a run
folder is ``<output_path>`` and its name is the row's name. Every ``*_results.json`` below the given folders is
found; the newest file of a rerun (same folder, model, model_args and limit) is used; a file that cannot be read
is a named warning; a given folder with no results, or results of a model that is not ours, is an error.

Per run:
- method / variant / budget or ratio: what the run itself resolved (its samples' ``token_counts[0].method_args``),
  else ``results["config"]["model_args"]`` and the model id (``llava_prumerge`` presets ``prumerge``; a
  ``config=<yaml>`` is read, with a warning that it may have changed since);
- per task the headline metric(s): ``--metric task=name`` if given, else the benchmark's (MME: perception AND
  cognition, two columns; POPE ``pope_accuracy``; SEED ``seed_image``; MMBench ``gpt_eval_score``; VQA-style
  ``exact_match``), else the task's first numeric metric that is not a stderr;
- LLM-judged tasks (``llava_in_the_wild``, ``mmvet``, ...; see `report.judged`): a column whose samples show a
  failed judge call, or a column of a ``--predict_only`` run, is "not judged" (`RunRow.not_judged`, with why),
  not a score: lmms-eval reports 100.0 / 0.0 for such runs;
- counts: the run means in ``throughput.avg_*`` (visual tokens kept, equivalent, retention, LLM prefill tokens,
  prefill TFLOPs, measured prefill ms); TFLOPs are computed from the mean prefill length when not logged (marked);
- provenance: the samples' ``token_counts[0].provenance`` (package versions, source commit, checkpoint, prompt
  style) and ``config`` (the resolved configuration's digest), falling back to the results JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..catalog import FAMILY_BASELINE, METHODS, model_ids
from .judged import is_predict_only, judge_rule, judgements

# model id -> the method it presets, from the torch-free catalog (the report imports neither the harness nor torch)
PRESET_METHODS = {mid: method for mid, method in model_ids().items() if method is not None}
TOKPRUNE_MODELS = set(model_ids())
VARIANT_METHODS = {m.name for m in METHODS if m.family != FAMILY_BASELINE}  # the baselines have no variant worth naming
BASELINE_METHOD = "none"
DEFAULT_CHECKPOINT = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT_STYLE = "llava_v1"

# Headline metric(s) of the benchmarks of the papers' tables (lmms-eval 0.7.3 task names). MME's perception and
# cognition scores are different benchmarks on different scales: never averaged, two columns.
MAIN_METRICS: Dict[str, Tuple[str, ...]] = {
    "scienceqa_img": ("exact_match",),
    "textvqa_val": ("exact_match",),
    "vqav2_val": ("exact_match",),
    "gqa": ("exact_match",),
    "mme": ("mme_perception_score", "mme_cognition_score"),
    "pope": ("pope_accuracy",),
    "mmbench_en_dev_static": ("gpt_eval_score",),
    "seedbench": ("seed_image",),
    "llava_in_the_wild": ("gpt_eval_llava_all",),  # LLM-judged (report.judged)
    "mmvet": ("gpt_eval_score",),  # LLM-judged (report.judged)
}
COUNT_KEYS = ("avg_visual_tokens_kept", "avg_visual_tokens_equivalent", "avg_llm_prefill_tokens")  # what "same results" compares

Column = Tuple[str, str]  # (task, metric)


def column_name(task: str, metric: str) -> str:
    """How a (task, metric) column is named in the tables, the check's lines and the baseline file."""
    return f"{task} ({metric})"


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
    scores: Dict[Column, float] = field(default_factory=dict)  # (task, metric) -> value, in the results' order
    not_judged: Dict[Column, str] = field(default_factory=dict)  # LLM-judged columns that were not: (task, metric) -> why
    reported: Dict[Column, Optional[float]] = field(default_factory=dict)  # what lmms-eval reported for those (not a score)
    unverified: Dict[Column, str] = field(default_factory=dict)  # judged columns whose judge cannot be checked: -> why
    columns: List[Column] = field(default_factory=list)  # every (task, metric) column, scored or not, in the results' order
    relative: Dict[Column, float] = field(default_factory=dict)  # (task, metric) -> 100 x score / baseline score
    visual_tokens: Optional[float] = None
    visual_tokens_equivalent: Optional[float] = None  # per decoder layer, averaged (= kept for methods before the LLM)
    retention_pct: Optional[float] = None
    llm_prefill_tokens: Optional[float] = None
    prefill_tflops: Optional[float] = None
    tflops_computed: bool = False
    prefill_ms: Optional[float] = None  # measured (model_args measure_latency=true), when logged
    relative_pct: Optional[float] = None  # mean of `relative` over the row's columns
    baseline_name: Optional[str] = None
    provenance: Dict[str, str] = field(default_factory=dict)
    config_hash: Optional[str] = None

    @property
    def mean_score(self) -> Optional[float]:
        """Mean of the scored columns (not-judged columns are no scores and are left out)."""
        values = list(self.scores.values())
        return sum(values) / len(values) if values else None

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE_METHOD

    @property
    def label(self) -> str:
        """Line label in the plot: method (+ variant for the methods that have one)."""
        return f"{self.method} ({self.variant})" if self.method in VARIANT_METHODS else self.method

    @property
    def setting(self) -> str:
        if self.budget is not None:
            return f"budget {self.budget}"
        if self.ratio is not None:
            return f"ratio {self.ratio}"
        return "all" if self.is_baseline else "default"

    @property
    def checkpoint(self) -> str:
        return self.provenance.get("checkpoint") or self.model_args.get("pretrained") or DEFAULT_CHECKPOINT

    @property
    def prompt_style(self) -> str:
        return self.provenance.get("prompt_style") or self.model_args.get("prompt_style") or DEFAULT_PROMPT_STYLE

    @property
    def lmms_eval_version(self) -> str:
        return self.provenance.get("lmms_eval") or "unknown"


# -- small readers -------------------------------------------------------------------------------
def parse_args(text: Any) -> Dict[str, str]:
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
    return parse_args(data.get("model_args", "")), data.get("model")


def _setting(value: Optional[str]) -> Optional[str]:
    """A budget / ratio label: `none` (allowed where the default is none) is no setting."""
    return None if value is None or value.strip().lower() in ("", "none", "null") else value


def number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _metric_entries(task_results: Mapping[str, Any]) -> List[Tuple[str, str, float]]:
    entries = []
    for key, value in task_results.items():
        if key == "alias" or "," not in key:
            continue
        metric, filt = key.split(",", 1)
        value = number(value)
        if "_stderr" not in metric and value is not None:
            entries.append((metric, filt, value))
    return entries


def headline_metrics(task: str, task_results: Mapping[str, Any], preferred: Optional[str] = None) -> List[Tuple[str, float]]:
    """[(metric name, value)] of a task's headline metric(s) in lmms-eval's results[task] (MME: two)."""
    entries = _metric_entries(task_results)

    def name(metric: str, filt: str) -> str:
        return metric if filt == "none" else f"{metric},{filt}"

    if not entries:
        return []
    if preferred:  # asked for explicitly: that metric or nothing
        return [(name(m, f), v) for m, f, v in entries if m == preferred or f"{m},{f}" == preferred][:1]
    wanted = MAIN_METRICS.get(task, ())
    picked = [(name(m, f), v) for w in wanted for m, f, v in entries if m == w][: len(wanted)]
    return picked or [(name(*entries[0][:2]), entries[0][2])]


def main_metric(task: str, task_results: Mapping[str, Any], preferred: Optional[str] = None) -> Optional[Tuple[str, float]]:
    """(metric name, value) of a task's first headline metric, or None."""
    picked = headline_metrics(task, task_results, preferred)
    return picked[0] if picked else None


def _run_dir_of(results_file: Path, data: Mapping[str, Any]) -> Path:
    parent = results_file.parent
    if data.get("model_name_sanitized") and parent.name == data["model_name_sanitized"]:
        return parent.parent
    return parent


def first_sample_counts(results_file: Path) -> Dict[str, Any]:
    """token_counts[0] of the run's first logged sample (what our wrappers record per sample), or {}."""
    stamp = results_file.name[: -len("_results.json")]
    for samples in sorted(results_file.parent.glob(f"{stamp}_samples_*.jsonl")):
        try:
            with open(samples) as fh:
                for line in fh:
                    counts = (json.loads(line).get("token_counts") or [None])[0]
                    return counts if isinstance(counts, dict) else {}
        except (OSError, ValueError):
            continue
    return {}


# -- finding -------------------------------------------------------------------------------------
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


def _outcome(data: Mapping[str, Any]) -> str:
    """What two copies of one run must agree on to be the same result: the scores and the token counts."""
    tp = data.get("throughput") or {}
    return json.dumps({"results": data.get("results"), "counts": {k: tp.get(k) for k in COUNT_KEYS}}, sort_keys=True, default=str)


def _without_results(root: Path) -> List[Path]:
    """Run folders under `root` (they hold a sweep's run.log) that have no results file: failed or unfinished."""
    return sorted(log.parent for log in root.rglob("run.log") if not any(log.parent.rglob("*_results.json")))


def find_results(paths: Sequence[os.PathLike]) -> Found:
    """Every *_results.json below `paths`: one entry per run, a warning per file that cannot be a row.

    The same run (folder name, model, model_args, limit) found in two of the given folders -- shards of one sweep
    downloaded twice, say -- is one row when both copies have the same scores and counts, an error otherwise."""
    newest: Dict[Tuple[str, str, str, str], Tuple[Path, Path, Dict[str, Any]]] = {}
    warnings: List[str] = []
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise ValueError(f"{str(root)!r} does not exist")
        files = [root] if root.is_file() else sorted(root.rglob("*_results.json"))
        readable = 0
        for results_file in files:
            try:
                data = json.loads(results_file.read_text())
            except (OSError, ValueError) as err:
                warnings.append(f"skipped {results_file}: not a complete results JSON ({str(err).splitlines()[0]})")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
                warnings.append(f"skipped {results_file}: no 'results' mapping (not an lmms-eval results file)")
                continue
            readable += 1
            run_dir = _run_dir_of(results_file.resolve(), data)
            key = _identity(run_dir, data)
            stamp = (results_file.name, results_file.stat().st_mtime)
            if key not in newest or stamp > (newest[key][1].name, newest[key][1].stat().st_mtime):
                newest[key] = (run_dir, results_file.resolve(), data)
        if not readable and not root.is_file():
            hint = f" (see {root / 'run.log'})" if (root / "run.log").exists() else ""
            raise ValueError(f"{root}: no lmms-eval *_results.json in this folder: a failed or unfinished run?{hint}")
        if root.is_dir():
            warnings += [f"{d}: a run folder without results (failed or unfinished; see {d / 'run.log'})" for d in _without_results(root)]
    return Found(_merge_copies(list(newest.values())), warnings)


def _merge_copies(entries: List[Tuple[Path, Path, Dict[str, Any]]]) -> List[Tuple[Path, Path, Dict[str, Any]]]:
    """One entry per (run name, model, model_args, limit); identical copies collapse, differing ones are an error."""
    seen: Dict[Tuple[str, str, str, str], Tuple[Path, Path, Dict[str, Any]]] = {}
    out = []
    for entry in entries:
        run_dir, results_file, data = entry
        key = (run_dir.name,) + _identity(run_dir, data)[1:]
        if key not in seen:
            seen[key] = entry
            out.append(entry)
            continue
        first = seen[key]
        if _outcome(first[2]) != _outcome(data):
            raise ValueError(f"run {run_dir.name!r} is in two folders with the same configuration but different results: "
                             f"{first[1]} and {results_file}; keep one of them")
    return out


# -- one row -------------------------------------------------------------------------------------
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
    if model not in TOKPRUNE_MODELS:
        raise ValueError(f"{results_file}: results of model {model!r}, not an lmms_tokprune model id "
                         f"({', '.join(sorted(TOKPRUNE_MODELS))}); the leaderboard compares lmms_tokprune runs")
    args = parse_args(config.get("model_args", ""))
    sample = first_sample_counts(results_file)
    if sample.get("method_args"):  # what the run itself resolved (a config file may have changed since)
        args = {**{k: v for k, v in args.items() if k not in ("budget", "ratio")}, **parse_args(sample["method_args"])}
    elif "config" in args:
        from_file, _ = _config_file_args(args["config"])
        args = {**from_file, **args}
        if warnings is not None:
            warnings.append(f"{run_dir.name}: labelled from the current contents of {args['config']} (the run logged no samples "
                            "with its resolved method)")
    method = args.get("method") or PRESET_METHODS.get(model) or BASELINE_METHOD  # llava_tokprune defaults to method=none
    if method not in VARIANT_METHODS:  # the baselines have no variants worth naming
        variant = "-"
    else:  # our methods default to 'fixed'
        variant = args.get("variant", "fixed")
    provenance = {str(k): str(v) for k, v in (sample.get("provenance") or {}).items()}
    provenance.setdefault("lmms_eval", str(data.get("lmms_eval_version") or ""))
    row = RunRow(
        name=run_dir.name, run_dir=run_dir, results_file=results_file, group=run_dir.parent, model=model, model_args=args,
        method=method, variant=variant, budget=_setting(args.get("budget")), ratio=_setting(args.get("ratio")),
        limit=number(config.get("limit")), provenance={k: v for k, v in provenance.items() if v}, config_hash=sample.get("config"),
    )
    for task, task_results in (data.get("results") or {}).items():
        if isinstance(task_results, Mapping):
            _task_columns(row, task, task_results, (metrics or {}).get(task))
    tp = data.get("throughput") or {}
    row.visual_tokens = number(tp.get("avg_visual_tokens_kept"))
    equivalent = number(tp.get("avg_visual_tokens_equivalent"))
    row.visual_tokens_equivalent = row.visual_tokens if equivalent is None else equivalent  # runs before the field: kept
    retention = number(tp.get("avg_visual_retention"))
    if retention is None and row.visual_tokens is not None and number(tp.get("avg_visual_tokens_in")):
        retention = row.visual_tokens / float(tp["avg_visual_tokens_in"])
    row.retention_pct = None if retention is None else 100.0 * retention
    row.llm_prefill_tokens = number(tp.get("avg_llm_prefill_tokens"))
    row.prefill_ms = number(tp.get("avg_prefill_ms"))
    row.prefill_tflops = number(tp.get("avg_prefill_tflops"))
    if row.prefill_tflops is None and row.llm_prefill_tokens is not None:
        cfg = _flops_config(args.get("pretrained") or "llava-1.5-7b")
        if cfg is not None:
            from ..efficiency.flops import llm_prefill_flops

            row.prefill_tflops = llm_prefill_flops(cfg.text, row.llm_prefill_tokens) / 1e12
            row.tflops_computed = True
    return row


def _task_columns(row: RunRow, task: str, task_results: Mapping[str, Any], preferred: Optional[str]) -> None:
    """The task's headline column(s) into `row`: a score, or "not judged" (with why) for an LLM-judged column whose
    samples show a failed judge call, or for any column of a --predict_only run."""
    rule = judge_rule(task)
    if is_predict_only(task_results):
        wanted = (preferred,) if preferred else MAIN_METRICS.get(task) or (rule.headline if rule else ("bypass",))
        for metric in wanted:
            column = (task, metric)
            row.columns.append(column)
            row.not_judged[column] = "a --predict_only run: lmms-eval computed no metric (its 'bypass' placeholder, 999)"
            row.reported[column] = None
        return
    picked = headline_metrics(task, task_results, preferred)
    checked = judgements(row.results_file, task, [m for m, _ in picked], rule) if rule and picked else {}
    for metric, value in picked:
        column = (task, metric)
        row.columns.append(column)
        judgement = checked.get(metric)
        if judgement is not None and judgement.not_judged:
            row.not_judged[column] = judgement.reason(rule)
            row.reported[column] = value
            continue
        if judgement is not None and judgement.total == 0:
            row.unverified[column] = ("no samples file to check its judge (run with --log_samples)" if not judgement.files else
                                      "its samples carry no judge record to check")
        row.scores[column] = value

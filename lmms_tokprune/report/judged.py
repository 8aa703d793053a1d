"""LLM-judged tasks that were never judged: found from what each task's `process_results` logged per sample.

lmms-eval 0.7.3 scores some tasks by asking an LLM judge (GPT-4o by default) about every answer. When the
judge call fails (no ``OPENAI_API_KEY``, no network, a refused request), the task still reports a number:
``llava_in_the_wild`` 100.0 (every sample gets the "no review" pair ``[-1, -1]``, and the aggregation divides
the mean model score by the mean judge-answer score: -1 / -1), ``mmvet`` 0.0 (every sample scored 0.0). Such a
number is not a score. The results JSON cannot tell it from a real one; the samples file (``--log_samples``,
which our sweeps always pass) can: each line carries what ``process_results`` returned, per metric.

How a failed judgement looks in a logged sample (lmms-eval 0.7.3, read from its task code and checked by
calling it offline; the test fixtures in tests/report/test_judged.py are those records):

- ``llava_in_the_wild`` and its variants (``llava_in_the_wild_ko``, the multilingual ``llava_in_the_wild_<lang>``),
  ``llava_bench_coco``, ``llava_wilder_*``: the column's entry has ``"scores": [-1, -1]`` (``gpt_eval_llava_all``,
  or the sample's own category ``gpt_eval_llava_{conv,detail,complex}``; the other categories' entries carry
  ``[-999, -999]``: not samples of that column). Its ``review`` says why: ``"Failed to Get a Proper Review."``
  with ``"eval_model": "Failed Request"`` (no key: the judge client cannot be built), ``"error: Connection
  error."`` (a key, no network), ``""`` (the older utils of the ko / multilingual / wilder tasks, which catch the error). A review
  without a parsable score pair gets ``[-1, -1]`` too: no judgement either.
- ``mmvet``, ``mmvetv2``: ``"gpt_eval_score": {..., "score": 0.0, "eval_model": ""}``: the judge gave no answer
  after its retries (``"eval_model": "dummy"``: lmms-eval's ``API_TYPE=dummy`` stand-in, which answers "dummy",
  scored 0.0). With no key at all the task does not load: its utils build the judge client on import
  (``openai.OpenAIError: Missing credentials``). A judge that answers but never with a parsable grade also ends
  at 0.0, with its model name: indistinguishable from a real 0.0, so counted as judged.
- ``wildvision_*``: ``"elo_scores": {..., "gpt_resps": ""}`` (judgement "Unclear", counted as a tie).

Rule: a (task, metric) column with ANY failed judgement is "not judged" (k of n failed): lmms-eval averages a
failed sample in as a score (a [-1, -1] pair, a 0.0), so even one failure moves the number. A column of a
``--predict_only`` run (lmms-eval's placeholder metric ``bypass``, reported as 999) is not judged either.

Not covered, because the per-sample record cannot show it: MMBench (its judge extracts answers inside the
aggregation, not in ``process_results``), MathVista / MathVision-style GPT answer extraction (a failed call
logs the same empty extraction as an answer with nothing to extract), vibe_eval (a failed Reka judge call raises: the run fails, no number).
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

NOT_JUDGED = "not judged"  # what a not-judged cell shows in the md / csv outputs
PREDICT_ONLY_METRIC = "bypass"  # lmms-eval --predict_only replaces every metric by this one (aggregated to 999)


def _pair(value: Any) -> Optional[Tuple[float, float]]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return float(value[0]), float(value[1])
    return None


def _llava_review(sample: Mapping[str, Any], metric: str) -> Optional[bool]:
    """llava-bench family: True = judge failed, False = judged, None = not a sample of this column."""
    entry = sample.get(metric)
    scores = _pair(entry.get("scores")) if isinstance(entry, Mapping) else None
    if scores is None or -999.0 in scores:  # no record, or another category's entry
        return None
    return scores == (-1.0, -1.0)


def _mmvet_grade(sample: Mapping[str, Any], metric: str) -> Optional[bool]:
    entry = sample.get(metric)
    if not isinstance(entry, Mapping) or "eval_model" not in entry:
        entry = sample.get("gpt_eval_score")
    if not isinstance(entry, Mapping) or "eval_model" not in entry:
        return None
    return entry["eval_model"] in ("", "dummy")  # no answer after the retries; lmms-eval's API_TYPE=dummy stand-in judge


def _wildvision_verdict(sample: Mapping[str, Any], metric: str) -> Optional[bool]:
    entry = sample.get("elo_scores")
    if not isinstance(entry, Mapping) or "gpt_resps" not in entry:
        return None
    return entry["gpt_resps"] == ""


@dataclass(frozen=True)
class JudgeRule:
    name: str
    tasks: re.Pattern[str]  # full match on the lmms-eval task name
    headline: Tuple[str, ...]  # the column(s) a --predict_only run of the task stands for
    failed: Callable[[Mapping[str, Any], str], Optional[bool]]  # (sample, metric) -> failed / judged / not in the column
    evidence: str  # how a failed judgement looks, for the messages


RULES: Tuple[JudgeRule, ...] = (
    JudgeRule("LLaVA-Bench (GPT pairwise review)", re.compile(r"llava_in_the_wild(_\w+)?|llava_bench_coco|llava_wilder(_\w+)?"),
              ("gpt_eval_llava_all",), _llava_review, "scores [-1, -1]"),
    JudgeRule("MM-Vet (GPT grader)", re.compile(r"mmvet(v2)?(_\w+)?"), ("gpt_eval_score",), _mmvet_grade,
              "eval_model '' or 'dummy'"),
    JudgeRule("WildVision (GPT pairwise verdict)", re.compile(r"wildvision(_\w+)?"), ("raw_scores",), _wildvision_verdict,
              "elo_scores.gpt_resps ''"),
)


def judge_rule(task: str) -> Optional[JudgeRule]:
    """The rule of an LLM-judged task, or None for a task scored without a judge."""
    return next((rule for rule in RULES if rule.tasks.fullmatch(task)), None)


def is_predict_only(task_results: Mapping[str, Any]) -> bool:
    """A task of a `--predict_only` run: lmms-eval computed no metric, only its `bypass` placeholder (999)."""
    return any(str(key).split(",", 1)[0] == PREDICT_ONLY_METRIC for key in task_results)


@dataclass
class Judgement:
    """Per (task, metric) column: the samples that had a judgement to make and those whose judge failed."""

    total: int = 0
    failed: int = 0
    files: int = 0  # samples files read

    @property
    def not_judged(self) -> bool:
        return self.failed > 0

    def reason(self, rule: JudgeRule) -> str:
        return f"{self.failed}/{self.total} judge calls failed ({rule.evidence} in the samples)"


def samples_files(results_file: Path, task: str) -> List[Path]:
    """The samples file(s) lmms-eval wrote beside `results_file` for `task` (``<date>_samples_<task>.jsonl``)."""
    stamp = results_file.name[: -len("_results.json")]
    return sorted(results_file.parent.glob(f"{glob.escape(stamp)}_samples_{glob.escape(task)}.jsonl"))


def _lines(path: Path) -> Iterator[Mapping[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a torn last line: the other samples still count
                continue
            if isinstance(record, Mapping):
                yield record


def judgements(results_file: Path, task: str, metrics: List[str], rule: JudgeRule) -> Dict[str, Judgement]:
    """metric -> Judgement for `task`'s columns, from its samples file(s) (one pass per file)."""
    out = {metric: Judgement() for metric in metrics}
    for path in samples_files(results_file, task):
        try:
            for sample in _lines(path):
                for metric, judgement in out.items():
                    verdict = rule.failed(sample, metric.split(",", 1)[0])
                    if verdict is not None:
                        judgement.total += 1
                        judgement.failed += bool(verdict)
        except OSError:
            continue
        for judgement in out.values():
            judgement.files += 1
    return out

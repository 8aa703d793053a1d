"""The regression gate: a leaderboard checked against a committed baseline file.

`leaderboard ... --write-baseline FILE` records, per run: what it ran (method, variant, setting, checkpoint, limit,
configuration digest), every task column's score, and its token counts. `leaderboard ... --check FILE
--tolerance T` then fails (exit 1) when a run
- scores below ``baseline × (1 − T)`` in any task column (T is a fraction of the baseline score: 0.01 = 1%; a
  better score passes and is listed, so the baseline can be refreshed),
- reports different token counts (visual tokens kept, equivalent tokens, LLM prefill tokens: any change beyond
  float noise; a method that now keeps other tokens is a change to review, whatever its score),
- lost or gained a task column,
or when a run of the baseline is missing now, or a run is new (not in the baseline): both are listed, never
ignored. A baseline made on another checkpoint is an error (exit 2), not a comparison.

Columns that were not judged (an LLM-judged task whose judge failed, or a ``--predict_only`` run: see
`report.judged`) have no score to compare. `--write-baseline` records them under the run's ``not_judged``
(column -> why), never as a number in ``scores``; `--check` refuses (exit 2, nothing written) when a run it
compares has such a column now or in the baseline: judge the run (README, Judged tasks) and, for a baseline
column, write the baseline again from judged runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .files import write_atomic
from .runs import RunRow, column_name

FORMAT = "lmms_tokprune-leaderboard-baseline/1"
COUNTS = ("visual_tokens_kept", "visual_tokens_equivalent", "llm_prefill_tokens")
COUNT_NOISE = 1e-6  # relative: counts are means of integers; anything above this is a real change


def _counts_of(row: RunRow) -> Dict[str, Optional[float]]:
    return {"visual_tokens_kept": row.visual_tokens, "visual_tokens_equivalent": row.visual_tokens_equivalent,
            "llm_prefill_tokens": row.llm_prefill_tokens}


def baseline_of(rows: Sequence[RunRow]) -> Dict[str, Any]:
    """What `--write-baseline` stores."""
    runs = {}
    for r in rows:
        runs[r.name] = {
            "model": r.model, "method": r.method, "variant": r.variant, "setting": r.setting, "checkpoint": r.checkpoint,
            "limit": r.limit, "config": r.config_hash, "scores": {column_name(t, m): v for (t, m), v in r.scores.items()}, **_counts_of(r),
        }
        if r.not_judged:  # no number: a check against this baseline refuses these columns
            runs[r.name]["not_judged"] = {column_name(t, m): why for (t, m), why in r.not_judged.items()}
    return {"format": FORMAT, "runs": runs}


def write_baseline(rows: Sequence[RunRow], path: os.PathLike) -> Path:
    return write_atomic(path, json.dumps(baseline_of(rows), indent=2, sort_keys=True) + "\n")


def load_baseline(path: os.PathLike) -> Dict[str, Any]:
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"--check {source}: no such baseline file (make one with --write-baseline)")
    try:
        data = json.loads(source.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--check {source}: not a JSON file ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("runs"), dict):
        raise ValueError(f"--check {source}: not a leaderboard baseline (expected format {FORMAT!r}; make one with --write-baseline)")
    return data


@dataclass
class CheckReport:
    baseline: str
    tolerance: float
    worse: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    better: List[str] = field(default_factory=list)
    checked: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.worse or self.changed or self.missing or self.new)

    def lines(self) -> List[str]:
        head = (f"check against {self.baseline} (tolerance {self.tolerance:g}): {self.checked} runs compared, "
                + ("FAILED" if self.failed else "passed"))
        out = [head]
        for title, items in (("worse", self.worse), ("token counts changed", self.changed), ("missing (in the baseline, not run now)",
                             self.missing), ("new (not in the baseline)", self.new), ("better (refresh the baseline with --write-baseline)",
                             self.better)):
            out += [f"  {title}: {item}" for item in items]
        return out

    def markdown(self) -> str:
        return "\n## Check\n\n```\n" + "\n".join(self.lines()) + "\n```\n"


def _same_count(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= COUNT_NOISE * max(1.0, abs(b))


def check_rows(rows: Sequence[RunRow], baseline: Dict[str, Any], tolerance: float, source: str = "baseline") -> CheckReport:
    """Compare the rows with a loaded baseline (see the module docstring)."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"--tolerance {tolerance}: must be a fraction of the baseline score in [0, 1), e.g. 0.01")
    report = CheckReport(source, tolerance)
    expected: Dict[str, Dict[str, Any]] = baseline["runs"]
    by_name = {r.name: r for r in rows}
    for name, row in by_name.items():
        base = expected.get(name)
        if base is not None and base.get("checkpoint") != row.checkpoint:
            raise ValueError(f"--check {source}: the baseline was made on checkpoint {base.get('checkpoint')}, but run {name!r} ran on "
                             f"{row.checkpoint}; compare runs of one checkpoint (or write a baseline for this one)")
    refused = []
    for row in rows:
        base = expected.get(row.name)
        if base is None:
            continue
        was = base.get("not_judged") or {}
        now = {column_name(t, m): why for (t, m), why in row.not_judged.items()}
        for column in sorted(set(was) | set(now)):
            where = [f"now ({now[column]})"] if column in now else []
            where += [f"in the baseline ({was[column]})"] if column in was else []
            refused.append(f"{row.name}: {column} not judged " + " and ".join(where))
    if refused:
        raise ValueError(f"--check {source}: refusing to compare columns that were not judged (an LLM-judged task whose judge "
                         f"failed, or a --predict_only run): {'; '.join(refused)}. Judge them with an API key (README: Judged "
                         "tasks); a baseline column: write the baseline again from judged runs")
    for name in sorted(expected):
        if name not in by_name:
            report.missing.append(name)
    for row in rows:
        base = expected.get(row.name)
        if base is None:
            report.new.append(f"{row.name} ({row.method}, {row.setting})")
            continue
        report.checked += 1
        scores = {column_name(t, m): v for (t, m), v in row.scores.items()}
        for column in sorted(set(base["scores"]) | set(scores)):
            was, now = base["scores"].get(column), scores.get(column)
            if was is None or now is None:
                report.changed.append(f"{row.name}: {column} {'is new' if was is None else 'is gone'}")
            elif now < was - tolerance * abs(was) - 1e-12:
                report.worse.append(f"{row.name}: {column} {now:.4f} < {was:.4f} (baseline) by more than {tolerance:g} of it")
            elif now > was + 1e-12:
                report.better.append(f"{row.name}: {column} {now:.4f} > {was:.4f}")
        for key, now in _counts_of(row).items():
            if not _same_count(now, base.get(key)):
                report.changed.append(f"{row.name}: {key} {now} (baseline {base.get(key)})")
    return report

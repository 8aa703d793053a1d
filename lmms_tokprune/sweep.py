"""`lmms-tokprune sweep FILE`: many lmms-eval runs from one YAML file, resumable.

Sweep file (every key is validated; unknown keys are an error)::

    model: llava_tokprune             # optional default model id for runs that name none
    model_args:                       # common model_args (mapping, or an "a=1,b=2" string)
      pretrained: ${LMMS_TOKPRUNE_PRETRAINED:-llava-hf/llava-1.5-7b-hf}
    tasks: [textvqa_val, pope]        # list or comma-separated string
    include_path: ../../tasks         # optional, a path or a list of paths; default: the shipped tasks/ folder
    output_dir: ../../logs/sweeps/x   # each run writes <output_dir>/<name>/
    batch_size: 8                     # optional: --batch_size
    limit: 100                        # optional: --limit
    launcher: accelerate launch --num_processes 8   # optional prefix of `-m lmms_eval`
    gen_kwargs: {max_new_tokens: 16}  # optional: --gen_kwargs (mapping or string)
    extra_args: [--verbosity, INFO]   # optional: more lmms-eval CLI arguments
    runs:
      - name: none                    # folder name: letters, digits, . _ + -
        model: llava_tokprune
        model_args: {method: none}    # merged over the common model_args (the run wins; null removes a key)
      - {name: topk64, model: llava_tokprune, model_args: {method: topk_cls, budget: 64}, batch_size: 4}

A run may also set ``tasks``, ``batch_size``, ``limit``, ``launcher``, ``gen_kwargs``, ``allow_failed_docs`` (the run wins).
A run whose results report documents that were not run (``throughput.avg_failed_docs``: an unreadable image, a
prompt longer than the LLM's context, a video) is failed unless ``allow_failed_docs: true``.
Relative ``include_path`` / ``output_dir`` are resolved against the sweep file's folder. String values
may use ``${VAR}`` / ``${VAR:-default}`` (environment variables). ``pretrained: "@tiny"`` means the
bundled tiny demo checkpoint (built once into the cache). Overrides from the command line
(``--set key.sub=value``, ``--pretrained``, ``--output-dir``, ``--limit``) are applied to the file's data
before validation; ``--set runs.NAME.key=value`` addresses one run.

Each run is the real lmms-eval CLI in a subprocess::

    <launcher or python> -m lmms_eval --model M --model_args ... --tasks ... --output_path <output_dir>/<name>
        --log_samples [--include_path ...] [--batch_size ...] [--limit ...] [--gen_kwargs ...]

(several include paths: the lmms-eval CLI takes one ``--include_path``, so the run gets ``--config
<output_dir>/<name>/include_paths.yaml`` holding the list; lmms-eval's TaskManager takes a list there.)

with its output in ``<output_dir>/<name>/run.log``. ``--shard I/N`` runs only the runs at positions I-1, I-1+N,
I-1+2N, ... of the file (1-based I): every run is in exactly one of the N shards, and appending runs to the file
never moves an existing one to another shard; N jobs (CI matrix entries, SLURM array tasks, machines) each run
one shard, each a resumable sweep of its own, and ``leaderboard`` merges their folders. A run whose folder already holds a results JSON
covering the requested tasks is finished and skipped. lmms-eval exits 0 on many failures, so a run
succeeds only if it exits 0 AND leaves such a results file; failed runs are reported with the tail of
their log, the others go on, and the sweep's exit status is 1 if any run failed. Each run folder is locked
while it runs (a second sweep on the same output_dir skips that run and says so); SIGTERM / SIGINT / SIGHUP
to the sweep are forwarded to the running lmms-eval (its whole process group), and the sweep stops after it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import yaml

from .coerce import format_value

SWEEP_KEYS = ("model", "model_args", "tasks", "include_path", "output_dir", "runs",
              "batch_size", "limit", "launcher", "gen_kwargs", "extra_args", "allow_failed_docs")
RUN_KEYS = ("name", "model", "model_args", "tasks", "batch_size", "limit", "launcher", "gen_kwargs", "allow_failed_docs")
LOCK_NAME = ".sweep.lock"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TINY = "@tiny"
LOG_NAME = "run.log"
MANIFEST_NAME = "sweep.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class RunSpec:
    """One fully resolved run of a sweep."""

    name: str
    model: str
    model_args: Dict[str, Any]
    tasks: List[str]
    output_path: Path
    include_paths: List[Path] = field(default_factory=list)
    batch_size: Optional[Any] = None
    limit: Optional[float] = None
    launcher: Optional[str] = None
    gen_kwargs: Optional[str] = None
    extra_args: List[str] = field(default_factory=list)
    allow_failed_docs: bool = False  # a run whose results report documents that were not run still counts as done

    def model_args_string(self) -> str:
        return format_model_args(self.model_args)

    @property
    def include_path(self) -> Optional[Path]:
        """The include path when there is one (several: see include_config)."""
        return self.include_paths[0] if len(self.include_paths) == 1 else None

    @property
    def include_config(self) -> Path:
        """The lmms-eval --config file that carries several include paths (written by run_one)."""
        return self.output_path / "include_paths.yaml"

    def write_include_config(self) -> None:
        if len(self.include_paths) > 1:
            self.output_path.mkdir(parents=True, exist_ok=True)
            self.include_config.write_text(yaml.safe_dump({"include_path": [str(p) for p in self.include_paths]}))

    def command(self) -> List[str]:
        prefix = shlex.split(self.launcher) if self.launcher else [sys.executable]
        cmd = prefix + ["-m", "lmms_eval", "--model", self.model, "--model_args", self.model_args_string(),
                        "--tasks", ",".join(self.tasks), "--output_path", str(self.output_path), "--log_samples"]
        if len(self.include_paths) == 1:
            cmd += ["--include_path", str(self.include_path)]
        elif self.include_paths:
            cmd += ["--config", str(self.include_config)]
        if self.batch_size is not None:
            cmd += ["--batch_size", str(self.batch_size)]
        if self.limit is not None:
            cmd += ["--limit", _number_text(self.limit)]
        if self.gen_kwargs:
            cmd += ["--gen_kwargs", self.gen_kwargs]
        return cmd + list(self.extra_args)


@dataclass
class Sweep:
    path: Path
    output_dir: Path
    runs: List[RunSpec]
    shard: Optional[Tuple[int, int]] = None  # (I, N) when only shard I of N is run


@dataclass
class RunOutcome:
    name: str
    status: str  # "skipped" (already finished), "ok", "failed", "busy" (another sweep holds it), "dry-run"
    results_file: Optional[Path] = None
    seconds: float = 0.0
    detail: str = ""


# -- model_args and value helpers ----------------------------------------------------------------
def _number_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _value_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number_text(value)
    if isinstance(value, str):
        if "," in value:
            raise ValueError(f"model_args {key}={value!r}: a comma cannot be passed through lmms-eval's --model_args")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return format_value(tuple(value))  # 8/16/24: lmms-eval splits model_args on commas
    raise ValueError(f"model_args {key}={value!r} must be a string, number, boolean or a list of numbers")


def format_model_args(args: Mapping[str, Any]) -> str:
    """{'pretrained': 'x', 'budget': 64} -> 'pretrained=x,budget=64' (None values are left out)."""
    return ",".join(f"{k}={_value_text(k, v)}" for k, v in args.items() if v is not None)


def parse_model_args_string(text: str) -> Dict[str, Any]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (values stay strings; the model coerces them)."""
    out: Dict[str, Any] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"model_args entry {part!r} is not key=value")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _model_args_mapping(where: str, value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_model_args_string(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: model_args must be a mapping (or an 'a=1,b=2' string), got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: model_args keys must be non-empty strings, got {key!r}")
        if item is not None:
            _value_text(key, item)  # type check now, with the run's name in the message
        out[key] = item
    return out


def _tasks(where: str, value: Any) -> List[str]:
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = []
        for t in value:
            if not isinstance(t, str):
                raise ValueError(f"{where}: tasks must be strings, got {t!r}")
            items += [s.strip() for s in t.split(",")]
    else:
        raise ValueError(f"{where}: tasks must be a list or a comma-separated string")
    out = []
    for t in items:
        if t and t not in out:
            out.append(t)
    if not out:
        raise ValueError(f"{where}: tasks is empty")
    return out


def _gen_kwargs(where: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, Mapping):
        return ",".join(f"{k}={_value_text(f'gen_kwargs {k}', v)}" for k, v in value.items() if v is not None) or None
    raise ValueError(f"{where}: gen_kwargs must be a mapping or a 'k=v,k=v' string")


def _batch_size(where: str, value: Any) -> Optional[Any]:
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1 or isinstance(value, str) and value.strip()):
        raise ValueError(f"{where}: batch_size must be an integer >= 1, got {value!r}")
    return value


def _limit(where: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: limit must be a number > 0 (a count, or a fraction below 1), got {value!r}")
    return value


def _flag(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _launcher(where: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: launcher must be a command prefix string, e.g. 'accelerate launch --num_processes 8'")
    try:
        shlex.split(value)
    except ValueError as err:
        raise ValueError(f"{where}: launcher {value!r}: {err}") from None
    return value.strip()


# -- overrides and environment variables ---------------------------------------------------------
def apply_override(data: Dict[str, Any], assignment: str) -> None:
    """Apply 'a.b.c=value' (value parsed as YAML) to the raw sweep data; 'runs.NAME.key=v' targets one run."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. model_args.pretrained=/path/to/llava")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"--set {assignment!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if parts[0] not in SWEEP_KEYS:
        raise ValueError(f"--set {assignment!r}: unknown sweep key {parts[0]!r}; valid keys: {', '.join(SWEEP_KEYS)}")
    target: Any = data
    if parts[0] == "runs" and len(parts) >= 3:
        runs = data.get("runs") or []
        match = [r for r in runs if isinstance(r, dict) and r.get("name") == parts[1]]
        if not match:
            raise ValueError(f"--set {assignment!r}: no run named {parts[1]!r}")
        target, parts = match[0], parts[2:]
        if parts[0] not in RUN_KEYS:
            raise ValueError(f"--set {assignment!r}: unknown run key {parts[0]!r}; valid keys: {', '.join(RUN_KEYS)}")
    elif parts[0] == "runs":
        raise ValueError(f"--set {assignment!r}: address a run as runs.NAME.key=value")
    for part in parts[:-1]:
        node = target.get(part)
        if node is None:
            node = target[part] = {}
        elif isinstance(node, str) and part == "model_args":
            node = target[part] = parse_model_args_string(node)
        elif not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {part!r} is not a mapping")
        target = node
    target[parts[-1]] = value


def expand_env(value: Any, where: str = "") -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of a YAML tree."""
    if isinstance(value, str):
        def sub(match: "re.Match[str]") -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ and os.environ[name] != "":
                return os.environ[name]
            if default is not None:
                return default
            raise ValueError(f"{where or 'sweep file'}: environment variable {name} is not set (and ${{{name}}} has no ':-default')")
        return _ENV_RE.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    return value


# -- loading -------------------------------------------------------------------------------------
def _resolve_dir(base: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a path string, got {value!r}")
    path = Path(os.path.expanduser(value.strip()))
    return (path if path.is_absolute() else base / path).resolve()


def load_sweep(path: os.PathLike, overrides: Sequence[str] = (), pretrained: Optional[str] = None,
               output_dir: Optional[os.PathLike] = None, limit: Optional[float] = None) -> Sweep:
    """Read, override, validate and resolve a sweep file. Errors are ValueError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    where = str(path)
    unknown = sorted(set(map(str, data)) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SWEEP_KEYS)}")
    for assignment in overrides:
        apply_override(data, assignment)
    if pretrained is not None:
        local = Path(os.path.expanduser(pretrained))
        apply_override(data, "model_args.pretrained=" + (str(local.resolve()) if local.exists() else pretrained))
    if output_dir is not None:
        data["output_dir"] = str(Path(output_dir).resolve())
    if limit is not None:
        data["limit"] = limit
    # --set output_dir / include_path: relative to the current directory, like any CLI path
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if key in ("output_dir", "include_path") and isinstance(data.get(key), str):
            data[key] = str(Path(os.path.expanduser(data[key])).resolve())
        elif key == "include_path" and isinstance(data.get(key), list):
            data[key] = [str(Path(os.path.expanduser(str(p))).resolve()) for p in data[key]]
    data = expand_env(data)

    for key in ("runs", "tasks", "output_dir"):
        if data.get(key) in (None, "", []):
            raise ValueError(f"{where}: missing required key {key!r}")
    base = path.resolve().parent
    out_dir = _resolve_dir(base, data["output_dir"], "output_dir")
    if data.get("include_path") is not None:
        given = data["include_path"] if isinstance(data["include_path"], list) else [data["include_path"]]
        if not given:
            raise ValueError(f"{where}: include_path is an empty list")
        include_paths = [_resolve_dir(base, p, "include_path") for p in given]
        for include_path in include_paths:
            if not include_path.exists():
                raise ValueError(f"{where}: include_path {str(include_path)!r} does not exist")
    else:
        from .paths import tasks_dir

        include_paths = [tasks_dir()]
    common_args = _model_args_mapping(f"{where}: model_args", data.get("model_args"))
    tasks = _tasks(f"{where}: tasks", data["tasks"])
    default_model = data.get("model")
    if default_model is not None and (not isinstance(default_model, str) or not default_model):
        raise ValueError(f"{where}: model must be a model id string")
    extra = data.get("extra_args") or []
    if isinstance(extra, str):
        extra = shlex.split(extra)
    if not isinstance(extra, list) or not all(isinstance(a, (str, int, float)) for a in extra):
        raise ValueError(f"{where}: extra_args must be a list of strings")
    top = {
        "allow_failed_docs": _flag(where, "allow_failed_docs", data.get("allow_failed_docs", False)),
        "batch_size": _batch_size(where, data.get("batch_size")),
        "limit": _limit(where, data.get("limit")),
        "launcher": _launcher(where, data.get("launcher")),
        "gen_kwargs": _gen_kwargs(where, data.get("gen_kwargs")),
    }
    if not isinstance(data["runs"], list):
        raise ValueError(f"{where}: runs must be a list of {{name, model, model_args}} mappings")
    runs: List[RunSpec] = []
    seen: Dict[str, int] = {}
    tiny_dir: Optional[str] = None
    for i, raw in enumerate(data["runs"]):
        rwhere = f"{where}: runs[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{rwhere}: each run is a mapping with keys {', '.join(RUN_KEYS)}")
        unknown = sorted(set(map(str, raw)) - set(RUN_KEYS))
        if unknown:
            raise ValueError(f"{rwhere}: unknown key(s) {', '.join(unknown)}; valid run keys: {', '.join(RUN_KEYS)}")
        name = raw.get("name")
        if name is None:
            raise ValueError(f"{rwhere}: missing required key 'name'")
        name = str(name)
        if not _NAME_RE.match(name):
            raise ValueError(f"{rwhere}: run name {name!r} must start with a letter or digit and use only "
                             "letters, digits, '.', '_', '+', '-'")
        rwhere = f"{where}: run {name!r}"
        if name in seen:
            raise ValueError(f"{rwhere}: duplicate run name (runs[{seen[name]}] and runs[{i}])")
        seen[name] = i
        model = raw.get("model", default_model)
        if not model or not isinstance(model, str):
            raise ValueError(f"{rwhere}: missing required key 'model' (or a top-level default 'model')")
        merged = dict(common_args)
        for key, value in _model_args_mapping(rwhere, raw.get("model_args")).items():
            merged.pop(key, None)  # the run's keys come after the common ones, in the run's order
            merged[key] = value
        merged = {k: v for k, v in merged.items() if v is not None}
        if merged.get("pretrained") == TINY:
            if tiny_dir is None:
                from .testing.tiny import tiny_llava_dir

                tiny_dir = str(tiny_llava_dir())
            merged["pretrained"] = tiny_dir
        runs.append(RunSpec(
            name=name,
            model=model,
            model_args=merged,
            tasks=_tasks(rwhere + ": tasks", raw["tasks"]) if raw.get("tasks") is not None else list(tasks),
            output_path=out_dir / name,
            include_paths=list(include_paths),
            batch_size=_batch_size(rwhere, raw["batch_size"]) if "batch_size" in raw else top["batch_size"],
            limit=_limit(rwhere, raw["limit"]) if "limit" in raw else top["limit"],
            launcher=_launcher(rwhere, raw["launcher"]) if "launcher" in raw else top["launcher"],
            gen_kwargs=_gen_kwargs(rwhere, raw["gen_kwargs"]) if "gen_kwargs" in raw else top["gen_kwargs"],
            extra_args=[str(a) for a in extra],
            allow_failed_docs=_flag(rwhere, "allow_failed_docs", raw["allow_failed_docs"]) if "allow_failed_docs" in raw else top["allow_failed_docs"],
        ))
    if not runs:
        raise ValueError(f"{where}: runs is empty")
    return Sweep(path=path.resolve(), output_dir=out_dir, runs=runs)


def validate_model_args(run: RunSpec) -> None:
    """Check our own model ids' model_args now (unknown keys, methods, ranges) instead of mid-sweep."""
    from .harness.args import MODEL_IDS, parse_model_args

    if run.model not in MODEL_IDS:
        return  # another lmms-eval model: lmms-eval validates it
    try:
        parse_model_args(run.model, dict(run.model_args))
    except ValueError as err:
        raise ValueError(f"run {run.name!r} ({run.model}): {err} "
                         "(nothing was run; fix the sweep file, or leave this run out with --only)") from None


# -- finished runs -------------------------------------------------------------------------------
def _covered_tasks(results: Mapping[str, Any]) -> set:
    covered = set((results.get("results") or {}).keys())
    covered |= set((results.get("group_subtasks") or {}).keys())
    return covered


def finished_results(run: RunSpec, newer_than: Optional[float] = None) -> Optional[Path]:
    """The newest results JSON under the run's folder that covers all its tasks, or None."""
    if not run.output_path.is_dir():
        return None
    candidates = sorted(run.output_path.rglob("*_results.json"), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    for candidate in candidates:
        if newer_than is not None and candidate.stat().st_mtime < newer_than:
            continue
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and set(run.tasks) <= _covered_tasks(data) and (run.allow_failed_docs or not failed_docs(data)):
            return candidate
    return None


def failed_docs(results: Mapping[str, Any]) -> int:
    """Documents the run answered without running them (our wrappers report them in the throughput block)."""
    value = (results.get("throughput") or {}).get("avg_failed_docs") or 0
    return int(value) if isinstance(value, (int, float)) else 0


def _settings_differ(run: RunSpec, results_file: Path) -> List[str]:
    """What the existing results were made with that differs from what the sweep asks now."""
    try:
        config = json.loads(results_file.read_text()).get("config") or {}
    except (OSError, ValueError):
        return []
    notes = []
    if config.get("model") not in (None, run.model):
        notes.append(f"model {config.get('model')} (now {run.model})")
    old_args = config.get("model_args")
    if isinstance(old_args, str):
        try:
            old = parse_model_args_string(old_args)
        except ValueError:
            old = {}
        new = {k: _value_text(k, v) for k, v in run.model_args.items()}
        if old and old != new:
            notes.append(f"model_args {old_args} (now {run.model_args_string()})")
    old_limit = config.get("limit")
    new_limit = None if run.limit is None else float(run.limit)
    if (None if old_limit is None else float(old_limit)) != new_limit:
        notes.append(f"limit {old_limit} (now {run.limit})")
    return notes


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _write_manifest(sweep: Sweep, outcomes: Mapping[str, RunOutcome]) -> None:
    entries = []
    for run in sweep.runs:
        outcome = outcomes.get(run.name)
        entries.append({
            "name": run.name,
            "model": run.model,
            "model_args": run.model_args_string(),
            "tasks": run.tasks,
            "limit": run.limit,
            "status": outcome.status if outcome else "not run",
            "results_file": str(outcome.results_file) if outcome and outcome.results_file else None,
        })
    from .report.files import write_atomic  # a sweep killed while writing keeps the previous manifest whole

    manifest = {"sweep_file": str(sweep.path), "shard": None if sweep.shard is None else f"{sweep.shard[0]}/{sweep.shard[1]}", "runs": entries}
    write_atomic(sweep.output_dir / manifest_name(sweep.shard), json.dumps(manifest, indent=2) + "\n")


# -- shards --------------------------------------------------------------------------------------
def parse_shard(text: str) -> Tuple[int, int]:
    """'2/4' -> (2, 4): shard 2 of 4 (1-based). One clear error for anything else ('3/2', '0/0', 'x')."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 1/4 (shard I of N, 1 <= I <= N)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ValueError(f"--shard {text!r}: the number of shards N must be at least 1")
    if not 1 <= index <= count:
        raise ValueError(f"--shard {text!r}: the shard index must be within 1..{count}")
    return index, count


def shard_runs(runs: Sequence[RunSpec], index: int, count: int) -> List[RunSpec]:
    """The runs of shard `index` of `count`: positions index-1, index-1+count, ... (round robin over the file's
    order: balanced, and a run keeps its shard when runs are appended)."""
    return [run for position, run in enumerate(runs) if position % count == index - 1]


def manifest_name(shard: Optional[Tuple[int, int]]) -> str:
    """sweep.json, or sweep.shard-I-of-N.json (shards may share an output_dir)."""
    return MANIFEST_NAME if shard is None else f"sweep.shard-{shard[0]}-of-{shard[1]}.json"


# -- running -------------------------------------------------------------------------------------
class SweepInterrupted(Exception):
    """The sweep got a signal while a run was going; the run was stopped (the signal forwarded to it)."""

    def __init__(self, signum: int, run: str) -> None:
        super().__init__(f"{signal.Signals(signum).name} while {run!r} was running: it was stopped")
        self.signum, self.run = signum, run


def _launch(cmd: List[str], log: TextIO, name: str) -> Optional[int]:
    """Run `cmd` (its own process group) with its output in `log`; the sweep's SIGTERM / SIGINT / SIGHUP go to the
    whole group (accelerate's workers too), then SweepInterrupted is raised. None: it could not be started."""
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:  # e.g. launcher not found
        log.write(f"\ncould not start: {err}\n")
        return None
    got: List[int] = []

    def forward(signum: int, _frame: Any) -> None:
        got.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    handlers = {}
    try:
        for sig in FORWARDED_SIGNALS:
            handlers[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: no handlers, the child just runs
        pass
    try:
        code = proc.wait()
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
    if got:
        raise SweepInterrupted(got[0], name)
    return code


def _lock(run: RunSpec) -> Optional[TextIO]:
    """An exclusive lock on the run folder (held while the run goes), or None when another sweep holds it."""
    run.output_path.mkdir(parents=True, exist_ok=True)
    handle = open(run.output_path / LOCK_NAME, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def run_one(run: RunSpec, echo: Any = print) -> RunOutcome:
    """Launch lmms-eval for one run under its folder's lock; its output goes to <output_path>/run.log."""
    lock = _lock(run)
    if lock is None:
        return RunOutcome(run.name, "busy", None, 0.0, f"another sweep is running it (lock {run.output_path / LOCK_NAME}); left to that sweep")
    try:
        done = finished_results(run)
        if done is not None:  # finished by another sweep while this one waited
            return RunOutcome(run.name, "skipped", done, 0.0, "finished by another sweep")
        run.write_include_config()
        log_path = run.output_path / LOG_NAME
        cmd = run.command()
        started = time.time()
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            code = _launch(cmd, log, run.name)
    finally:
        lock.close()
    seconds = time.time() - started
    results = finished_results(run, newer_than=started - 1)
    if code == 0 and results is not None:
        return RunOutcome(run.name, "ok", results, seconds)
    written = finished_results(dataclasses.replace(run, allow_failed_docs=True), newer_than=started - 1)
    if code is None:
        reason = "the command could not be started"
    elif code != 0:
        reason = f"lmms-eval exited with status {code}"
    elif written is not None:
        n = failed_docs(json.loads(written.read_text()))
        reason = (f"{n} document(s) were not run (answered with an empty string; `error` in their samples' token_counts); "
                  f"results: {written}; set allow_failed_docs: true to accept them")
    else:
        reason = f"lmms-eval exited 0 but wrote no results file covering {','.join(run.tasks)}"
    return RunOutcome(run.name, "failed", None, seconds, f"{reason}; log: {log_path}\n{_tail(log_path)}")


def run_sweep(sweep: Sweep, only: Optional[Sequence[str]] = None, dry_run: bool = False, validate: bool = True,
              out: Optional[TextIO] = None) -> List[RunOutcome]:
    """Run every unfinished run of the sweep in order; finished runs are skipped, failures reported."""
    from tqdm import tqdm

    stream = out or sys.stdout
    runs = sweep.runs
    if only:
        names = {r.name for r in runs}
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"--only: no run named {', '.join(missing)}; runs: {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in set(only)]
    todo: List[RunSpec] = []
    outcomes: Dict[str, RunOutcome] = {}
    for run in runs:
        done = finished_results(run)
        if done is not None:
            outcomes[run.name] = RunOutcome(run.name, "skipped", done)
            differ = _settings_differ(run, done)
            if differ:
                outcomes[run.name].detail = "existing results were made with " + "; ".join(differ) + f" (delete {run.output_path} to redo)"
        else:
            todo.append(run)
    if validate:
        for run in todo:
            validate_model_args(run)  # all before the first launch: a typo stops the sweep at once

    def say(text: str) -> None:
        tqdm.write(text, file=stream)

    for run in runs:
        outcome = outcomes.get(run.name)
        if outcome is not None and outcome.status == "skipped":
            note = f"\n       note: {outcome.detail}" if outcome.detail else ""
            say(f"[skip] {run.name}: already finished ({outcome.results_file}){note}")
    bar = tqdm(total=len(todo), desc="sweep", unit="run", file=stream, disable=dry_run or not todo)
    for run in todo:
        if dry_run:
            outcomes[run.name] = RunOutcome(run.name, "dry-run")
            say(f"[plan] {run.name}: {shlex.join(run.command())}")
            continue
        bar.set_postfix_str(run.name)
        say(f"[run ] {run.name}: {run.model} {run.model_args_string()} on {','.join(run.tasks)}")
        try:
            outcome = run_one(run)
        except SweepInterrupted as stop:
            outcomes[run.name] = RunOutcome(run.name, "failed", None, 0.0, str(stop))
            _write_manifest(sweep, outcomes)
            say(f"[stop] {stop}; the sweep stops here (run it again to resume)")
            raise
        outcomes[run.name] = outcome
        if outcome.status == "ok":
            say(f"[ok  ] {run.name} ({outcome.seconds:.0f} s): {outcome.results_file}")
        elif outcome.status == "busy":
            say(f"[busy] {run.name}: {outcome.detail}")
        elif outcome.status == "skipped":
            say(f"[skip] {run.name}: {outcome.detail} ({outcome.results_file})")
        else:
            say(f"[FAIL] {run.name} ({outcome.seconds:.0f} s): {outcome.detail}")
        bar.update(1)
        _write_manifest(sweep, outcomes)
    bar.close()
    if not dry_run:
        _write_manifest(sweep, outcomes)
    ordered = [outcomes[r.name] for r in runs]
    counts = {s: sum(o.status == s for o in ordered) for s in ("ok", "skipped", "failed", "busy", "dry-run")}
    summary = f"sweep {sweep.path.name}: {len(ordered)} runs — {counts['ok']} ran now, {counts['skipped']} skipped (already finished)"
    if counts["dry-run"]:
        summary += f", {counts['dry-run']} would run"
    if counts["busy"]:
        summary += f", {counts['busy']} left to another sweep: " + ", ".join(o.name for o in ordered if o.status == "busy")
    if counts["failed"]:
        summary += f", {counts['failed']} FAILED: " + ", ".join(o.name for o in ordered if o.status == "failed")
    say(summary)
    board = f"lmms-tokprune leaderboard {shlex.quote(str(sweep.output_dir))} --out {shlex.quote(str(sweep.output_dir / 'leaderboard'))}"
    say(f"results: {sweep.output_dir}   (leaderboard: {board})")
    return ordered


def any_failed(outcomes: Sequence[RunOutcome]) -> bool:
    return any(o.status == "failed" for o in outcomes)


def outcomes_as_json(outcomes: Sequence[RunOutcome]) -> List[Dict[str, Any]]:
    return [{"name": o.name, "status": o.status, "results_file": str(o.results_file) if o.results_file else None,
             "seconds": round(o.seconds, 1), "detail": o.detail} for o in outcomes]


def _split_only(text: Optional[str]) -> Optional[List[str]]:
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def list_runs(sweep: Sweep, out: Optional[TextIO] = None) -> None:
    """`--list`: one line per run of the (shard of the) sweep, nothing run."""
    stream = out or sys.stdout
    where = "" if sweep.shard is None else f" (shard {sweep.shard[0]}/{sweep.shard[1]})"
    for run in sweep.runs:
        state = "finished" if finished_results(run) is not None else "to run"
        stream.write(f"{run.name}\t{run.model}\t{run.model_args_string()}\t{','.join(run.tasks)}\t{state}\n")
    stream.write(f"{len(sweep.runs)} runs{where} of {sweep.path.name}\n")


def sweep_main(file: str, overrides: Sequence[str] = (), pretrained: Optional[str] = None, output_dir: Optional[str] = None,
               limit: Optional[float] = None, only: Optional[str] = None, dry_run: bool = False,
               leaderboard: bool = False, shard: Optional[str] = None, list_only: bool = False) -> Tuple[int, List[RunOutcome]]:
    """What `lmms-tokprune sweep` does; returns (exit status, outcomes)."""
    chosen = parse_shard(shard) if shard is not None else None  # a bad spec fails before the file is read
    sweep = load_sweep(file, overrides, pretrained=pretrained, output_dir=output_dir, limit=limit)
    if chosen is not None:
        sweep = dataclasses.replace(sweep, runs=shard_runs(sweep.runs, *chosen), shard=chosen)
    if list_only:
        list_runs(sweep)
        return 0, []
    if not sweep.runs:
        print(f"shard {chosen[0]}/{chosen[1]} of {sweep.path.name} has no runs (the file has fewer than {chosen[1]})")
        return 0, []
    try:
        outcomes = run_sweep(sweep, only=_split_only(only), dry_run=dry_run)
    except SweepInterrupted as stop:
        return 128 + stop.signum, []
    if leaderboard and not dry_run and any(o.results_file for o in outcomes):
        from .report.leaderboard import write_leaderboard

        written = write_leaderboard([sweep.output_dir], sweep.output_dir / "leaderboard")
        print(f"leaderboard: {written['markdown']}")
    return (1 if any_failed(outcomes) else 0), outcomes

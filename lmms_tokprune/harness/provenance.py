"""How a run was made, recorded with its samples so a leaderboard can say it: the versions of the four packages
that decide the numbers, the lmms_tokprune source commit (when running from a git checkout), the checkpoint and
the prompt style. lmms-eval's own results JSON records only its own version and the git hash of the working
directory, which need not be ours."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

from .args import EvalConfig

PACKAGES = {"lmms_tokprune": "lmms-tokprune", "lmms_eval": "lmms_eval", "transformers": "transformers", "torch": "torch"}


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def versions() -> Dict[str, str]:
    return {key: _version(dist) for key, dist in PACKAGES.items()}


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def source_commit() -> Optional[str]:
    """The commit of the checkout lmms_tokprune is imported from ('-dirty' when tracked files differ), or None for
    an installed wheel (its version says what it is)."""
    package = Path(__file__).resolve().parents[1]
    root = package.parent
    if not (root / "pyproject.toml").is_file() or _git(root, "rev-parse", "--show-toplevel") != str(root):
        return None
    commit = _git(root, "rev-parse", "--short=12", "HEAD")
    if commit is None:
        return None
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "lmms_tokprune", "pyproject.toml")
    return commit + ("-dirty" if dirty else "")


def provenance(config: EvalConfig, vision_dtype: Optional[str] = None) -> Dict[str, str]:
    """One flat mapping per run (the same for every sample of it). `vision_dtype`: the dtype the loaded CLIP tower runs
    in ('float16' / 'float32' / 'bfloat16': what `vision_dtype=auto` resolved to)."""
    out = dict(versions())
    out["git_commit"] = source_commit() or ""
    out["checkpoint"] = config.pretrained
    if config.engine.model_base is not None:
        out["model_base"] = config.engine.model_base
    out["prompt_style"] = config.engine.prompt_style
    if vision_dtype is not None:
        out["vision_dtype"] = vision_dtype
    return out

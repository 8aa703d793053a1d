"""Where the shipped task YAMLs and model configs live (source checkout, editable or wheel install)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"none of {', '.join(map(str, candidates))} exists; reinstall lmms-tokprune")


def tasks_dir() -> Path:
    """The repo's tasks/ (pass it to lmms-eval as --include_path)."""
    return _first_existing(PACKAGE_DIR.parent / "tasks", PACKAGE_DIR / "tasks_data")


def model_configs_dir() -> Path:
    return _first_existing(PACKAGE_DIR.parent / "model_configs", PACKAGE_DIR / "model_configs_data")


def import_recipe(module: str):
    """Import a build-time module from the checkout's top-level recipes/ folder (not part of an installed wheel)."""
    import importlib
    import sys

    root = PACKAGE_DIR.parent
    if not (root / "recipes" / "__init__.py").is_file():
        raise ValueError("this command runs from a source checkout of lmms-tokprune (the recipes/ folder is not installed "
                         "with the package): clone the repository, `pip install -e .` there and run it again")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module)

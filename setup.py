"""Packages of the wheel (the rest of the metadata is in pyproject.toml).

tasks/ and model_configs/ stay top-level in the repository (lmms-eval's --include_path and --config take them
from a checkout) and travel inside the wheel as lmms_tokprune/tasks_data and lmms_tokprune/model_configs_data.
Every folder is listed as a package so its files are package data and the build prints no warnings; recipes/
(build-time tools) is not part of the wheel.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent
MAPPED = {"lmms_tokprune.tasks_data": "tasks", "lmms_tokprune.model_configs_data": "model_configs"}


def folders(package: str, folder: str) -> list:
    base = ROOT / folder
    subdirs = sorted(p for p in base.rglob("*") if p.is_dir() and "__pycache__" not in p.parts)
    return [package] + [".".join([package, *p.relative_to(base).parts]) for p in subdirs]


packages = find_namespace_packages(include=["lmms_tokprune", "lmms_tokprune.*"], exclude=["*.__pycache__"])
packages += [name for package, folder in MAPPED.items() for name in folders(package, folder)]
setup(packages=packages, package_dir=MAPPED)

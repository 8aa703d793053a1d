"""Regenerate this folder's data (deterministic): python tasks/shapes_vqa/make_data.py"""

from pathlib import Path

from lmms_tokprune.shapes import export_tasks

if __name__ == "__main__":
    print(export_tasks(Path(__file__).resolve().parent))

"""Regenerate this folder's data (deterministic): python tasks/shapes_vqa/make_data.py"""

from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout root, for recipes/

from recipes.shapes_vqa import export_tasks  # noqa: E402

if __name__ == "__main__":
    print(export_tasks(Path(__file__).resolve().parent))

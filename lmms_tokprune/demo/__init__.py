"""`lmms-tokprune demo` (the whole pipeline offline on the shipped demo checkpoint) and `eval-demo` (its
documented accuracy table, EVAL.json and Pareto plot)."""

from .run import DEMO_LIMIT, DemoRow, default_methods, demo_tasks, format_table, rows_as_json, run_demo, run_method

__all__ = ["DEMO_LIMIT", "DemoRow", "default_methods", "demo_tasks", "format_table", "rows_as_json", "run_demo", "run_method"]

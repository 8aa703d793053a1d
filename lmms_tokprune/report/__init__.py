"""Reports: the leaderboard (markdown, csv, Pareto plot) built from lmms-eval result folders."""

from .leaderboard import build_rows, main_metric, write_leaderboard

__all__ = ["build_rows", "main_metric", "write_leaderboard"]

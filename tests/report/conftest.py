"""Fixtures shared by the report tests: the stand-in lmms-eval launcher of test_sweep_leaderboard.py."""

from test_sweep_leaderboard import fake_launcher  # noqa: F401  (a fixture, found here by pytest)

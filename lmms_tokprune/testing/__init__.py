"""Tiny offline LLaVA-1.5-shaped checkpoints and their parts (see :mod:`lmms_tokprune.testing.tiny`)."""

from .tiny import *  # noqa: F401,F403 (the public names of tiny)
from .tiny import __all__  # noqa: F401

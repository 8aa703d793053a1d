"""Writing report files whole or not at all: a gate or a reader never sees a half-written table or baseline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def write_atomic(path: os.PathLike, content: Union[str, bytes]) -> Path:
    """Write `content` to a temporary name beside `path`, then rename it over `path` (atomic on one filesystem)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.replace(tmp, target)
    return target

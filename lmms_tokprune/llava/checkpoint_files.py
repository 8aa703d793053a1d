"""What every loader needs from a checkpoint on disk, before any weights are read: is a name a path, which files a
folder holds, readable headers, quiet transformers. Shared by the LLaVA loader, the original-format converter and the
CLIP text encoder, so each question has one answer."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (`owner/name`): starts with . / ~, has more than one separator, or exists."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or os.path.exists(name)


def read_json(folder: Path, name: str) -> Optional[Dict[str, Any]]:
    """`folder/name` parsed, or None when the file is not there."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    with open(path) as fh:
        return json.load(fh)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off inside the block (errors still raise; missing weights are checked by us)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def check_weight_files(folder: str, what: str) -> None:
    """Every safetensors file of a local checkpoint folder has a readable header covering the file: a truncated
    or garbage file is a ValueError naming the folder and the file (transformers' own error names neither)."""
    from safetensors import safe_open

    root = os.path.expanduser(folder)
    if not os.path.isdir(root):
        return  # a hub id: transformers resolves and reports it
    for name in sorted(os.listdir(root)):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(root, name), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # SafetensorError, OSError
            raise ValueError(f"{what}: {os.path.join(root, name)} is not a readable safetensors file ({first_line(err)}); "
                             "the checkpoint folder is damaged (re-download or re-save it)") from None


def check_tokenizer_files(folder: str, what: str) -> None:
    root = os.path.expanduser(folder)
    if os.path.isdir(root) and not any(os.path.isfile(os.path.join(root, n)) for n in TOKENIZER_FILES):
        raise ValueError(f"{what}: the folder {root} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")

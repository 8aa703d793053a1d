"""Helpers to run the real lmms-eval CLI and read what it wrote (it exits 0 even when a run fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def offline_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def run_lmms_eval(out_dir: Path, model: str, model_args: str, tasks: str = "tokprune_smoke", batch_size: int = 1,
                  limit: Optional[int] = None, processes: int = 1, extra: Optional[List[str]] = None, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "29517", "-m", "lmms_eval"]
    cmd = launcher + ["--model", model, "--model_args", model_args, "--tasks", tasks, "--include_path", str(REPO / "tasks"),
                      "--batch_size", str(batch_size), "--output_path", str(out_dir), "--log_samples", "--verbosity", "WARNING"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    cmd += extra or []
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=offline_env(), cwd=str(out_dir.parent))


def read_run(out_dir: Path, proc: Optional[subprocess.CompletedProcess] = None) -> dict:
    """results JSON + per-task samples of the single run under out_dir; a clear failure if missing."""
    results = sorted(out_dir.rglob("*_results.json"))
    tail = "" if proc is None else (proc.stdout[-3000:] + proc.stderr[-5000:])
    assert len(results) == 1, f"expected one results file under {out_dir}, found {results}\n{tail}"
    data = json.loads(results[0].read_text())
    samples = {}
    for path in results[0].parent.glob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data["_samples"] = samples
    return data


def smoke_docs() -> List[dict]:
    """The tokprune_smoke documents in dataset order (doc_id = line number)."""
    path = REPO / "tasks" / "tokprune_smoke" / "data" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay_in_process(model_id: str, model_args: str, samples: List[dict], task: str = "tokprune_smoke") -> Dict[int, tuple]:
    """What the engine computes in this process, one document at a time, for the samples of an lmms-eval run:
    doc_id -> (answer text as the harness returns it, visual_tokens_kept, llm_prefill_tokens)."""
    import importlib.util

    import torch

    from lmms_tokprune.harness.args import parse_model_args
    from lmms_tokprune.harness.model import cut_at_stop, image_key
    from lmms_tokprune.llava.batch import Sample
    from lmms_tokprune.llava.opener import open_engine

    spec = importlib.util.spec_from_file_location("smoke_utils", REPO / "tasks" / task / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    config = parse_model_args(model_id, dict(part.split("=", 1) for part in model_args.split(",")))
    engine = open_engine(config.engine, torch.device("cpu"))
    docs = smoke_docs()
    out = {}
    for s in samples:
        images = utils.smoke_doc_to_visual(docs[s["doc_id"]])
        keys = [image_key(task, "test", s["doc_id"], i) for i in range(len(images))]
        tokens, stats = engine.generate([Sample(s["input"], images, keys)], {"max_new_tokens": 8, "temperature": 0})
        text = cut_at_stop(engine.tokenizer.decode(tokens[0], skip_special_tokens=True), ["ASSISTANT:"]).strip()
        out[s["doc_id"]] = (text, stats[0].visual_tokens_kept, stats[0].llm_prefill_tokens)
    return out

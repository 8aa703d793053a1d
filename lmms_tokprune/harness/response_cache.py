"""lmms-eval's `--use_cache DIR` for our model ids: counts kept, progress stored per batch, identity = resolved config.

lmms-eval 0.7.3's `ResponseCache` stores only the answer text ("token counts are ephemeral",
EvolvingLMMs-Lab/lmms-eval#1108), calls the model once with every missing request and stores after it
returns, only reads runs that finished, and fingerprints the model by its model_args string (a
`config=my.yaml` is its file name). For a long token-pruning evaluation that loses work and reports wrong
numbers: a rerun served from the cache has no visual-token counts, a killed run resumes from nothing, and an
edited config file is served the old answers.

`CountingResponseCache` is a subclass that changes exactly that, and only for our model classes (other
models get the base behaviour, apart from the resume of killed runs, which is correct for any model):

* identity: our model ids are fingerprinted by `EvalConfig.digest` (the resolved configuration: every method
  parameter with its default, the config file's contents through what it resolves to), not by the string;
* counts: our answers are stored with their `TokPruneTokenCounts`, and a hit comes back with them (and is
  recorded in the run means);
* progress: the requests are cut into the batches the model would run (`plan_batches`) and each batch is
  looked up, run and stored before the next, so a killed run keeps every finished batch, per rank;
* resume: at start, the entries of earlier runs that never finished (killed, pre-empted) are merged into the
  root cache, so the next run finds them. Answers of documents that failed (empty text) are never stored.

lmms-eval builds its cache through the module-level name `lmms_eval.evaluator.ResponseCache`; `install()` points
that name at the subclass when one of our models is created (before lmms-eval creates the cache).
"""

from __future__ import annotations

import os
from glob import glob
from typing import Any, List

from lmms_eval.api.instance import GenerationResult
from lmms_eval.caching import response_cache as base

from ..catalog import model_ids
from .counts import TokPruneTokenCounts

COUNTS_KEY = "lmms_tokprune_counts"


class CachedResult(GenerationResult):
    """An answer served from the cache (its counts are the ones stored with it)."""


def cache_identity(model: str, model_args: Any) -> Any:
    """Our model ids: a string naming the resolved configuration's digest; anything else: unchanged."""
    if model not in model_ids():
        return model_args
    from lmms_eval.utils import simple_parse_args_string

    from .args import parse_model_args

    raw = dict(model_args) if isinstance(model_args, dict) else simple_parse_args_string(str(model_args or ""))
    try:
        return f"lmms_tokprune_config={parse_model_args(model, raw).digest}"
    except ValueError:  # the model itself refuses these args before anything is cached
        return model_args


def merge_unfinished_runs(cache_root: str) -> int:
    """Merge the rank DBs of runs that never finished (or changed since they were merged) into the root cache."""
    root = os.path.abspath(cache_root)
    run_root = os.path.join(root, base._LAYERED_RUNS_DIRNAME)
    if not os.path.isdir(run_root):
        return 0
    shards = []
    for run_dir in sorted(glob(os.path.join(run_root, "*"))):
        marker = os.path.join(run_dir, base._LAYERED_MERGED_MARKER)
        for db in sorted(glob(os.path.join(run_dir, "rank_*.db"))):
            newest = max(os.path.getmtime(p) for p in (db, db + "-wal") if os.path.exists(p))
            if not os.path.exists(marker) or newest > os.path.getmtime(marker):
                shards.append(db)
    if not shards:
        return 0
    with base._merge_lock(os.path.join(run_root, base._LAYERED_LOCK_DIRNAME), timeout_seconds=60):
        return base.ResponseCache.merge_shards(shards, os.path.join(root, "cache.db"))


class CountingResponseCache(base.ResponseCache):
    @classmethod
    def create(cls, cache_root: str, *, model: str = "", model_args: Any = "", task_dict: Any = None, world_size: int = 1,
               global_rank: int = 0) -> "CountingResponseCache":
        if global_rank == 0:
            merge_unfinished_runs(cache_root)
        return super().create(cache_root, model=model, model_args=cache_identity(model, model_args), task_dict=task_dict,
                              world_size=world_size, global_rank=global_rank)

    @staticmethod
    def _extract_cacheable(response: Any) -> Any:
        if isinstance(response, GenerationResult) and isinstance(response.token_counts, TokPruneTokenCounts):
            return {"text": response.text, COUNTS_KEY: response.token_counts.to_dict()}
        return base.ResponseCache._extract_cacheable(response)

    def _lookup(self, cache_key: str) -> Any:
        found = super()._lookup(cache_key)
        if isinstance(found, dict) and COUNTS_KEY in found:
            return CachedResult(text=found["text"], token_counts=TokPruneTokenCounts.from_dict(found[COUNTS_KEY]))
        return found

    def execute(self, lm: Any, reqtype: str, requests: List[Any]) -> list:
        plan = getattr(lm, "plan_batches", None)
        if reqtype != "generate_until" or plan is None:
            return super().execute(lm, reqtype, requests)
        results: list = [None] * len(requests)
        for batch in plan(requests):  # look up, run and store one batch at a time: a killed run keeps what finished
            chunk = [requests[i] for i in batch]
            for i, req, result in zip(batch, chunk, super().execute(lm, reqtype, chunk)):
                if isinstance(result, CachedResult):
                    lm.record(req, result, cached=True)
                results[i] = result
        return results


def install() -> None:
    """Point lmms-eval's cache constructor at CountingResponseCache (idempotent)."""
    import lmms_eval.evaluator as evaluator

    if not (isinstance(evaluator.ResponseCache, type) and issubclass(evaluator.ResponseCache, CountingResponseCache)):
        evaluator.ResponseCache = CountingResponseCache



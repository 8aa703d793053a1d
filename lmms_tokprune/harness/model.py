"""The lmms-eval model class: a narrow adapter from lmms-eval requests to CompressedLlava.

Subclasses only preset the method. Statistics are gathered across ranks in clean(), where the
evaluator has finished all requests, and logged into the results JSON (`throughput.avg_*`).
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from ..catalog import class_name, model_ids
from ..llava.batch import Sample
from ..llava.opener import open_engine
from ..llava.video import VideoClip, is_video_path
from . import response_cache
from .args import EvalConfig, parse_model_args
from .counts import SampleRecord, TokPruneTokenCounts, run_means
from .provenance import provenance


def image_key(task: str, split: str, doc_id: Any, index: int) -> int:
    """A stable per-image integer (seeds the random baseline identically on any batch or rank)."""
    return zlib.crc32(f"{task}/{split}/{doc_id}/{index}".encode())


def visuals_of(visuals: Any) -> List[Any]:
    """lmms-eval doc_to_visual output -> list of visuals: images, and video paths as `VideoClip`s (read at admission, by
    a family that takes videos); audio and other paths are a clear error."""
    if visuals is None:
        return []
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    out: List[Any] = []
    for item in items:
        if item is None:
            continue
        if is_video_path(item):
            out.append(VideoClip(item[0] if isinstance(item, (list, tuple)) else item))
            continue
        if isinstance(item, (str, dict, list, tuple)):
            raise ValueError("lmms_tokprune wrappers take images and video files only; this task gives audio or other path inputs")
        out.append(item)
    return out


def cut_at_stop(text: str, until: List[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class LlavaTokPrune(lmms):
    """LLaVA-1.5 (transformers) with a visual-token compression method; `method=` picks it."""

    MODEL_ID = "llava_tokprune"

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        args: EvalConfig = parse_model_args(self.MODEL_ID, model_args)
        response_cache.install()  # lmms-eval creates its --use_cache cache after the model: counts, progress, identity
        self.args = args
        accelerator = Accelerator()
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        if args.engine.device is not None:
            device = torch.device(args.engine.device)
        elif torch.cuda.is_available():
            device = torch.device(f"cuda:{accelerator.local_process_index}")
        else:
            device = torch.device("cpu")
        self._device = device
        self.engine = open_engine(args.engine, device)
        self._model = self.engine.model
        self.batch_size_per_gpu = args.batch_size
        self._provenance = provenance(args, str(self.engine.vision_dtype).removeprefix("torch."))
        self._records: List[SampleRecord] = []
        self._seconds = 0.0  # per document, of the last batch
        if self._rank == 0:
            logger.info(f"{self.MODEL_ID}: method={args.method} variant={args.variant} params={args.method_params} on {device} x{self._world_size}")

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- requests ------------------------------------------------------------------------
    def _sample_of(self, req: Instance) -> Tuple[Sample, Dict[str, Any], str]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        images = visuals_of(doc_to_visual(doc))
        keys = [image_key(task, split, doc_id, i) for i in range(len(images))]
        return Sample(context=context, images=images, image_keys=keys), dict(gen_kwargs or {}), task

    def plan_batches(self, requests: List[Instance]) -> List[List[int]]:
        """Request indices per batch: requests that share generation settings, longest prompts first (less padding)."""
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        batches = []
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            batches += [indices[s:s + self.batch_size_per_gpu] for s in range(0, len(indices), self.batch_size_per_gpu)]
        return batches

    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc=f"{self.MODEL_ID}:{self.args.method}")
        for batch in self.plan_batches(requests):
            for i, result in zip(batch, self.run_batch([requests[i] for i in batch])):
                results[i] = result
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def run_batch(self, reqs: List[Instance]) -> List[GenerationResult]:
        """Answer one batch. A document that cannot be prepared (or fails alone) gets an empty answer whose counts
        carry `error`; the others run. If the batch fails as a whole, its documents run one by one."""
        results: List[Optional[GenerationResult]] = [None] * len(reqs)
        admitted: List[Tuple[int, Sample, Dict[str, Any]]] = []
        for i, req in enumerate(reqs):
            try:
                sample, gen_kwargs, _ = self._sample_of(req)
                admitted.append((i, self.engine.admit(sample), gen_kwargs))
            except Exception as err:  # noqa: BLE001 - one bad document must not lose the run
                results[i] = self._failed(req, err)
        if admitted:
            try:
                answers = self._answer([a[1] for a in admitted], admitted[0][2])
            except Exception:  # noqa: BLE001 - find the document(s) that fail alone
                answers = []
                for _, sample, gen_kwargs in admitted:
                    try:
                        answers += self._answer([sample], gen_kwargs)
                    except Exception as err:  # noqa: BLE001
                        answers.append(err)
            for (i, _, _), answer in zip(admitted, answers):
                results[i] = self._failed(reqs[i], answer) if isinstance(answer, Exception) else answer
        for req, result in zip(reqs, results):
            self.record(req, result)
        return results  # type: ignore[return-value]

    def _answer(self, samples: List[Sample], gen_kwargs: Dict[str, Any]) -> List[GenerationResult]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if self.args.max_new_tokens is not None:
            gen_kwargs["max_new_tokens"] = self.args.max_new_tokens
        started = time.perf_counter()
        token_ids, stats = self.engine.generate(samples, gen_kwargs)  # BatchOutput
        self._seconds = (time.perf_counter() - started) / len(samples)
        tokenizer = self.engine.tokenizer
        out = []
        for ids, st in zip(token_ids, stats):
            text = self.engine.family.answer_text(tokenizer, ids, until)  # decoded, cut at `until`, stripped
            counts = TokPruneTokenCounts(
                input_tokens=int(st.llm_prefill_tokens),
                output_tokens=st.output_tokens,
                visual_tokens_in=st.visual_tokens_in,
                visual_tokens_kept=st.visual_tokens_kept,
                visual_tokens_equivalent=st.visual_tokens_equivalent,
                llm_prefill_tokens=st.llm_prefill_tokens,
                prefill_tflops=st.prefill_tflops,
                layout_tokens=st.layout_tokens,
                units=st.units,
                config=self.args.digest,
                method_args=self.args.method_args,
                provenance=self._provenance,
                **st.latency,
            )
            out.append(GenerationResult(text=text, token_counts=counts))
        return out

    def _failed(self, req: Instance, err: BaseException) -> GenerationResult:
        """The answer of a document that was not run: empty text, counts carrying one line on what went wrong."""
        task, doc_id = req.args[4], req.args[3]
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        message = f"{task} doc {doc_id}: {first if isinstance(err, (ValueError, OSError)) else f'{type(err).__name__}: {first}'}"
        logger.warning(f"{self.MODEL_ID}: not run: {message}")
        return GenerationResult(text="", token_counts=TokPruneTokenCounts(config=self.args.digest, method_args=self.args.method_args,
                                                                          provenance=self._provenance, error=message))

    def record(self, req: Instance, result: GenerationResult, cached: bool = False) -> None:
        """One document's counts for the run means (padding copies are skipped)."""
        if (req.metadata or {}).get("__padding_only__"):
            return
        counts = result.token_counts if isinstance(result.token_counts, TokPruneTokenCounts) else TokPruneTokenCounts()
        self._records.append(SampleRecord.of(req.args[4], req.args[3], counts, 0.0 if cached else self._seconds, cached))

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        raise NotImplementedError(f"{self.MODEL_ID} supports generate_until tasks only (no loglikelihood / multiple-choice-by-likelihood tasks)")

    def generate_until_multi_round(self, requests: List[Instance]) -> List[str]:
        raise NotImplementedError(f"{self.MODEL_ID} supports single-round generate_until tasks only")

    # -- statistics ----------------------------------------------------------------------
    def gathered_records(self) -> List[SampleRecord]:
        """All ranks' records (padding copies were never recorded)."""
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: List[Any] = [None] * self._world_size
            torch.distributed.all_gather_object(parts, self._records)
            return [r for part in parts for r in part]
        return list(self._records)

    def clean(self) -> None:
        records = self.gathered_records()
        if self._rank == 0 and records:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            failed = [r.error for r in records if r.error is not None]
            if failed:
                shown = "; ".join(failed[:10]) + (f"; ... ({len(failed) - 10} more)" if len(failed) > 10 else "")
                logger.warning(f"{self.MODEL_ID}: {len(failed)} document(s) were not run (answered with an empty string, "
                               f"`error` in their token_counts): {shown}")
            means = run_means(records)
            total_time = sum(r.seconds for r in records)
            total_out = sum(r.output_tokens for r in records)
            log_metrics(
                total_elapsed_time=total_time,
                total_gen_tokens=total_out,
                avg_speed=total_out / total_time if total_time > 0 else 0.0,
                additional_metrics={**means, "total_requests": float(len(records))},
            )
        self._records = []
        super().clean()


def _preset(model_id: str, method: str) -> type:
    """The class lmms-eval instantiates for a preset id: LlavaTokPrune with MODEL_ID set, nothing else."""
    doc = f"{model_id}: LLaVA-1.5 with method {method!r}."
    return type(class_name(model_id), (LlavaTokPrune,), {"MODEL_ID": model_id, "__module__": __name__, "__doc__": doc})


# One class per preset model id of the catalog (LlavaRecover, LlavaPrumerge, ...); manifests point at them.
PRESET_CLASSES: Dict[str, type] = {mid: _preset(mid, method) for mid, method in model_ids().items() if method is not None}
globals().update({cls.__name__: cls for cls in PRESET_CLASSES.values()})

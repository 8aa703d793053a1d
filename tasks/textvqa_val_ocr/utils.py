"""textvqa_val_ocr reuses lmms-eval's own TextVQA hooks; only the prompt kwargs differ (ocr: true)."""

from lmms_eval.tasks.textvqa.utils import (  # noqa: F401
    textvqa_aggregate_submissions,
    textvqa_doc_to_text,
    textvqa_doc_to_visual,
    textvqa_process_results,
)

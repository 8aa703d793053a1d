"""seedbench_img: lmms-eval's SEED-Bench hooks on the image questions only."""

from lmms_eval.tasks.seedbench.utils import seed_aggregation_result, seed_doc_to_text, seed_doc_to_visual, seed_process_result  # noqa: F401


def image_questions_only(dataset):
    """Keep documents whose data_type is 'image' (SEED-Bench mixes image and video questions)."""
    return dataset.filter(lambda doc: doc["data_type"] == "image")

"""shapes_vqa: a deterministic synthetic VQA benchmark (scenes, questions, captions) for the demo checkpoint."""

from .dataset import export_tasks, scene_questions, test_docs, training_items
from .generator import FAMILIES, IMAGE_SIZE, POST_PROMPT, SPLIT_SEEDS, caption, corpus_sentences, questions_for, render, sample_scene

__all__ = ["FAMILIES", "IMAGE_SIZE", "POST_PROMPT", "SPLIT_SEEDS", "caption", "corpus_sentences", "export_tasks", "questions_for",
           "render", "sample_scene", "scene_questions", "test_docs", "training_items"]

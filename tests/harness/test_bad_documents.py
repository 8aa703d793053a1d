"""One bad document must not lose a run: it is answered with an empty string, its counts carry `error`, the
results carry the failure count, and everything else is computed as usual."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from lmms_eval_runs import read_run, run_lmms_eval
from PIL import Image

from lmms_tokprune.llava.batch import DocumentError, Sample
from lmms_tokprune.llava.images import check_complete, to_rgb

TASK_YAML = """
task: odd_docs
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''
from pathlib import Path
from PIL import Image
HERE = Path(__file__).resolve().parent

def doc_to_visual(doc):
    out = []
    for name in doc["images"]:
        if name.endswith(".mp4"):
            out.append(str(HERE / name))  # what a video task gives: a path
            continue
        im = Image.open(HERE / name)
        im.load()  # lmms-eval turned LOAD_TRUNCATED_IMAGES on: a truncated file decodes without an error
        out.append(im)
    return out

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]

def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
'''


@pytest.fixture(scope="module")
def odd_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_tasks") / "odd_docs"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / "fine.png")
    good = (root / "fine.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(root / "deep.png")  # I;16
    (root / "clip.mp4").write_bytes(b"\x00" * 16)
    docs = [
        {"question": "What is it?", "answer": "red", "images": ["fine.png"]},
        {"question": "What is it?", "answer": "red", "images": ["truncated.png"]},
        {"question": "What happens?", "answer": "red", "images": ["clip.mp4"]},
        {"question": "Compare them.", "answer": "red", "images": ["fine.png"] * 5},  # 5 x 576 > the tiny LLM's 2048 positions
        {"question": "What is it?", "answer": "red", "images": ["deep.png"]},
        {"question": "What is it?", "answer": "red", "images": ["fine.png"]},
    ]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "odd_docs.yaml").write_text(TASK_YAML)
    (root / "utils.py").write_text(TASK_UTILS)
    return root.parent


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_bad_documents_are_answered_empty_and_the_run_goes_on(tiny_llava, odd_task, tmp_path, batch_size):
    out = tmp_path / "out"
    proc = run_lmms_eval(out, "llava_tokprune", f"pretrained={tiny_llava},method=none", tasks="odd_docs", batch_size=batch_size,
                         extra=["--include_path", str(odd_task)])
    run = read_run(out, proc)
    samples = {s["doc_id"]: s for s in run["_samples"]["odd_docs"]}
    assert sorted(samples) == list(range(6))
    errors = {d: s["token_counts"][0].get("error") for d, s in samples.items()}
    assert errors[1].startswith("odd_docs doc 1: image 0:") and "truncated.png cannot be decoded completely" in errors[1]
    assert errors[2] == ("odd_docs doc 2: image 0: llava15 checkpoints take images; this document gives a video (clip.mp4): "
                         "a Video-LLaVA checkpoint (model_type 'video_llava') reads videos")
    assert errors[3].startswith("odd_docs doc 3: the prompt needs up to") and "the LLM has 2048" in errors[3]
    for d in (1, 2, 3):
        assert samples[d]["filtered_resps"] == "" and "visual_tokens_kept" not in samples[d]["token_counts"][0]
    for d in (0, 4, 5):
        assert errors[d] is None and samples[d]["token_counts"][0]["visual_tokens_kept"] == 576
    assert samples[0]["filtered_resps"] == samples[5]["filtered_resps"]  # the same image and question
    assert run["throughput"]["avg_failed_docs"] == 3 and run["throughput"]["avg_num_samples"] == 3
    log = proc.stdout + proc.stderr
    assert "3 document(s) were not run" in log and "odd_docs doc 1" in log


def test_sixteen_bit_images_are_stretched_not_clipped():
    deep = np.arange(64 * 64).reshape(64, 64).astype(np.uint16) * 15
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert image.mode == "I;16" and np.asarray(image.convert("RGB")).mean() > 250  # what PIL's convert gives: white
    rgb = np.asarray(to_rgb(image))
    expected = np.round(deep.astype(np.float64) * 255 / deep.max()).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert np.asarray(to_rgb(Image.fromarray(np.full((4, 4), 7, dtype=np.uint16)))).max() == 0  # constant: black


def test_truncated_files_are_found_even_when_pil_is_told_to_accept_them(tmp_path):
    from PIL import ImageFile

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as lmms-eval sets it
    try:
        opened = Image.open(tmp_path / "b.png")
        opened.load()
        with pytest.raises(ValueError, match="b.png cannot be decoded completely"):
            check_complete(opened)
        lazy = Image.open(io.BytesIO((tmp_path / "b.png").read_bytes()))  # a stream not decoded yet
        with pytest.raises(ValueError, match="cannot be decoded completely"):
            check_complete(lazy)
        ok = Image.open(tmp_path / "a.png")
        ok.load()
        check_complete(ok)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_admission_refuses_prompts_longer_than_the_context(tiny_llava):
    from lmms_tokprune.llava.opener import open_engine
    from lmms_tokprune.llava.options import engine_options

    image = Image.new("RGB", (50, 50))
    engine = open_engine(engine_options({"pretrained": str(tiny_llava)}), torch.device("cpu"))
    engine.admit(Sample("q", [image] * 3))
    with pytest.raises(DocumentError, match="needs up to 2"):
        engine.admit(Sample("q", [image] * 4))
    budgeted = open_engine(engine_options({"pretrained": str(tiny_llava), "method": "spatial", "budget": 64}), torch.device("cpu"),
                           engine.model, engine.processor)
    assert len(budgeted.admit(Sample("q", [image] * 20)).images) == 20  # 20 x 64 fits: the budget compresses to fit


@pytest.mark.parametrize("method", ["prumerge_plus", "recover"])
def test_reference_runs_a_multi_image_document_image_by_image(tiny_llava, tiny_clip, method):
    """The released code sees one image per call: a two-image document at batch 1 is compressed image by image
    (before: 'only runs with batch size 1' for the whole document)."""
    from lmms_tokprune.llava.opener import open_engine
    from lmms_tokprune.llava.options import engine_options

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (60 + 20 * i, 70, 3), dtype=np.uint8)) for i in range(2)]
    options = engine_options({"pretrained": str(tiny_llava), "method": method, "variant": "reference", "text_encoder": str(tiny_clip),
                              **({"text_source": "reference"} if method == "recover" else {})})
    engine = open_engine(options, torch.device("cpu"))
    sample = Sample("Compare them.", images, [0, 1])
    prompt = engine.prompt_text(sample)
    texts = engine.text_guide.texts_for([sample.context] * 2, [prompt] * 2) if engine.text_guide is not None else []
    both = engine.compress_images(engine.images.prepare(images), [0, 1], texts).images
    alone = [engine.compress_images(engine.images.prepare([im]), [i], texts[:1]).images[0] for i, im in enumerate(images)]
    assert len(both) == 2
    for got, want in zip(both, alone):
        assert torch.equal(got.index, want.index) and torch.allclose(got.features, want.features)
    stats = engine.generate([sample], {"max_new_tokens": 2}).stats[0]
    assert stats.visual_tokens_kept == sum(a.num_tokens for a in alone)


def test_reference_that_runs_one_image_per_call_refuses_a_batch_at_load_time():
    from lmms_tokprune.harness.args import parse_model_args

    for model_id in ("llava_recover", "llava_prumerge_plus"):
        with pytest.raises(ValueError, match="reference\\): the released code runs one image per call, so reference runs only "
                                             "with batch_size=1 \\(got 4\\)"):
            parse_model_args(model_id, {"variant": "reference", "batch_size": 4})
        assert parse_model_args(model_id, {"variant": "fixed", "batch_size": 4}).batch_size == 4
    assert parse_model_args("llava_prumerge", {"variant": "reference", "batch_size": 4}).batch_size == 4  # pools its fence over the batch

"""Video-LLaVA through its family adapter: clips read as lmms-eval reads them, `none` token-identical to plain transformers
(videos and images), counts (2,048 visual tokens + 8 frame CLS layout tokens, 8 units per video; 256 / 0 / 1 per image),
per-frame budgets, PruMerge's video readings, in-LLM methods over the whole span, batch == one by one, bad clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.llava.batch import DocumentError, Sample
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options
from lmms_tokprune.llava.video import VideoClip, read_frames
from lmms_tokprune.testing.tiny_video import moving_shapes

QUESTION = "What is moving in the video"


def _engine(ckpt, **args):
    return open_engine(engine_options({"pretrained": str(ckpt), "dtype": "float32", **args}), torch.device("cpu"))


def _image(seed=0):
    return Image.fromarray(moving_shapes(1, 80, 60, colour="blue", shape="square", seed=seed)[0])


@pytest.fixture(scope="module")
def none_engine(tiny_video):
    return _engine(tiny_video, prompt_style="lmms_eval")


def _video(clips, i=0):
    return VideoClip(clips[f"good{i}"])


def test_frames_are_read_as_lmms_eval_reads_them(video_clips):
    from lmms_eval.models.model_utils.load_video import read_video

    for name in ("good0", "good3"):
        frames, total, indices = read_frames(video_clips[name])
        assert frames.shape[0] == 8 and indices == np.linspace(0, total - 1, 8, dtype=int).tolist()
        assert np.array_equal(frames, read_video(video_clips[name], num_frm=8))  # upstream PR #1487's call


def test_bad_clips_are_one_line_or_a_sane_reading(none_engine, video_clips):
    for name, needle in (("short", "has 5 frames"), ("not_video", "cannot be opened"), ("truncated", "cannot be"), ("empty", "cannot be opened")):
        with pytest.raises(DocumentError, match=needle) as err:
            none_engine.admit(Sample(QUESTION, [VideoClip(video_clips[name])], [0]))
        assert "\n" not in str(err.value)
    raw = none_engine.admit(Sample(QUESTION, [VideoClip(video_clips["raw_stream"])], [0])).images[0]  # no count, no seeking
    assert raw.frames.shape[0] == 8 and raw.total_frames == 20 and raw.indices == np.linspace(0, 19, 8, dtype=int).tolist()


def test_counts_match_the_processor(none_engine, video_clips):
    """A video: 8 units, 2,048 visual tokens + 8 frame CLS = the 2,056 placeholders the processor expands <video> to."""
    family = none_engine.family
    clip = _video(video_clips).read()
    plan = family.plan_image(clip)
    assert (plan.units, plan.visual_tokens_in, plan.layout_tokens_in) == (8, 2048, 8)
    ids = none_engine.processor(text="<video>", videos=clip.frames, return_tensors="pt")["input_ids"][0]
    assert int((ids == family.video_token_id).sum()) == 2056
    image = family.plan_image(_image())
    assert (image.units, image.visual_tokens_in, image.layout_tokens_in) == (1, 256, 0)
    ids = none_engine.processor(text="<image>", images=_image(), return_tensors="pt")["input_ids"][0]
    assert int((ids == family.image_token_id).sum()) == 256


def _plain_generate(ckpt, prompt, video=None, image=None, max_new_tokens=8):
    from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(ckpt))
    model = VideoLlavaForConditionalGeneration.from_pretrained(str(ckpt)).eval()
    inputs = processor(text=prompt, videos=video, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    return (out[: out.index(eos)] if eos in out else out), inputs["input_ids"].shape[1]


@pytest.mark.parametrize("style", ["lmms_eval", "chat_template"])
def test_none_is_token_identical_to_plain_transformers(tiny_video, video_clips, style):
    engine = _engine(tiny_video, prompt_style=style)
    for visual in (_video(video_clips, 1), _image(3)):
        sample = engine.admit(Sample(QUESTION, [visual], [0]))
        got = engine.generate([sample], {"max_new_tokens": 8})
        video = sample.images[0].frames if isinstance(sample.images[0], VideoClip) else None
        expected, length = _plain_generate(tiny_video, engine.prompt_text(sample), video=video, image=None if video is not None else sample.images[0])
        assert got.tokens[0] == expected
        assert got.stats[0].llm_prefill_tokens == length


def test_default_prompt_is_video_llavas_eval_prompt(tiny_video, video_clips):
    """llava_v1 (default): the llava_v1 conversation, the video's placeholder, "\\n", the question (Video-LLaVA's
    run_inference_video_qa.py), ids as its `tokenizer_image_token` makes them."""
    engine = _engine(tiny_video)
    sample = engine.admit(Sample(QUESTION, [_video(video_clips)], [0]))
    prompt = engine.prompt_text(sample)
    assert prompt.endswith(f"USER: <video>\n{QUESTION} ASSISTANT:") and prompt.startswith("A chat between")
    ids = engine.prompt_ids(sample, prompt)
    assert ids.count(engine.image_token_id) == 1 and engine.family.video_token_id not in ids
    out = engine.generate([sample], {"max_new_tokens": 2})
    assert out.stats[0].llm_prefill_tokens == len(ids) - 1 + 2056


def test_batch_of_four_and_a_mixed_batch_equal_one_by_one(tiny_video, video_clips):
    engine = _engine(tiny_video, prompt_style="lmms_eval", method="prumerge")
    samples = [engine.admit(Sample(QUESTION, [_video(video_clips, i)], [i])) for i in range(3)]
    samples.append(engine.admit(Sample("What colour is the square", [_image(1)], [9])))
    batch = engine.generate(samples, {"max_new_tokens": 5})
    for s, tokens, st in zip(samples, batch.tokens, batch.stats):
        one = engine.generate([s], {"max_new_tokens": 5})
        assert one.tokens[0] == tokens
        assert (one.stats[0].visual_tokens_kept, one.stats[0].layout_tokens, one.stats[0].units) == (st.visual_tokens_kept, st.layout_tokens, st.units)
    assert [st.units for st in batch.stats] == [8, 8, 8, 1] and [st.layout_tokens for st in batch.stats] == [8, 8, 8, 0]


def test_budget_per_video_is_split_over_frames_and_frame_cls_are_layout(tiny_video, video_clips):
    engine = _engine(tiny_video, prompt_style="lmms_eval", method="visionzip", budget=256)
    samples = [engine.admit(Sample(QUESTION, [_video(video_clips)], [0])), engine.admit(Sample(QUESTION, [_image()], [1]))]
    prepared = engine.prepare(samples)
    assert [len(units) for units in prepared.compressed] == [8, 1]
    assert [c.num_tokens for c in prepared.compressed[0]] == [32] * 8 and prepared.compressed[1][0].num_tokens == 256
    video, image = prepared.stats
    assert (video.visual_tokens_in, video.visual_tokens_kept, video.layout_tokens, video.units) == (2048, 256, 8, 8)
    assert (image.visual_tokens_in, image.visual_tokens_kept, image.layout_tokens, image.units) == (256, 256, 0, 1)
    layout = prepared.llm.layout_mask[0]
    slots = torch.nonzero(layout | prepared.llm.image_mask[0]).flatten()
    assert torch.equal(torch.nonzero(layout).flatten(), slots[:: 33])  # each frame's CLS before its 32 tokens
    assert int(prepared.llm.image_mask[0].sum()) == 256
    unit = _engine(tiny_video, prompt_style="lmms_eval", method="visionzip", budget=16, budget_scope="unit")
    assert unit.prepare(samples[:1]).stats[0].visual_tokens_kept == 128


def test_prumerge_readings_on_video(tiny_video, video_clips):
    """reference: the release with the frames as its batch (one IQR fence pooled: every frame keeps the same k);
    fixed: per frame adaptive; PruMerge+ reference refuses a video with one line."""
    sample = Sample(QUESTION, [_video(video_clips, 2)], [0])
    ref = _engine(tiny_video, method="prumerge", variant="reference")
    counts = [c.num_tokens for c in ref.prepare([ref.admit(sample)]).compressed[0]]
    assert len(set(counts)) == 1
    fixed = _engine(tiny_video, method="prumerge")
    assert len({c.num_tokens for c in fixed.prepare([fixed.admit(sample)]).compressed[0]}) > 1
    plus = _engine(tiny_video, method="prumerge_plus", variant="reference")
    with pytest.raises(DocumentError, match="refuses a video"):
        plus.admit(sample)
    plus.admit(Sample(QUESTION, [_image()], [0]))  # an image is still one released call


@pytest.mark.parametrize("method", ["recover", "cdpruner"])
def test_text_guided_methods_need_an_explicit_text_encoder(tiny_video, method):
    with pytest.raises(ValueError, match="text_encoder=") as err:
        _engine(tiny_video, method=method, **({"budget": 64} if method == "cdpruner" else {}))
    assert "\n" not in str(err.value)


def test_in_llm_method_over_the_video_span_keeps_frame_cls(tiny_video, video_clips):
    engine = _engine(tiny_video, prompt_style="lmms_eval", method="fastv", budget=160)
    samples = [engine.admit(Sample(QUESTION, [_video(video_clips)], [0])), engine.admit(Sample(QUESTION, [_image()], [1]))]
    out = engine.generate(samples, {"max_new_tokens": 3})
    video = out.stats[0]
    assert video.visual_tokens_in == 2048 and video.layout_tokens == 8 and video.visual_tokens_kept < 2048
    prepared = engine.prepare(samples[:1])
    layout = torch.nonzero(prepared.llm.layout_mask[0]).flatten()
    kept = video.details.llm_kept_positions
    assert set(layout.tolist()) <= set(kept.tolist())  # frame CLS tokens are never pruned
    one = engine.generate(samples[:1], {"max_new_tokens": 3})
    assert one.tokens[0] == out.tokens[0]


def test_image_families_refuse_a_video_document(tiny_llava, video_clips):
    engine = _engine(tiny_llava)
    with pytest.raises(DocumentError, match="Video-LLaVA checkpoint"):
        engine.admit(Sample(QUESTION, [_video(video_clips)], [0]))


def test_visualize_draws_a_frame_strip_for_a_video(tiny_video, video_clips, tmp_path):
    import json

    from lmms_tokprune.report.token_map import visualize

    paths = visualize(str(tiny_video), video_clips["good0"], QUESTION, ["prumerge"], str(tmp_path), params={"prumerge": {"budget": 256}})
    assert paths[0].is_file() and paths[0].suffix == ".png"
    record = json.loads((tmp_path / "prumerge.json").read_text())
    assert record["family"] == "video_llava" and record["units"] == 8 and record["unit_tokens"] == [32] * 8
    assert len(record["roles"]) == 8 and all(len(r) == 256 for r in record["roles"]) and len(record["frames"]) == 8

"""Original LLaVA-repository checkpoints (full fine-tune, LoRA + base) load in memory and answer as the original code.

The reference in this file is written from reading haotian-liu/LLaVA (never imported, never copied):
- `tokenizer_image_token` (llava/mm_utils.py): each text chunk around `<image>` tokenized on its own by the slow
  SentencePiece tokenizer (BOS added, dropped from every chunk after the first), IMAGE_TOKEN_INDEX (-200) between;
- `load_pretrained_model` (llava/model/builder.py): LLM from the folder (LoRA: from model_base, then
  non_lora_trainables.bin, then peft's merge W += B @ A * alpha / r), CLIP tower + image processor from mm_vision_tower;
- `process_images` with image_aspect_ratio 'pad': expand2square with int(255 * mean) per channel, then the CLIP processor;
- the vicuna_v1 conversation of model_vqa_loader: "<system> USER: <image>\\n{question} ASSISTANT:", greedy generate.
Here the weights are converted by a hand-written mapping into a transformers LLaVA folder and run with plain
`LlavaForConditionalGeneration.generate` on those ids; our loader must give the same answers, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.llava import original_format
from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.loading import check_checkpoint, load_llava
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options
from lmms_tokprune.llava.prompts import VICUNA_SYSTEM
from lmms_tokprune.testing.original_format import (
    build_base_llm,
    build_original_llava,
    build_original_lora,
    build_tiny_clip_tower,
)

ORIGINAL_IMAGE_TOKEN = -200  # llava/constants.py IMAGE_TOKEN_INDEX
QUESTIONS = ["What colour is the circle?", "How many squares are there?", "Is there a blue star in the picture?",
             "What shape is shown in the image?", "Which object is on the left?", "Is the background white?"]
POST = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    tower = build_tiny_clip_tower(root / "clip-vit")
    full = build_original_llava(root / "llava-v1.5-tiny", tower)
    base = build_base_llm(root / "vicuna-tiny")
    lora = build_original_lora(root / "llava-v1.5-tiny-lora", base, tower)
    return {"root": root, "tower": tower, "full": full, "base": base, "lora": lora}


def _images():
    rng = np.random.default_rng(3)
    sizes = [(336, 336), (200, 300), (400, 250), (64, 64), (300, 180), (17, 40)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# ----------------------------------------------------------------------------------------- the reading of the original
def sentencepiece(folder: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def original_prompt(question: str) -> str:
    """conv_templates['vicuna_v1'] with DEFAULT_IMAGE_TOKEN + '\\n' + question, as model_vqa_loader builds it."""
    return f"{VICUNA_SYSTEM} USER: <image>\n{question} ASSISTANT:"


def original_ids(prompt: str, sp, bos: int = 1) -> list:
    """tokenizer_image_token with the slow Llama tokenizer (a BOS, then SentencePiece's own encoding of each chunk)."""
    chunks = [[bos] + sp.encode(chunk) for chunk in prompt.split("<image>")]
    ids = [bos]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(ORIGINAL_IMAGE_TOKEN)
        ids.extend(chunk[1:])
    return ids


def original_state(ckpt: Path, base: Path = None) -> dict:
    """The tensors load_pretrained_model ends with, under the original names: the full folder's pytorch_model.bin, or the
    base's weights + non_lora_trainables (prefix rules of the builder) + every LoRA pair merged W += B @ A * alpha / r."""
    from safetensors.torch import load_file

    if base is None:
        return torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state = load_file(str(base / "model.safetensors"))
    extra = torch.load(ckpt / "non_lora_trainables.bin", weights_only=True)
    extra = {k[len("base_model."):] if k.startswith("base_model.") else k: v for k, v in extra.items()}
    if any(k.startswith("model.model.") for k in extra):
        extra = {k[len("model."):] if k.startswith("model.") else k: v for k, v in extra.items()}
    state.update(extra)
    adapter = torch.load(ckpt / "adapter_model.bin", weights_only=True)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    for key in [k for k in adapter if k.endswith("lora_A.weight")]:
        target = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
        b = adapter[key.replace("lora_A", "lora_B")]
        state[target] = state[target] + (b @ adapter[key]) * (config["lora_alpha"] / config["r"])
    return state


def hand_convert(ckpt: Path, out: Path, base: Path = None) -> Path:
    """Write a transformers LLaVA folder from an original-format one, every name mapped by hand."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    flat = json.loads((ckpt / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(base or ckpt))
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.unk_token
    state = original_state(ckpt, base)
    hf = {}
    for key, value in state.items():
        if key == "model.embed_tokens.weight":
            hf["model.language_model.embed_tokens.weight"] = torch.cat([value, torch.zeros(1, value.shape[1])])
        elif key == "lm_head.weight":
            hf["lm_head.weight"] = torch.cat([value, torch.zeros(1, value.shape[1])])
        elif key.startswith("model.layers.") or key == "model.norm.weight":
            hf["model.language_model." + key[len("model."):]] = value
        elif key.startswith("model.mm_projector.0."):
            hf["model.multi_modal_projector.linear_1." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.mm_projector.2."):
            hf["model.multi_modal_projector.linear_2." + key.rsplit(".", 1)[1]] = value
    tower = CLIPVisionModel.from_pretrained(flat["mm_vision_tower"])
    hf.update({"model.vision_tower." + k: v for k, v in tower.state_dict().items()})
    text = {k: flat[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                 "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act")}
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config={"model_type": "llama", **text, "vocab_size": vocab + 1},
                         image_token_index=vocab, projector_hidden_act="gelu", vision_feature_layer=flat["mm_vision_select_layer"],
                         vision_feature_select_strategy="default", multimodal_projector_bias=True, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config)
    model.load_state_dict(hf, strict=True)
    model.save_pretrained(out)
    LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(flat["mm_vision_tower"], backend="pil"), tokenizer=tokenizer,
                   patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(out)
    return out


def original_answers(hf_folder: Path, sp, tower: Path, questions, images, max_new_tokens: int = 8, drop_piece: bool = False) -> list:
    """model_vqa_loader on the hand-converted weights: LLaVA's ids (the image id expanded to its 576 slots), the image
    padded to a square, greedy decoding over the original vocabulary only."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(hf_folder)).eval()
    image_processor = AutoImageProcessor.from_pretrained(str(tower), backend="pil")
    colour = tuple(int(x * 255) for x in image_processor.image_mean)
    image_id, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    out = []
    for question, image in zip(questions, images):
        ids = original_ids(original_prompt(question + POST), sp)
        if drop_piece:  # what whole-prompt tokenization with <image> as an added token gives
            at = ids.index(ORIGINAL_IMAGE_TOKEN)
            assert ids[at + 1] == sp.piece_to_id("▁")
            ids = ids[: at + 1] + ids[at + 2:]
        expanded = [t for i in ids for t in ([image_id] * 576 if i == ORIGINAL_IMAGE_TOKEN else [i])]
        w, h = image.size
        square = Image.new("RGB", (max(w, h), max(w, h)), colour)
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        pixels = image_processor(images=square, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([expanded]), pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=2, suppress_tokens=list(range(vocab - 1, vocab)))
        row = gen[0, len(expanded):].tolist()
        out.append(row[: row.index(2)] if 2 in row else row)
    return out


def our_answers(pretrained: Path, questions, images, max_new_tokens: int = 8, **args) -> list:
    engine = open_engine(engine_options({"pretrained": str(pretrained), "dtype": "float32", **args}), torch.device("cpu"))
    tokens, _ = engine.generate([Sample(q + POST, [im]) for q, im in zip(questions, images)], {"max_new_tokens": max_new_tokens})
    return tokens


# ----------------------------------------------------------------------------------------- tests
def test_prompt_ids_are_the_originals_for_original_and_llava_hf_checkpoints(ckpts, tiny_llava):
    """prompt_style=llava_v1 gives tokenizer_image_token's ids: the lone dummy-prefix piece before the newline stays."""
    engine = open_engine(engine_options({"pretrained": str(ckpts["full"]), "dtype": "float32"}), torch.device("cpu"))
    sp = sentencepiece(ckpts["full"])
    for question in QUESTIONS:
        sample = Sample(question + POST, [Image.new("RGB", (8, 8))])
        ids = engine.prompt_ids(sample, engine.prompt_text(sample))
        expected = [engine.image_token_id if t == ORIGINAL_IMAGE_TOKEN else t for t in original_ids(original_prompt(question + POST), sp)]
        assert ids == expected
        at = ids.index(engine.image_token_id)
        assert engine.tokenizer.convert_ids_to_tokens(ids[at + 1: at + 3]) == ["▁", "<0x0A>"]
    # a llava-hf checkpoint under llava_v1: the same rule with its own tokenizer (each chunk tokenized alone)
    hf = open_engine(engine_options({"pretrained": str(tiny_llava)}), torch.device("cpu"))
    tok = hf.tokenizer
    prompt = original_prompt(QUESTIONS[0] + POST)
    chunks = [tok(c)["input_ids"] for c in prompt.split("<image>")]
    expected = [chunks[0][0]] + chunks[0][1:] + [hf.image_token_id] + chunks[1][1:]
    sample = Sample(QUESTIONS[0] + POST, [Image.new("RGB", (8, 8))])
    assert hf.prompt_ids(sample, hf.prompt_text(sample)) == expected
    assert expected != tok(prompt)["input_ids"]  # whole-prompt tokenization would drop the piece


def test_tokenizer_model_only_folder_loads(ckpts):
    """A folder that ships only tokenizer.model (SentencePiece): it loads (the protobuf pin) as the Llama tokenizer its
    tokenizer_config.json names, and encodes like SentencePiece (dummy prefix included)."""
    assert not (ckpts["full"] / "tokenizer.json").exists()
    tok, own = original_format.original_tokenizer(check_checkpoint(str(ckpts["full"])))
    assert type(tok).__name__ == "LlamaTokenizer" and own == 640 and len(tok) == 641
    sp = sentencepiece(ckpts["full"])
    for text in [VICUNA_SYSTEM + " USER: ", "\nWhat colour is the circle? ASSISTANT:", " ", "  two spaces", " \n lead", "A. red B. 12 + 7 = 19",
                 "caf\u00e9 \u65e5\u672c\t\u00a0x"]:
        assert tok(text)["input_ids"] == [1] + sp.encode(text)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_answers_equal_the_original_pipeline_on_hand_converted_weights(ckpts, tmp_path, kind):
    base = ckpts["base"] if kind == "lora" else None
    folder = ckpts[kind]
    converted = hand_convert(folder, tmp_path / "hf", base)
    images = _images()
    sp = sentencepiece(base or folder)
    reference = original_answers(converted, sp, ckpts["tower"], QUESTIONS, images)
    assert len({tuple(r) for r in reference}) > 1, "the tiny model must answer differently to different inputs"
    assert our_answers(folder, QUESTIONS, images) == reference
    # teeth: without the piece the original keeps, the same weights answer differently
    assert original_answers(converted, sp, ckpts["tower"], QUESTIONS, images, drop_piece=True) != reference


def test_lora_merge_changes_the_model(ckpts):
    """The adapter is really merged (and the projector comes from non_lora_trainables.bin): the LoRA model's weights
    are the base's plus B @ A * alpha / r."""
    model, _ = load_llava(str(ckpts["lora"]), torch.device("cpu"), "float32")
    state = original_state(ckpts["lora"], ckpts["base"])
    q = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(q, state["model.layers.1.self_attn.q_proj.weight"], atol=1e-6)
    from safetensors.torch import load_file

    assert not torch.allclose(q, load_file(str(ckpts["base"] / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, state["model.mm_projector.0.weight"])


def test_added_rows_are_never_generated(ckpts):
    """The <image> row the conversion adds is suppressed: even a huge logit for it is never chosen, in generate() and in
    the in-LLM methods' own decoder loop."""
    for method, params in (("none", {}), ("fastv", {"k": 1, "rank": 64})):
        engine = open_engine(engine_options({"pretrained": str(ckpts["full"]), "dtype": "float32", "method": method, **params}),
                             torch.device("cpu"))
        image_id = engine.image_token_id
        assert engine.model.generation_config.suppress_tokens == [image_id]
        with torch.no_grad():
            engine.model.lm_head.weight[image_id] = 50.0 * engine.model.lm_head.weight[:image_id].abs().max()
        tokens, _ = engine.generate([Sample(QUESTIONS[0], [_images()[0]])], {"max_new_tokens": 5})
        assert tokens[0] and image_id not in tokens[0]


def test_methods_run_on_original_checkpoints(ckpts):
    """Any method runs on a converted checkpoint; batch 2 == batch 1."""
    images = _images()[:2]
    for method, params in (("prumerge", {}), ("topk_cls", {"budget": 32}), ("pdrop", {"layer_list": "1", "image_token_ratio_list": "0.5"})):
        engine = open_engine(engine_options({"pretrained": str(ckpts["lora"]), "dtype": "float32", "method": method, **params}),
                             torch.device("cpu"))
        samples = [Sample(q, [im], [i]) for i, (q, im) in enumerate(zip(QUESTIONS, images))]
        batched, stats = engine.generate(samples, {"max_new_tokens": 4})
        assert batched == [engine.generate([s], {"max_new_tokens": 4})[0][0] for s in samples]
        assert all(s.visual_tokens_in == 576 for s in stats)


# ----------------------------------------------------------------------------------------- errors before any weights
@pytest.fixture()
def no_weights(monkeypatch):
    """Reading any weight file fails the test: the errors below come from the checks alone."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were read before the checkpoint was checked")
    monkeypatch.setattr(original_format, "read_weights", refuse)


def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unsupported_projector_is_refused(ckpts, tmp_path, no_weights):
    bad = _edited_copy(ckpts["full"], tmp_path / "linear", mm_projector_type="linear")
    with pytest.raises(ValueError) as err:
        load_llava(str(bad), torch.device("cpu"))
    assert "mm_projector_type='linear'" in _one_line(err) and "mlp2x_gelu" in str(err.value)


def test_missing_tower_is_refused(ckpts, tmp_path, no_weights):
    bad = _edited_copy(ckpts["full"], tmp_path / "notower", mm_vision_tower=str(tmp_path / "no-such-clip"))
    with pytest.raises(ValueError) as err:
        check_checkpoint(str(bad))
    assert "mm_vision_tower" in _one_line(err) and "no-such-clip" in str(err.value)


def test_lora_without_a_reachable_base_is_refused(ckpts, tmp_path, no_weights):
    import shutil

    lora = tmp_path / "lora"
    shutil.copytree(ckpts["lora"], lora)
    adapter = json.loads((lora / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(tmp_path / "gone-vicuna")
    (lora / "adapter_config.json").write_text(json.dumps(adapter))
    with pytest.raises(ValueError) as err:
        load_llava(str(lora), torch.device("cpu"))
    assert "model_base" in _one_line(err) and "gone-vicuna" in str(err.value)
    # model_base= names the base explicitly and wins over the adapter config
    found = check_checkpoint(str(lora), model_base=str(ckpts["base"]))
    assert found.base == ckpts["base"]
    with pytest.raises(ValueError, match="only for LoRA folders"):
        check_checkpoint(str(ckpts["base"]), model_base=str(ckpts["base"]))
    with pytest.raises(ValueError, match="full checkpoint, not a LoRA folder"):
        check_checkpoint(str(ckpts["full"]), model_base=str(ckpts["base"]))
    (lora / "non_lora_trainables.bin").unlink()
    with pytest.raises(ValueError, match="without non_lora_trainables.bin"):
        check_checkpoint(str(lora), model_base=str(ckpts["base"]))


def test_model_base_is_a_validated_model_arg(ckpts):
    from lmms_tokprune.harness.args import parse_model_args

    args = parse_model_args("llava_tokprune", {"pretrained": str(ckpts["lora"]), "model_base": str(ckpts["base"])})
    assert args.engine.model_base == str(ckpts["base"]) and args.identity()["model_base"] == str(ckpts["base"])
    assert "model_base" not in parse_model_args("llava_tokprune", {"pretrained": str(ckpts["full"])}).identity()

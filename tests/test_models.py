"""Tests for axpo_nemo.models: tiny tokenizer, chat template, processor, tiny Qwen3-VL, save/load."""

from __future__ import annotations

import json
import time
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from axpo_nemo.models import (
    ADDED_TEXT_TOKENS,
    SPECIAL_TOKENS,
    build_tiny_processor,
    build_tiny_qwen3vl,
    build_tiny_tokenizer,
    load_qwen3vl,
    save_pretrained_bundle,
    special_token_ids,
    tiny_qwen3vl_config,
)
from axpo_nemo.models import tokenizer as tokenizer_module

pytestmark = pytest.mark.numerics

TOOLS = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
TOOLS_SYSTEM_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def image_inputs(bundle):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return bundle.processor(text=[prompt], images=[_image(100, 150)], return_tensors="pt")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_builds_fast_and_deterministically(tok):
    start = time.perf_counter()
    merges, vocab = tokenizer_module._train_bpe.__wrapped__(1024)
    assert time.perf_counter() - start < 2.0
    assert (merges, vocab) == tokenizer_module._train_bpe(1024)
    assert 300 <= len(merges) <= 2000
    assert 1000 <= len(tok) <= 2000
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()
    assert build_tiny_tokenizer() is not tok  # fresh object per call, shared cached training


def test_special_tokens_are_single_ids(tok):
    ids = special_token_ids(tok)
    assert list(ids) == list(SPECIAL_TOKENS + ADDED_TEXT_TOKENS)
    assert len(set(ids.values())) == len(ids)
    for text, token_id in ids.items():
        assert tok.encode(text, add_special_tokens=False) == [token_id]
        assert tok.encode(f"a{text}b", add_special_tokens=False)[1] == token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None


def test_special_token_ids_names_missing_token(tok):
    class NoThink:
        def convert_tokens_to_ids(self, text):
            return None if text == "<think>" else tok.convert_tokens_to_ids(text)

        def convert_ids_to_tokens(self, token_id):
            return tok.convert_ids_to_tokens(token_id)

    with pytest.raises(KeyError, match="<think>"):
        special_token_ids(NoThink())


def test_tokenizer_round_trips_text_and_special_tokens(tok):
    text = (
        '<|im_start|>user\nHéllo wörld ∑ 数学 🙂 x² = 12345.678 {"a": [1, 2]}<|im_end|>\n'
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    )
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False))
    assert digits == ["1", "2", "3", "4", "5"]  # Qwen splits digits one by one
    kept = tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in kept and "<|im_end|>" not in kept
    assert "<think>" in kept and "</tool_call>" in kept  # think/tool tokens are not "special"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_round_trips_any_nfc_text(text):
    tok = build_tiny_tokenizer()
    text = unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# --------------------------------------------------------------------------- chat template


def test_chat_template_system_tools_image_generation_prompt(bundle):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]},
    ]
    expected = (
        "<|im_start|>system\nYou are helpful.\n\n"
        + TOOLS_SYSTEM_BLOCK
        + f"<|im_start|>user\n{VISION}Count.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    for renderer in (bundle.processor, bundle.tokenizer):
        rendered = renderer.apply_chat_template(
            messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
        )
        assert rendered == expected


def test_chat_template_full_tool_conversation(tok):
    turn = '<think>\nI should zoom.\n</think>\n\n<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call>'
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello!"},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}]},
        {"role": "assistant", "content": turn},
        {"role": "tool", "content": [{"type": "text", "text": "zoomed "}, {"type": "image"}]},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "<think>\nok\n</think>\n\nIt is a cat."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nGreet.\n</think>\n\nHello!<|im_end|>\n"  # history kept verbatim
        f"<|im_start|>user\nLook: {VISION}<|im_end|>\n"
        f"<|im_start|>assistant\n{turn}<|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\nzoomed {VISION}\n</tool_response>\n"
        "<tool_response>\ndone\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nok\n</think>\n\nIt is a cat.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert (
        with_prompt
        == expected[: expected.rindex("<|im_start|>assistant\n")] + "<|im_start|>assistant\n<think>\n"
    )
    # token-in/token-out: the full conversation extends the prompt that produced its last turn
    assert expected.startswith(with_prompt)


def test_chat_template_tool_calls_field_and_thinking_off(tok):
    messages = [
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "zoom", "arguments": {"x": 1}}},
                {"type": "function", "function": {"name": "crop", "arguments": '{"y": 2}'}},
            ],
        },
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "crop", "arguments": {"y": 2}}\n</tool_call><|im_end|>\n'
    )
    no_think = tok.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# --------------------------------------------------------------------------- processor


def test_processor_expands_image_pads(bundle):
    processor = bundle.processor
    assert isinstance(processor, Qwen3VLProcessor)
    sizes = [(64, 64), (100, 150), (448, 448), (300, 90)]
    text = "".join(f"{VISION}img {i} " for i in range(len(sizes)))
    out = processor(
        text=[text], images=[_image(w, h, i) for i, (w, h) in enumerate(sizes)], return_tensors="pt"
    )
    grid = out["image_grid_thw"]
    assert grid.shape == (len(sizes), 3)
    merge = processor.image_processor.merge_size
    per_image = (grid.prod(-1) // merge**2).tolist()
    assert all(4 <= n <= 16 for n in per_image)  # small min/max pixels: few tokens per image
    assert per_image[2] == 16  # 448x448 -> 128x128 -> 8x8 patches -> 16 tokens
    image_id = bundle.config.image_token_id
    assert int((out["input_ids"] == image_id).sum()) == sum(per_image)
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)
    assert int(out["mm_token_type_ids"].sum()) == sum(per_image)


def test_processor_rejects_videos(bundle):
    with pytest.raises(ValueError, match="video"):
        bundle.processor(text=["x"], videos=[[_image(32, 32)]])


def test_build_tiny_processor_custom_pixels(tok):
    processor = build_tiny_processor(tok, min_pixels=32 * 32, max_pixels=64 * 64)
    out = processor(text=[VISION], images=[_image(448, 448)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


# --------------------------------------------------------------------------- model


def test_config_is_valid_qwen3vl(bundle, tok):
    config = bundle.config
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert config.vision_config.out_hidden_size == text.hidden_size
    assert max(config.vision_config.deepstack_visual_indexes) < config.vision_config.depth
    ids = special_token_ids(tok)
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert text.vocab_size == len(tok)
    assert bundle.model.lm_head.weight is bundle.model.model.language_model.embed_tokens.weight
    wide = tiny_qwen3vl_config(
        len(tok), tokenizer=tok, text_config={"head_dim": 64}, tie_word_embeddings=False
    )
    assert wide.text_config.rope_parameters["mrope_section"] == [12, 10, 10]
    assert wide.tie_word_embeddings is False


def test_forward_with_image_and_generate(bundle, image_inputs):
    model = bundle.model
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    seq = image_inputs["input_ids"].shape[1]
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(**image_inputs).logits
    assert logits.shape == (1, seq, len(bundle.tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**image_inputs, max_new_tokens=6, do_sample=False)
    assert time.perf_counter() - start < 5.0
    assert out.shape[0] == 1 and seq < out.shape[1] <= seq + 6
    assert torch.equal(out[0, :seq], image_inputs["input_ids"][0])
    assert isinstance(bundle.tokenizer.decode(out[0, seq:]), str)


def test_seeding_is_deterministic():
    rng_before = torch.random.get_rng_state()
    a, b, c = build_tiny_qwen3vl(seed=3), build_tiny_qwen3vl(seed=3), build_tiny_qwen3vl(seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_bfloat16_build():
    bundle = build_tiny_qwen3vl(dtype=torch.bfloat16)
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(bundle, image_inputs, tmp_path):
    path = save_pretrained_bundle(bundle, tmp_path / "tiny")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    loaded = load_qwen3vl(path)
    assert isinstance(loaded.processor, Qwen3VLProcessor)
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == bundle.tokenizer.chat_template
    assert loaded.model.dtype == torch.float32
    assert loaded.model.generation_config.eos_token_id == bundle.model.generation_config.eos_token_id
    reprocessed = loaded.processor(
        text=[
            bundle.tokenizer.decode(image_inputs["input_ids"][0]).replace(
                "<|image_pad|>" * 15, "<|image_pad|>"
            )
        ],
        images=[_image(100, 150)],
        return_tensors="pt",
    )
    assert torch.equal(reprocessed["input_ids"], image_inputs["input_ids"])
    assert torch.allclose(reprocessed["pixel_values"], image_inputs["pixel_values"])
    with torch.no_grad():
        expected = bundle.model(**image_inputs).logits
        actual = loaded.model(**image_inputs).logits
    assert (expected - actual).abs().max().item() < 1e-5


def test_load_real_checkpoint_layout_falls_back_to_image_text_processor(bundle, image_inputs, tmp_path):
    """Rewrite a saved tiny folder into the hub layout of Qwen3-VL (video processor config,
    preprocessor_config.json, chat_template.json): without torchvision the fallback must kick in."""
    path = save_pretrained_bundle(bundle, tmp_path / "hub_layout")
    image_config = json.loads((path / "processor_config.json").read_text())["image_processor"]
    (path / "processor_config.json").unlink()
    image_config.update(image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(image_config))
    video_config = {**image_config, "video_processor_type": "Qwen3VLVideoProcessor"}
    del video_config["image_processor_type"]
    (path / "video_preprocessor_config.json").write_text(json.dumps(video_config))
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))

    loaded = load_qwen3vl(path, dtype=torch.float32, device="cpu")
    assert isinstance(loaded.processor, Qwen3VLProcessor)
    assert loaded.processor.image_processor.patch_size == 16
    assert loaded.tokenizer.chat_template == template == loaded.processor.chat_template
    out = loaded.processor(text=[VISION], images=[_image(100, 150)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == image_inputs["image_grid_thw"].tolist()
    custom = load_qwen3vl(path, chat_template="{{ 'x' }}")
    assert custom.tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False) == "x"


def test_load_missing_path_raises_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*nope"):
        load_qwen3vl(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*empty"):
        load_qwen3vl(tmp_path / "empty")


def test_build_policy_follows_the_config():
    from axpo_nemo.config import load_config
    from axpo_nemo.models import build_policy

    cfg = load_config(
        "demo",
        ["model.tiny.num_layers=1", "model.tiny.hidden_size=96", "model.tiny.vision_depth=1", "model.tiny.rope_theta=1234"],
    )
    bundle = build_policy(cfg.model, seed=3)
    text, vision = bundle.config.text_config, bundle.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.head_dim) == (1, 96, cfg.model.tiny.head_dim)
    assert text.rope_parameters["rope_theta"] == 1234.0
    assert vision.depth == 1 and vision.out_hidden_size == 96
    assert next(bundle.model.parameters()).dtype == torch.float32  # 'auto' on CPU
    again = build_policy(cfg.model, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(bundle.model.parameters(), again.model.parameters(), strict=True))


def test_build_policy_rejects_a_missing_checkpoint_and_device(tmp_path):
    from axpo_nemo.config import load_config
    from axpo_nemo.models import build_policy

    cfg = load_config("demo", [f"model.name={tmp_path / 'nope'}", "model.device=cpu"])
    with pytest.raises(FileNotFoundError, match="nope"):
        build_policy(cfg.model)
    if not torch.cuda.is_available():
        cfg = load_config("demo", ["model.device=cuda"])
        with pytest.raises(ValueError, match=r"model\.device"):
            build_policy(cfg.model)

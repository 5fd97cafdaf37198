"""Hugging Face export of local policies and checkpoints (axpo_nemo.export.hf).

Guarantees checked: the exported folder holds every file a Qwen3-VL checkpoint has (weights,
configs, tokenizer, processor and video-processor configs, chat template in both forms); it loads
with ``AutoModelForImageTextToText`` and gives the in-memory model's logits (to 1e-5) on an input
with an image, and with the project's loader it gives the same processor outputs; a state dict
(perturbed weights, as a trainer checkpoint would hold) exported on top of a base gives the
perturbed model's logits; dtype casting leaves the live model alone; writes are atomic.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor

from axpo_nemo.export import export_checkpoint, export_from_state_dict, export_hf
from axpo_nemo.models import build_tiny_qwen3vl, load_processor, load_qwen3vl

EXPECTED_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
}


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    return export_hf(bundle, tmp_path_factory.mktemp("export") / "tiny-hf")


def _inputs(processor):
    image = Image.fromarray(
        torch.randint(
            0, 256, (96, 128, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        ).numpy()
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many apples?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_export_writes_a_complete_folder(bundle, exported):
    names = {p.name for p in exported.iterdir()}
    assert names >= EXPECTED_FILES
    assert not any(
        n.startswith(".") for n in {p.name for p in exported.parent.iterdir()}
    )  # no temp dirs left
    template = bundle.processor.chat_template
    assert (exported / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert json.loads((exported / "chat_template.json").read_text())["chat_template"] == template
    pre = json.loads((exported / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen3VLProcessor" and pre["merge_size"] == 2 and pre["patch_size"] == 16
    video = json.loads((exported / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor" and video["image_mean"] == [0.5] * 3
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == bundle.model.generation_config.eos_token_id


def test_auto_model_reload_matches_in_memory_logits(bundle, exported):
    inputs = _inputs(bundle.processor)
    assert "pixel_values" in inputs
    reloaded = AutoModelForImageTextToText.from_pretrained(exported, local_files_only=True).eval()
    assert type(reloaded) is type(bundle.model)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(bundle.model, inputs), atol=1e-5, rtol=0)


def test_processor_reloads_identically(bundle, exported):
    if importlib.util.find_spec("torchvision") is not None:
        processor = AutoProcessor.from_pretrained(exported, local_files_only=True)
        assert isinstance(processor, Qwen3VLProcessor)
    processor = load_processor(exported)
    assert processor.chat_template == bundle.processor.chat_template
    a, b = _inputs(processor), _inputs(bundle.processor)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    loaded = load_qwen3vl(exported)
    assert loaded.tokenizer.chat_template == bundle.tokenizer.chat_template
    torch.testing.assert_close(_logits(loaded.model, a), _logits(bundle.model, b), atol=1e-5, rtol=0)


def test_existing_folder_needs_overwrite(bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        export_hf(bundle, out)
    assert (out / "stale.txt").exists()
    export_hf(bundle, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dtype_cast_leaves_the_live_model_alone(bundle, tmp_path):
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    out = export_hf(bundle, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert all(torch.equal(v, before[k]) for k, v in bundle.model.state_dict().items())
    assert bundle.model.dtype == torch.float32
    reloaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    expected = bundle.model.model.language_model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(reloaded.model.language_model.embed_tokens.weight, expected)


def _perturbed(bundle):
    model = copy.deepcopy(bundle.model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are visited once, so they stay tied
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def test_perturbed_state_dict_export_gives_perturbed_logits(bundle, tmp_path):
    model = _perturbed(bundle)
    out = export_from_state_dict(model.state_dict(), bundle, tmp_path / "ckpt-hf")
    reloaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    inputs = _inputs(bundle.processor)
    got = _logits(reloaded, inputs)
    torch.testing.assert_close(got, _logits(model, inputs), atol=1e-5, rtol=0)
    assert (got - _logits(bundle.model, inputs)).abs().max() > 1e-3
    assert {p.name for p in out.iterdir()} >= EXPECTED_FILES


def test_export_checkpoint_with_loader_and_path_base(bundle, exported, tmp_path):
    model = _perturbed(bundle)
    ckpt = tmp_path / "step_10"
    ckpt.mkdir()
    # A trainer-style state dict: wrapped keys (torch.compile) and the tied head left out.
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, ckpt / "policy.pt")
    calls = []

    def loader(path):
        calls.append(path)
        return torch.load(path / "policy.pt", weights_only=True)

    out = export_checkpoint(ckpt, tmp_path / "hf", load_state_dict=loader, base=exported)
    assert calls == [ckpt]
    reloaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    inputs = _inputs(bundle.processor)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs), atol=1e-5, rtol=0)
    assert load_processor(out).chat_template == bundle.processor.chat_template


def test_state_dict_that_does_not_fit_is_refused(bundle, tmp_path):
    state = dict(bundle.model.state_dict())
    with pytest.raises(ValueError, match="not in the base"):
        export_from_state_dict({**state, "extra.weight": torch.zeros(2)}, bundle, tmp_path / "a")
    missing = {k: v for k, v in state.items() if "layers.0.mlp" not in k}
    with pytest.raises(ValueError, match="lacks"):
        export_from_state_dict(missing, bundle, tmp_path / "b")
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1.0}
    with pytest.raises(ValueError, match="tied"):
        export_from_state_dict(untied, bundle, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []

"""Quantized export with NVIDIA Model Optimizer (axpo_nemo.export.quantize).

Guarantees checked: calibration inputs are the RL questions rendered through the chat template
with their images (image tokens match the image grid), a seeded subset when capped; exclude
patterns name modules (a module and what it contains, not name prefixes); an FP8 export of the
tiny Qwen3-VL calibrated on CPU is a complete folder with ``hf_quant_config.json`` and a
``quant_method: modelopt`` config whose ignore list covers the vision tower and LM head, stores
the text layers' linear weights as FP8 with scales and every excluded module unquantized, and
its dequantized weights equal the fake-quantized model's; bad settings (LM head quantized with
tied embeddings, everything excluded, unknown format) are refused; formats Model Optimizer runs
only on CUDA are refused on CPU up front with the reason, and exported on a GPU when one exists.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

pytest.importorskip(
    "modelopt.torch.quantization", reason="nvidia-modelopt is not installed (axpo-nemo[quant])"
)

from axpo_nemo.data.synth import SynthConfig, synthesize
from axpo_nemo.export.quantize import (
    DEFAULT_EXCLUDE,
    QUANT_FORMATS,
    QuantizationUnavailable,
    QuantizeConfig,
    _matches,
    calibration_inputs,
    export_quantized,
    load_dequantized,
    modelopt_config,
    quantize_model,
    read_calibration_samples,
)
from axpo_nemo.models import build_tiny_qwen3vl, load_chat_template, load_processor

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_FILES = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "hf_quant_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
}


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(num_sft=0, num_rl=8, num_eval=0), out)
    return read_calibration_samples(out / "rl.jsonl")


@pytest.fixture(scope="module")
def batches(questions):
    samples, root = questions
    return calibration_inputs(build_tiny_qwen3vl(seed=0).processor, samples, root, limit=4, seed=0)


@pytest.fixture(scope="module")
def fp8_export(batches, tmp_path_factory):
    """(export result, fake-quantized copy calibrated the same way, full-precision reference)."""
    bundle = build_tiny_qwen3vl(seed=0)
    reference = copy.deepcopy(bundle.model)
    cfg = QuantizeConfig(format="fp8", calib_samples=4, device="cpu")
    fake = quantize_model(copy.deepcopy(bundle.model).to(torch.bfloat16), cfg, batches)
    made = export_quantized(bundle, tmp_path_factory.mktemp("q") / "tiny-fp8", cfg, batches)
    return made, fake, reference


def test_calibration_inputs_are_rendered_rl_prompts(questions, batches):
    samples, root = questions
    processor = build_tiny_qwen3vl(seed=0).processor
    assert len(batches) == 4
    again = calibration_inputs(processor, samples, root, limit=4, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with_images = [b for b in batches if "pixel_values" in b]
    assert with_images
    for b in with_images:
        assert int((b["input_ids"] == image_pad).sum()) == int(b["image_grid_thw"].prod(-1).sum()) // 4
    text = processor.tokenizer.decode(batches[0]["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert len(calibration_inputs(processor, samples, root)) == len(samples)
    with pytest.raises(ValueError, match="no questions"):
        calibration_inputs(processor, [], root)


def test_exclude_patterns_name_modules():
    assert _matches("model.visual.blocks.0.attn.qkv", ["*visual*"])
    assert _matches("lm_head", ["lm_head"]) and not _matches("lm_head_extra", ["lm_head"])
    assert _matches("model.layers.3.mlp.gate", ["*mlp.gate"])
    assert not _matches("model.layers.3.mlp.gate_proj", ["*mlp.gate"])
    assert _matches("model.language_model.layers.0.mlp.experts.1.up_proj", ["*mlp.experts"])
    entries = modelopt_config("fp8", ["lm_head"])["quant_cfg"]
    assert entries[-1]["quantizer_name"] == "lm_head.*" and entries[-1]["enable"] is False


def test_config_validation():
    with pytest.raises(ValueError, match="format"):
        QuantizeConfig(format="int3")
    with pytest.raises(ValueError, match="exclude"):
        QuantizeConfig(exclude=["*visual*", " "])
    with pytest.raises(ValueError, match="calib_samples"):
        QuantizeConfig(calib_samples=0)
    assert QuantizeConfig().exclude == DEFAULT_EXCLUDE


def test_fp8_export_is_a_complete_vllm_modelopt_folder(fp8_export):
    made, _, _ = fp8_export
    assert {p.name for p in made.path.iterdir()} >= EXPECTED_FILES
    quant = json.loads((made.path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8"
    config = json.loads((made.path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "FP8"
    assert any("visual" in p for p in qc["ignore"]) and "lm_head" in qc["ignore"]
    assert made.vllm_command.endswith("--quantization modelopt")
    assert len(made.quantized) == 14 and all(".language_model.layers." in n for n in made.quantized)
    assert "lm_head" in made.excluded and "model.visual.patch_embed.proj" in made.excluded
    assert sum("visual" in n for n in made.excluded) == 13
    with safe_open(str(made.path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name in made.quantized:
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert f"{name}.weight_scale" in tensors and f"{name}.input_scale" in tensors
    for name in made.excluded:
        if f"{name}.weight" in tensors:  # lm_head is tied to the embeddings and stored once
            assert tensors[f"{name}.weight"].dtype == torch.bfloat16
    assert tensors["model.language_model.embed_tokens.weight"].dtype == torch.bfloat16
    assert load_processor(made.path).chat_template == load_chat_template()


def test_dequantized_export_matches_fake_quantization(fp8_export, batches):
    made, fake, reference = fp8_export
    dense = load_dequantized(made.path)
    modules = dict(fake.named_modules())
    state = dense.model.state_dict()
    with torch.no_grad():
        for name in made.quantized:
            m = modules[name]
            expected = m.weight_quantizer(m.weight).float()
            got = state[f"{name}.weight"]
            # Calibration ran in bfloat16, the export's scales are float32: a value on the edge
            # between two FP8 codes may round the other way, never further (E4M3 has a 1/8 step).
            scale = float(m.weight_quantizer.amax) / 448.0
            diff = (got - expected).abs()
            assert bool((diff <= 0.126 * expected.abs() + scale * 2**-8).all()), name
            flipped = diff > 0.01 * expected.abs() + 1e-6  # beyond the bfloat16 rounding of the copy
            assert float(flipped.float().mean()) < 0.1, name
            assert not torch.equal(got, reference.get_submodule(name).weight.float())
        visual = "model.visual.blocks.0.attn.qkv.weight"
        torch.testing.assert_close(state[visual], reference.state_dict()[visual].bfloat16().float())
        got = dense.model(**batches[0]).logits
        want = reference(**batches[0]).logits
    assert 0 < (got - want).abs().max() < 0.5


def test_bad_settings_are_refused(batches):
    bundle = build_tiny_qwen3vl(seed=0)
    with pytest.raises(ValueError, match="lm_head"):
        quantize_model(bundle.model, QuantizeConfig(exclude=["*visual*"]), batches[:1])
    with pytest.raises(ValueError, match="no module was quantized"):
        quantize_model(build_tiny_qwen3vl(seed=0).model, QuantizeConfig(exclude=["*"]), batches[:1])


@pytest.mark.parametrize("fmt", [f for f, q in QUANT_FORMATS.items() if q.cuda_only])
def test_cuda_only_formats_are_refused_on_cpu_with_the_reason(fmt, batches, tmp_path):
    cfg = QuantizeConfig(format=fmt, device="cpu")
    with pytest.raises(QuantizationUnavailable, match="needs a CUDA GPU") as err:
        export_quantized(build_tiny_qwen3vl(seed=0), tmp_path / "out", cfg, batches)
    assert QUANT_FORMATS[fmt].cuda_only in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVFP4 / MXFP8 calibration needs a CUDA GPU")
@pytest.mark.parametrize("fmt", [f for f, q in QUANT_FORMATS.items() if q.cuda_only])
def test_cuda_only_formats_export_on_a_gpu(fmt, batches, tmp_path):
    cfg = QuantizeConfig(format=fmt, device="cuda")
    made = export_quantized(build_tiny_qwen3vl(seed=0), tmp_path / fmt, cfg, batches)
    quant = json.loads((made.path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == QUANT_FORMATS[fmt].quant_algo
    assert {p.name for p in made.path.iterdir()} >= EXPECTED_FILES

"""Export of NeMo-RL cluster checkpoints (axpo_nemo.nemo.export_megatron) and folder completion.

Guarantees checked: the layout of a NeMo-RL checkpoint_dir is recognised (Megatron ``iter_*``,
DTensor consolidated, torch DCP), the newest *complete* step is chosen (unfinished ``tmp_step_N``
and broken steps skipped) and ``--step N`` picks N or names the steps present; a folder of none
of the known layouts gets an error saying what each needs; without NeMo-RL a Megatron export
fails before writing anything, naming NeMo-RL, the container and the converter command; with a
converter (here a stand-in for Megatron-Bridge, which needs the NeMo-RL container) the call gets
the checkpoint's model name, iteration folder and overrides; a DTensor consolidated checkpoint
(weights and config only) exports for real into a folder that reloads with the trained weights'
logits, the base model's processor and the project's chat template; a Hugging Face folder with
its processor files removed is completed (stale template replaced) or refused with an error
naming ``--processor-from``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor

from axpo_nemo.cli import main
from axpo_nemo.export.hf import PROCESSOR_FILES, complete_hf_folder, export_hf
from axpo_nemo.models import build_tiny_qwen3vl, load_chat_template, load_processor
from axpo_nemo.nemo import adapter
from axpo_nemo.nemo.export_megatron import (
    CheckpointLayoutError,
    ProcessorNotFoundError,
    detect_format,
    export_any,
    export_hf_folder,
    export_nemo_rl_checkpoint,
    find_nemo_rl_checkpoint,
)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

COMPLETE_FILES = {
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


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def base_dir(bundle, tmp_path_factory):
    """The base model folder a NeMo-RL config names as policy.model_name."""
    return export_hf(bundle, tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="module")
def trained(bundle):
    model = copy.deepcopy(bundle.model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _inputs(processor):
    image = Image.fromarray(
        torch.randint(
            0, 256, (96, 128, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        ).numpy()
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _config_yaml(step_dir, model_name, **policy):
    step_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"policy": {"model_name": str(model_name), "tokenizer": {"name": str(model_name)}, **policy}}
    (step_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (step_dir / "training_info.json").write_text(json.dumps({"step": int(step_dir.name.split("_")[1])}))


def _megatron_step(root, step, model_name="Qwen/Qwen3-VL-2B-Thinking", iters=(0,), **policy):
    step_dir = root / f"step_{step}"
    _config_yaml(step_dir, model_name, **policy)
    weights = step_dir / "policy" / "weights"
    for it in iters:
        d = weights / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"x")
    (weights / "latest_checkpointed_iteration.txt").write_text(str(iters[-1]))
    return step_dir


def _weights_only(model, folder):
    """A Hugging Face folder holding weights and config only (what a converter writes)."""
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("generation_config.json",):
        (folder / name).unlink(missing_ok=True)
    return folder


# -- layout detection and step selection ----------------------------------------------------------


def test_newest_complete_step_is_chosen(tmp_path, caplog):
    root = tmp_path / "ckpts"
    _megatron_step(root, 10)
    _megatron_step(root, 20, iters=(0, 3))
    broken = root / "step_25"
    (broken / "policy" / "weights").mkdir(parents=True)  # no config.yaml: a foreign/unfinished save
    (root / "tmp_step_30" / "policy").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        ckpt = find_nemo_rl_checkpoint(root)
    assert (ckpt.step, ckpt.kind) == (20, "megatron")
    assert ckpt.weights == root / "step_20" / "policy" / "weights" / "iter_0000003"
    assert "step_25" in caplog.text
    assert find_nemo_rl_checkpoint(root, 10).step == 10
    assert find_nemo_rl_checkpoint(root / "step_10").step == 10
    assert detect_format(root) == "megatron"
    with pytest.raises(CheckpointLayoutError, match=r"no step_99; steps present: \[10, 20, 25\]"):
        find_nemo_rl_checkpoint(root, 99)
    with pytest.raises(CheckpointLayoutError, match=r"no config\.yaml"):
        find_nemo_rl_checkpoint(root, 25)
    with pytest.raises(CheckpointLayoutError, match=r"--step 20 given, but .* is step 10"):
        find_nemo_rl_checkpoint(root / "step_10", 20)
    with pytest.raises(CheckpointLayoutError, match="--format dtensor given"):
        find_nemo_rl_checkpoint(root, kind="dtensor")


def test_latest_iteration_follows_the_tracker_file(tmp_path):
    step_dir = _megatron_step(tmp_path, 5, iters=(0, 7))
    (step_dir / "policy" / "weights" / "latest_checkpointed_iteration.txt").write_text("0")
    assert find_nemo_rl_checkpoint(step_dir).weights.name == "iter_0000000"


def test_dtensor_layouts_and_other_formats_are_detected(tmp_path, base_dir):
    consolidated = tmp_path / "dt" / "step_3"
    _config_yaml(consolidated, base_dir)
    (consolidated / "policy" / "weights" / "model" / "consolidated").mkdir(parents=True)
    (consolidated / "policy" / "weights" / "model" / "consolidated" / "config.json").write_text("{}")
    assert find_nemo_rl_checkpoint(consolidated).kind == "dtensor_consolidated"
    dcp = tmp_path / "dcp" / "step_4"
    _config_yaml(dcp, base_dir)
    (dcp / "policy" / "weights" / "model").mkdir(parents=True)
    (dcp / "policy" / "weights" / "model" / ".metadata").write_bytes(b"")
    assert find_nemo_rl_checkpoint(dcp.parent).kind == "dtensor_dcp"
    assert detect_format(dcp.parent) == "dtensor"
    assert detect_format(base_dir) == "hf"
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "final.pt").write_bytes(b"")
    assert detect_format(run) == "local"
    sharded = tmp_path / "sharded" / "step_1"
    _config_yaml(sharded, base_dir)
    (sharded / "policy" / "weights" / "model").mkdir(parents=True)
    (sharded / "policy" / "weights" / "model" / "shard-00001-model-00001-of-00001.safetensors").write_bytes(
        b""
    )
    with pytest.raises(CheckpointLayoutError, match="save_consolidated=true"):
        find_nemo_rl_checkpoint(sharded)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointLayoutError, match="pass --format"):
        detect_format(tmp_path / "empty")
    (tmp_path / "pending" / "tmp_step_2").mkdir(parents=True)
    with pytest.raises(CheckpointLayoutError, match=r"only unfinished saves: \['tmp_step_2'\]"):
        find_nemo_rl_checkpoint(tmp_path / "pending")
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "missing")


# -- Megatron conversion ----------------------------------------------------------------------------


@pytest.mark.skipif(adapter.nemo_rl_available(), reason="NeMo-RL is installed here")
def test_megatron_export_without_nemo_rl_says_how_to_run_it(tmp_path, capsys):
    step_dir = _megatron_step(tmp_path / "ckpts", 10)
    out = tmp_path / "hf"
    with pytest.raises(adapter.NemoRLUnavailable) as err:
        export_nemo_rl_checkpoint(tmp_path / "ckpts", out)
    message = str(err.value)
    for needed in (
        "Megatron-Bridge",
        "nvcr.io/nvidia/nemo-rl:v0.7.0",
        "convert_megatron_to_hf.py",
        f"--config {step_dir / 'config.yaml'}",
        str(step_dir / "policy" / "weights" / "iter_0000000"),
        "axpo export --checkpoint HF_DIR",
    ):
        assert needed in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"]
    assert main(["export", "--checkpoint", str(tmp_path / "ckpts"), "--out", str(out)]) == 2
    assert "convert_megatron_to_hf.py" in capsys.readouterr().err


def test_megatron_export_calls_the_converter_and_completes_the_folder(
    tmp_path, monkeypatch, base_dir, trained, bundle
):
    root = tmp_path / "ckpts"
    _megatron_step(root, 10, model_name=base_dir, hf_overrides={"rope_scaling": None})
    calls = []

    def fake_export(**kwargs):  # Megatron-Bridge's part: writes weights and config.json
        calls.append(kwargs)
        _weights_only(trained, tmp_path / "x")
        shutil.copytree(tmp_path / "x", kwargs["output_path"])

    monkeypatch.setattr(adapter, "export_model_from_megatron", lambda: fake_export)
    out = export_any(root, tmp_path / "hf", source_format="auto")
    assert out.source_format == "megatron"
    (call,) = calls
    assert call["hf_model_name"] == str(base_dir) and call["strict"] is True
    assert call["input_path"] == str(root / "step_10" / "policy" / "weights" / "iter_0000000")
    assert call["hf_overrides"] == {"rope_scaling": None}
    assert {p.name for p in out.path.iterdir()} >= COMPLETE_FILES
    reloaded = AutoModelForImageTextToText.from_pretrained(out.path, local_files_only=True).eval()
    inputs = _inputs(bundle.processor)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(trained, inputs), atol=1e-5, rtol=0)


# -- DTensor consolidated: a real export ------------------------------------------------------------


def test_dtensor_consolidated_checkpoint_exports_complete(tmp_path, base_dir, trained, bundle):
    step_dir = tmp_path / "ckpts" / "step_7"
    _config_yaml(step_dir, base_dir)
    consolidated = step_dir / "policy" / "weights" / "model" / "consolidated"
    consolidated.parent.mkdir(parents=True)
    _weights_only(trained, consolidated)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(step_dir.parent), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= COMPLETE_FILES | {"model.safetensors"}
    reloaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    inputs = _inputs(bundle.processor)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(trained, inputs), atol=1e-5, rtol=0)
    processor = load_processor(out)
    assert processor.chat_template == load_chat_template()
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == load_chat_template()
    a, b = _inputs(processor), _inputs(bundle.processor)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    if importlib.util.find_spec("torchvision") is not None:
        assert isinstance(AutoProcessor.from_pretrained(out, local_files_only=True), Qwen3VLProcessor)


# -- completing a Hugging Face folder -------------------------------------------------------------


def test_hf_folder_without_processor_is_completed(tmp_path, base_dir, trained):
    src = _weights_only(trained, tmp_path / "converted")
    (src / "chat_template.jinja").write_text("{{ 'stale base template' }}")
    out = export_hf_folder(src, tmp_path / "hf", processor_from=base_dir)
    assert {p.name for p in out.iterdir()} >= COMPLETE_FILES
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == load_chat_template()
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == load_chat_template()
    assert (src / "chat_template.jinja").read_text() == "{{ 'stale base template' }}"  # source untouched


def test_processor_files_are_replaced_and_source_template_kept_on_request(tmp_path, bundle):
    folder = export_hf(bundle, tmp_path / "hf")
    for name in PROCESSOR_FILES:
        (folder / name).unlink(missing_ok=True)
    processor = copy.deepcopy(bundle.processor)
    custom = load_chat_template() + "{# custom #}"
    complete_hf_folder(folder, processor, chat_template=custom)
    assert {p.name for p in folder.iterdir()} >= COMPLETE_FILES
    assert load_processor(folder).chat_template == custom


def test_missing_processor_is_refused_with_a_hint(tmp_path, trained, base_dir):
    src = _weights_only(trained, tmp_path / "converted")
    with pytest.raises(ProcessorNotFoundError, match="--processor-from"):
        export_hf_folder(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(FileNotFoundError, match="chat template"):
        export_hf_folder(
            src, tmp_path / "hf2", processor_from=base_dir, chat_template=str(tmp_path / "x.jinja")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]

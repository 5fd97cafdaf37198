"""Export local policies and trainer checkpoints as complete Hugging Face Qwen3-VL folders.

The folder `export_hf` writes is what a downloaded Qwen3-VL checkpoint looks like:

* ``model.safetensors`` (or shards with an index), ``config.json``, ``generation_config.json``;
* tokenizer files (``tokenizer.json``, ``tokenizer_config.json``);
* ``processor_config.json`` (transformers 5: the processor with its nested image processor),
  plus the stand-alone ``preprocessor_config.json`` (image processor) and
  ``video_preprocessor_config.json`` that older transformers, vLLM and the torchvision-backed
  ``Qwen3VLProcessor`` read (the video processor is required there, and an image+text processor
  built without torchvision has none to save);
* the chat template as ``chat_template.jinja`` (what transformers 5 processors and tokenizers
  load) and as the legacy processor file ``chat_template.json``.

It loads with ``AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)`` and,
where torchvision exists, ``AutoProcessor.from_pretrained(out)``; without torchvision
`axpo_nemo.models.load_processor` / `load_qwen3vl` read it. Files are written into a temporary
folder next to ``out_dir`` and renamed into place, so a crash never leaves a half-written export.

`export_from_state_dict` exports weights held elsewhere (a trainer checkpoint) on top of a base
policy's architecture, processor and generation settings, without materialising a second model:
the model is built on the meta device and the state dict's tensors are assigned to it.
`export_checkpoint` is the same with a loader callable that reads the state dict from a
checkpoint folder.

`complete_hf_folder` is the last step of exports made by other tools (NeMo-RL's Megatron→HF
converter, a consolidated DTensor checkpoint, a quantized export): given a folder that holds
weights and ``config.json`` only, it (re)writes the processor, tokenizer, chat template and
generation config so the folder is the complete set above, and checks that it loads.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig, Qwen3VLProcessor

from axpo_nemo.models import PolicyBundle, load_processor, save_pretrained_bundle
from axpo_nemo.run.atomic import atomic_output_dir

__all__ = [
    "PROCESSOR_FILES",
    "complete_hf_folder",
    "export_checkpoint",
    "export_from_state_dict",
    "export_hf",
    "resolve_chat_template",
]

logger = logging.getLogger(__name__)

#: The video processor transformers pairs with Qwen3-VL (used only where torchvision exists).
_VIDEO_PROCESSOR_TYPE = "Qwen3VLVideoProcessor"
#: Prefixes wrappers add to parameter names (torch.compile, DDP), stripped from state dicts.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
#: The processor-side files of a Hugging Face Qwen3-VL folder: `complete_hf_folder` replaces them
#: all, so none of a converter's copies (e.g. the base model's chat template) survives.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _complete_processor_files(folder: Path, processor: Any) -> None:
    """Add the stand-alone processor files and the legacy chat template beside what
    `save_pretrained_bundle` wrote (never overwriting a file it wrote)."""
    proc_file = folder / "processor_config.json"
    nested = _read_json(proc_file) if proc_file.is_file() else {}
    processor_class = Qwen3VLProcessor.__name__
    image = nested.get("image_processor")
    if image is None:
        image = processor.image_processor.to_dict()
    image = {**image, "processor_class": processor_class}
    if not (folder / "preprocessor_config.json").is_file():
        _write_json(folder / "preprocessor_config.json", image)
    if "video_processor" not in nested and not (folder / "video_preprocessor_config.json").is_file():
        # The video processor's own defaults fill the rest (frame sampling, pixel budget).
        keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        video = {k: image[k] for k in keys if k in image}
        video.update(video_processor_type=_VIDEO_PROCESSOR_TYPE, processor_class=processor_class)
        _write_json(folder / "video_preprocessor_config.json", video)
    template = getattr(processor, "chat_template", None) or getattr(
        processor.tokenizer, "chat_template", None
    )
    if isinstance(template, str):
        if not (folder / "chat_template.jinja").is_file():
            (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
        if not (folder / "chat_template.json").is_file():
            _write_json(folder / "chat_template.json", {"chat_template": template})
    else:
        logger.warning("export: the processor has no single chat template; none written")


def _model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def export_hf(
    bundle: PolicyBundle,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``bundle`` as a complete Hugging Face folder (see the module docstring).

    Args:
        bundle: the policy (its model may be on any device).
        out_dir: the folder to create.
        dtype: cast floating-point weights to this dtype in the export (the in-memory model is
            left untouched); None keeps the model's dtype.
        overwrite: replace an existing ``out_dir`` (atomically); otherwise it is an error.

    Returns:
        The folder's path.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype is not None and dtype != _model_dtype(bundle.model):
        # A cast copy of the weights on a meta-device skeleton: the live model is never converted
        # (a round trip through a narrower dtype would lose precision).
        return export_from_state_dict(
            bundle.model.state_dict(), bundle, out_dir, dtype=dtype, overwrite=overwrite
        )
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_pretrained_bundle(bundle, tmp)
        _complete_processor_files(tmp, bundle.processor)
    return out_dir


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _base_parts(base: PolicyBundle | str | os.PathLike) -> tuple[Any, Any, GenerationConfig, type | None]:
    """(config, processor, generation config, model class or None for the auto class) of a base."""
    if isinstance(base, PolicyBundle):
        gen = base.model.generation_config or GenerationConfig.from_model_config(base.config)
        return base.config, base.processor, gen, type(base.model)
    path = Path(base).expanduser()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    return config, load_processor(path), gen, None


def export_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    base: PolicyBundle | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Export weights ``state_dict`` with the architecture, processor and generation settings of ``base``.

    Args:
        state_dict: the model's parameters by name, as ``model.state_dict()`` names them (a
            ``module.`` / ``_orig_mod.`` prefix on every key is stripped). Tied weights may be
            given once (``lm_head.weight`` may be absent when embeddings are tied); when both are
            given they must be equal.
        base: the base policy: a `PolicyBundle` (only its config, processor, generation config
            and model class are used) or a Hugging Face folder.
        out_dir: the folder to create.
        dtype: cast floating-point tensors to this dtype; None keeps the state dict's.
        overwrite: replace an existing ``out_dir``.

    Returns:
        The folder's path.

    Raises:
        ValueError: the state dict does not fit the base architecture (missing or unexpected
            keys, or tied weights that differ).
    """
    config, processor, gen, model_cls = _base_parts(base)
    config = copy.deepcopy(config)
    tensors = _strip_wrapper_prefix(state_dict)
    if dtype is not None:
        cast: dict[tuple, torch.Tensor] = {}  # tied entries share storage: cast them once
        for k, v in tensors.items():
            if v.is_floating_point():
                key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride()))
                if key not in cast:
                    cast[key] = v.to(dtype)
                tensors[k] = cast[key]
    with torch.device("meta"):
        model = (
            model_cls(config) if model_cls is not None else AutoModelForImageTextToText.from_config(config)
        )
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(
            f"export: {len(unexpected)} state-dict keys are not in the base architecture "
            f"({type(model).__name__}), e.g. {unexpected[:3]}"
        )
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name, p in params.items() if p.is_meta]
    missing += [
        name for name, b in model.named_buffers(remove_duplicate=False) if b.is_meta and name in expected
    ]
    if missing:
        raise ValueError(f"export: the state dict lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    for name, value in tensors.items():
        param = params.get(name)
        # A tensor not adopted by its parameter was replaced by tie_weights: it must be a copy.
        if (
            param is not None
            and param.data_ptr() != value.data_ptr()
            and not torch.equal(param.cpu(), value.cpu())
        ):
            raise ValueError(f"export: {name!r} is tied to another weight but holds different values")
    if dtype is not None:
        config.dtype = dtype
    model.generation_config = copy.deepcopy(gen)
    bundle = PolicyBundle(
        model=model, processor=processor, tokenizer=processor.tokenizer, config=model.config
    )
    return export_hf(bundle, out_dir, overwrite=overwrite)


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    load_state_dict: Callable[[Path], Mapping[str, torch.Tensor]],
    base: PolicyBundle | str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a local trainer checkpoint as a Hugging Face folder.

    Args:
        checkpoint_dir: the checkpoint folder.
        out_dir: the folder to create.
        load_state_dict: reads the policy's state dict from ``checkpoint_dir`` (the checkpoint
            format's own loader, e.g. one of the trainer's ``CheckpointManager``).
        base: the policy the run started from (a `PolicyBundle` or a Hugging Face folder): it
            supplies the architecture config, processor, chat template and generation settings.
        dtype: cast floating-point weights to this dtype; None keeps the checkpoint's.
        overwrite: replace an existing ``out_dir``.

    Returns:
        The folder's path.
    """
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"export: checkpoint folder {checkpoint_dir} does not exist")
    state_dict = load_state_dict(checkpoint_dir)
    return export_from_state_dict(state_dict, base, out_dir, dtype=dtype, overwrite=overwrite)


def resolve_chat_template(choice: str | os.PathLike | None, processor: Any = None) -> str | None:
    """The chat template an export gets.

    Args:
        choice: ``"axpo"`` (or None): the project's template, which the policy was trained with;
            ``"source"``: the processor's own template (None when it has none); anything else is
            a path to a Jinja template file.
        processor: the processor whose template ``"source"`` refers to.

    Raises:
        FileNotFoundError: ``choice`` is a path that does not exist.
    """
    if choice is None or choice == "axpo":
        from axpo_nemo.models import load_chat_template

        return load_chat_template()
    if choice == "source":
        template = getattr(processor, "chat_template", None) if processor is not None else None
        return template if isinstance(template, str) else None
    path = Path(choice).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"export: chat template {path} does not exist (use 'axpo', 'source' or a .jinja file)"
        )
    return path.read_text(encoding="utf-8")


def _mark_stock_processor_class(folder: Path) -> None:
    """Name the stock ``Qwen3VLProcessor`` in the saved configs (as `save_pretrained_bundle` does),
    so AutoProcessor builds the full processor where torchvision exists."""
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = folder / name
        if file.is_file():
            data = _read_json(file)
            if "processor_class" in data:
                data["processor_class"] = Qwen3VLProcessor.__name__
                _write_json(file, data)


def complete_hf_folder(
    folder: str | os.PathLike,
    processor: Any,
    *,
    chat_template: str | None = None,
    generation_config: GenerationConfig | None = None,
) -> Path:
    """Make a folder holding weights and ``config.json`` a complete Hugging Face Qwen3-VL folder.

    Every file of `PROCESSOR_FILES` already there is removed, then ``processor`` (tokenizer and
    image processor) is saved with ``chat_template`` as its and its tokenizer's template, the
    stand-alone processor files and both chat-template forms are added, and
    ``generation_config.json`` is written when missing. Weights and ``config.json`` are left as
    they are. Finally the folder is checked: its config, processor and chat template load back.

    Args:
        folder: the folder (must hold ``config.json``).
        processor: the Qwen3-VL processor to save (its ``chat_template`` is replaced when
            ``chat_template`` is given).
        chat_template: the template text; None keeps the processor's.
        generation_config: written when the folder has no ``generation_config.json``; None derives
            one from ``config.json``.

    Returns:
        The folder's path.

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
        ValueError: the completed folder does not load back, or has no chat template.
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"export: {folder} has no config.json (not a Hugging Face model folder)")
    if chat_template is not None:
        processor.chat_template = chat_template
        processor.tokenizer.chat_template = chat_template
    for name in PROCESSOR_FILES:
        (folder / name).unlink(missing_ok=True)
    processor.save_pretrained(folder)
    _mark_stock_processor_class(folder)
    _complete_processor_files(folder, processor)
    if not (folder / "generation_config.json").is_file():
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        (generation_config or GenerationConfig.from_model_config(config)).save_pretrained(folder)
    try:
        AutoConfig.from_pretrained(folder, local_files_only=True)
        reloaded = load_processor(folder)
    except Exception as exc:
        raise ValueError(f"export: the completed folder {folder} does not load back: {exc}") from exc
    if not isinstance(getattr(reloaded, "chat_template", None), str):
        raise ValueError(f"export: the completed folder {folder} has no chat template")
    return folder

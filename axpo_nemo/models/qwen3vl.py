"""Qwen3-VL policies: a tiny randomly initialised model built offline, and local checkpoint loading.

Both paths return the same :class:`PolicyBundle` (model, processor, tokenizer, config), so code
written and tested against :func:`build_tiny_qwen3vl` runs unchanged on a real checkpoint loaded
with :func:`load_qwen3vl` (e.g. a downloaded ``Qwen/Qwen3-VL-2B-Thinking`` folder).

Nothing here touches the network: every ``from_pretrained`` call uses ``local_files_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from axpo_nemo.models.tokenizer import build_tiny_tokenizer, load_chat_template, special_token_ids

__all__ = [
    "PolicyBundle",
    "Qwen3VLImageTextProcessor",
    "TinyQwen3VL",
    "build_tiny_processor",
    "build_tiny_qwen3vl",
    "load_processor",
    "load_qwen3vl",
    "save_pretrained_bundle",
    "tiny_qwen3vl_config",
]

logger = logging.getLogger(__name__)

#: Qwen3-VL normalises pixels with mean 0.5 / std 0.5 (not the CLIP statistics of Qwen2-VL).
_QWEN3VL_IMAGE_MEAN = (0.5, 0.5, 0.5)
_QWEN3VL_IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass
class PolicyBundle:
    """A Qwen3-VL policy and everything needed to feed it.

    Attributes:
        model: a ``Qwen3VLForConditionalGeneration`` (in eval mode).
        processor: a ``Qwen3VLProcessor`` (possibly :class:`Qwen3VLImageTextProcessor`): turns text
            with ``<|image_pad|>`` placeholders plus PIL images into ``input_ids``,
            ``attention_mask``, ``mm_token_type_ids``, ``pixel_values`` and ``image_grid_thw``.
        tokenizer: the processor's tokenizer (same object as ``processor.tokenizer``).
        config: the model config (same object as ``model.config``).
    """

    model: PreTrainedModel
    processor: Qwen3VLProcessor
    tokenizer: Any
    config: PretrainedConfig


#: The tiny model comes in the same bundle as a real checkpoint.
TinyQwen3VL = PolicyBundle


class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """A ``Qwen3VLProcessor`` for images and text only, usable without torchvision.

    transformers 5.x builds Qwen3-VL's video processor on torchvision, and ``ProcessorMixin``
    rejects ``video_processor=None``. ``ProcessorMixin`` derives its sub-processors from the
    ``__init__`` signature, so dropping ``video_processor`` from it leaves exactly
    ``image_processor`` and ``tokenizer``; everything else (placeholder expansion, chat
    template, ``mm_token_type_ids``, saving and ``from_pretrained``) is inherited unchanged.
    Passing ``videos`` raises a ``ValueError``.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """Process text and images like ``Qwen3VLProcessor``; videos are not supported."""
        if videos is not None:
            raise ValueError(f"{type(self).__name__} has no video processor (it needs torchvision)")
        return super().__call__(images=images, text=text, **kwargs)


def _mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim // 2`` rotary frequencies over (t, h, w) in Qwen3-VL's 24:20:20 ratio."""
    half = head_dim // 2
    hw = round(half * 20 / 64)
    return [half - 2 * hw, hw, hw]


def tiny_qwen3vl_config(vocab_size: int, *, tokenizer=None, **overrides: Any) -> Qwen3VLConfig:
    """Return a tiny but architecturally complete ``Qwen3VLConfig`` (about 0.8M parameters).

    Text: 2 layers, hidden 128, 4 query / 2 KV heads, head_dim 32, MLP 256, interleaved M-RoPE
    (``mrope_section`` sums to head_dim / 2, as ``[24, 20, 20]`` does for 128). Vision: depth 2,
    hidden 64, patch 16, spatial merge 2, temporal patch 2, deepstack from block 0, output
    projected to the text hidden size. Embeddings are tied (``tie_word_embeddings=True``) like
    Qwen3-VL-2B/4B, the checkpoints this project targets.

    Args:
        vocab_size: size of the embedding / LM head (``len(tokenizer)`` for the tiny tokenizer).
        tokenizer: tokenizer the control-token ids are read from (by text); defaults to
            :func:`~axpo_nemo.models.tokenizer.build_tiny_tokenizer`.
        **overrides: top-level ``Qwen3VLConfig`` fields (e.g. ``tie_word_embeddings=False``);
            ``text_config=`` / ``vision_config=`` dicts are merged into the tiny defaults
            (``text_config`` may set ``rope_theta``, the rotary base; default Qwen3-VL's 5e6).
            ``mrope_section`` and the vision ``out_hidden_size`` follow ``head_dim`` and the text
            ``hidden_size`` unless given explicitly.
    """
    ids = special_token_ids(tokenizer if tokenizer is not None else build_tiny_tokenizer())
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **overrides.pop("text_config", {}),
    }
    rope_theta = float(text.pop("rope_theta", 5_000_000.0))
    text.setdefault(
        "rope_parameters",
        {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": _mrope_section(text["head_dim"]),
            "mrope_interleaved": True,
        },
    )
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
        **overrides.pop("vision_config", {}),
    }
    top = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
        **overrides,
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top)


def build_tiny_processor(
    tokenizer,
    *,
    min_pixels: int = 64 * 64,
    max_pixels: int = 128 * 128,
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    chat_template: str | None = None,
) -> Qwen3VLImageTextProcessor:
    """Assemble a Qwen3-VL processor (PIL image processor + ``tokenizer``) without torchvision.

    Images are resized to multiples of ``patch_size * merge_size`` with an area in
    ``[min_pixels, max_pixels]``; with the defaults every image gives between 4 and 16 image
    tokens (a 448x448 image becomes 128x128 pixels, an 8x8 patch grid, 16 tokens).

    Args:
        tokenizer: the text tokenizer (e.g. from :func:`build_tiny_tokenizer`).
        min_pixels, max_pixels: bounds on the resized image area.
        patch_size, merge_size, temporal_patch_size: must match the vision config.
        chat_template: template text; defaults to the tokenizer's, else the project's template.
            The tokenizer gets it too, so ``tokenizer.apply_chat_template`` renders the same.
    """
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        image_mean=list(_QWEN3VL_IMAGE_MEAN),
        image_std=list(_QWEN3VL_IMAGE_STD),
    )
    template = chat_template or getattr(tokenizer, "chat_template", None) or load_chat_template()
    tokenizer.chat_template = template
    return Qwen3VLImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )


def _set_generation_defaults(model: PreTrainedModel, tokenizer) -> None:
    """Stop on ``<|im_end|>`` or ``<|endoftext|>`` and pad with ``<|endoftext|>``, like Qwen3-VL."""
    ids = special_token_ids(tokenizer)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]


def build_tiny_qwen3vl(
    seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides: Any
) -> PolicyBundle:
    """Build a tiny, randomly initialised Qwen3-VL policy with its tokenizer and processor, offline.

    The model is a real ``transformers.Qwen3VLForConditionalGeneration`` (see
    :func:`tiny_qwen3vl_config`), so it takes ``pixel_values`` / ``image_grid_thw`` from the
    processor and supports ``generate``. Weights depend only on ``seed`` (and the config): the
    same seed gives bit-identical weights, and the global torch RNG state is left untouched.

    Args:
        seed: seed for the weight initialisation.
        dtype: parameter dtype.
        **config_overrides: forwarded to :func:`tiny_qwen3vl_config`.
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_qwen3vl_config(len(tokenizer), tokenizer=tokenizer, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.to(dtype=dtype).eval()
    _set_generation_defaults(model, tokenizer)
    processor = build_tiny_processor(tokenizer)
    return PolicyBundle(model=model, processor=processor, tokenizer=tokenizer, config=model.config)


def load_processor(path: Path) -> Qwen3VLProcessor:
    """Load the checkpoint's processor, falling back to the image+text one when video support fails."""
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:  # typically: no torchvision, so the video processor cannot be built
        reason: Exception | str = err
    else:
        if (
            isinstance(processor, Qwen3VLProcessor)
            and getattr(processor, "image_processor", None) is not None
        ):
            return processor
        reason = f"AutoProcessor returned a {type(processor).__name__}"
    logger.info("Loading an image+text Qwen3-VL processor from %s (%s)", path, reason)
    try:
        return Qwen3VLImageTextProcessor.from_pretrained(path, local_files_only=True)
    except Exception as fallback_err:
        raise fallback_err from (reason if isinstance(reason, Exception) else None)


def load_qwen3vl(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    chat_template: str | None = None,
) -> PolicyBundle:
    """Load a Qwen3-VL checkpoint from a local directory into a :class:`PolicyBundle`.

    Works for real checkpoints (e.g. a downloaded ``Qwen/Qwen3-VL-2B-Thinking`` folder) and for
    folders written by :func:`save_pretrained_bundle`. Never touches the network. When the
    processor cannot be built as saved (transformers needs torchvision for Qwen3-VL's video
    processor), an image+text :class:`Qwen3VLImageTextProcessor` is assembled from the
    folder's image processor, tokenizer and chat template instead.

    Args:
        path: checkpoint directory containing ``config.json``, weights and processor files.
        dtype: parameter dtype; ``None`` keeps the dtype recorded in the checkpoint.
        device: device to move the model to; ``None`` leaves it on the CPU.
        chat_template: replace the checkpoint's chat template (processor and tokenizer), e.g.
            with :func:`~axpo_nemo.models.tokenizer.load_chat_template` to get this project's
            verbatim-history template on a real checkpoint.

    Raises:
        FileNotFoundError: if ``path`` is not a directory or has no ``config.json``.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Qwen3-VL checkpoint directory does not exist: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in checkpoint directory {path} (is it a Hugging Face model folder?)"
        )
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, dtype=dtype if dtype is not None else "auto"
    )
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = processor.tokenizer
    if chat_template is not None:
        processor.chat_template = chat_template
    if chat_template is not None or getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = processor.chat_template
    return PolicyBundle(model=model, processor=processor, tokenizer=tokenizer, config=model.config)


def save_pretrained_bundle(bundle: PolicyBundle, path: str | os.PathLike) -> Path:
    """Write a bundle as a Hugging Face folder that :func:`load_qwen3vl` reads back exactly.

    Writes the model weights (safetensors), ``config.json``, ``generation_config.json``, the
    tokenizer files, the image processor config, the processor config and the chat template.
    Returns the directory path.
    """
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path, safe_serialization=True)
    bundle.processor.save_pretrained(path)
    # Record the stock class so the folder looks like a real checkpoint to AutoProcessor
    # (which then builds the full processor where torchvision exists).
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            if "processor_class" in data:
                data["processor_class"] = Qwen3VLProcessor.__name__
                file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path

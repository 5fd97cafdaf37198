"""Qwen3-VL policies for axpo_nemo: a tiny offline model for tests, and real local checkpoints.

Both builders return a :class:`PolicyBundle` (``model``, ``processor``, ``tokenizer``, ``config``)::

    import torch
    from PIL import Image
    from axpo_nemo.models import build_tiny_qwen3vl, load_qwen3vl, save_pretrained_bundle

    bundle = build_tiny_qwen3vl(seed=0)                 # or: load_qwen3vl("/models/Qwen3-VL-2B-Thinking")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = bundle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = bundle.processor(text=[prompt], images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    with torch.no_grad():
        logits = bundle.model(**inputs).logits          # [1, seq, vocab]
    new_tokens = bundle.model.generate(**inputs, max_new_tokens=8)
    save_pretrained_bundle(bundle, "/tmp/tiny-qwen3vl")  # load_qwen3vl("/tmp/tiny-qwen3vl") round-trips

The chat template (``chat_template.jinja``) renders the Qwen3-VL-Thinking format, keeps assistant
content verbatim and ends the generation prompt with ``<|im_start|>assistant\\n<think>\\n``.
"""

from axpo_nemo.models.factory import build_policy, resolve_device, resolve_dtype
from axpo_nemo.models.qwen3vl import (
    PolicyBundle,
    Qwen3VLImageTextProcessor,
    TinyQwen3VL,
    build_tiny_processor,
    build_tiny_qwen3vl,
    load_processor,
    load_qwen3vl,
    save_pretrained_bundle,
    tiny_qwen3vl_config,
)
from axpo_nemo.models.tokenizer import (
    ADDED_TEXT_TOKENS,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    load_chat_template,
    special_token_ids,
)

__all__ = [
    "ADDED_TEXT_TOKENS",
    "SPECIAL_TOKENS",
    "PolicyBundle",
    "Qwen3VLImageTextProcessor",
    "TinyQwen3VL",
    "build_policy",
    "build_tiny_processor",
    "build_tiny_qwen3vl",
    "build_tiny_tokenizer",
    "load_chat_template",
    "load_processor",
    "load_qwen3vl",
    "resolve_device",
    "resolve_dtype",
    "save_pretrained_bundle",
    "special_token_ids",
    "tiny_qwen3vl_config",
]

"""Build the policy a config names: the tiny offline Qwen3-VL or a local checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from axpo_nemo.models.qwen3vl import PolicyBundle, build_tiny_qwen3vl, load_qwen3vl

if TYPE_CHECKING:  # the config schema imports this package; at run time only attributes are read
    from axpo_nemo.config.schema import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU; other names pass through."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is '{name}' but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU; other names map to torch dtypes."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def build_policy(cfg: ModelConfig, seed: int = 0) -> PolicyBundle:
    """The policy of ``cfg``: ``name: tiny`` builds it offline from ``cfg.tiny``; any other name
    is a local Hugging Face Qwen3-VL folder. Placed on ``cfg.device`` in ``cfg.dtype``."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == "tiny":
        t = cfg.tiny
        bundle = build_tiny_qwen3vl(
            seed=seed,
            dtype=dtype,
            text_config={
                "num_hidden_layers": t.num_layers,
                "hidden_size": t.hidden_size,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "head_dim": t.head_dim,
                "intermediate_size": t.intermediate_size,
                "rope_theta": t.rope_theta,
            },
            vision_config={
                "depth": t.vision_depth,
                "hidden_size": t.vision_hidden_size,
                "num_heads": t.vision_num_heads,
                "intermediate_size": 2 * t.vision_hidden_size,
            },
        )
        bundle.model.to(device)
        return bundle
    return load_qwen3vl(cfg.name, dtype=dtype, device=device)

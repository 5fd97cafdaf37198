"""Grouped-query attention without copied KV heads, for the local backend's no-grad passes on CPU.

transformers' ``sdpa`` attention (``integrations/sdpa_attention.py``, 5.x) repeats each key/value
head once per query head of its group (``repeat_kv``) before calling
``torch.nn.functional.scaled_dot_product_attention`` whenever a mask is given, which is every
padded prefill here. Its ``enable_gqa=True`` path is taken only without a mask (CUDA, NPU) or on
XPU/MPS; one-token queries pack the heads instead (``pack_gqa``). On CPU, SDPA with
``enable_gqa=True`` and a mask computes the same output without the copies (the flash kernel reads
query head ``h`` against key/value head ``h // groups``): bit for bit the same forward, and about a
third less time at the shape of an observation prefill (16 rows x 94 new tokens over ~1,000 cached).

Its backward is not the same bit for bit (the key/value gradients sum the group's heads in another
order), so `grouped_sdpa_attention` changes only calls with gradients off (rollouts and the
old-policy logprobs) on CPU; everything else (training, CUDA, where SDPA with a mask and
``enable_gqa`` falls back to the math kernel, masks built with a position bias) goes to
transformers' own function unchanged. `use_grouped_attention` puts it on a model's text decoder.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["GROUPED_SDPA", "grouped_sdpa_attention", "use_grouped_attention"]

#: The name `grouped_sdpa_attention` is registered under in transformers' ``AttentionInterface``.
GROUPED_SDPA = "axpo_grouped_sdpa"


def _takes_grouped_path(module, query: torch.Tensor, attention_mask, kwargs: dict) -> bool:
    return (
        not torch.is_grad_enabled()
        and query.device.type == "cpu"
        and getattr(module, "num_key_value_groups", 1) > 1
        and query.shape[2] > 1
        and attention_mask is not None
        and kwargs.get("position_bias") is None
    )


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with ``enable_gqa=True`` for masked no-grad CPU calls.

    Same arguments and return value as ``sdpa_attention_forward`` (query ``[B, H, L, D]``, key and
    value ``[B, H_kv, S, D]``, output ``[B, L, H, D]``); see the module docstring for when it
    differs from it (never in its result).
    """
    if not _takes_grouped_path(module, query, attention_mask, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # With a mask, transformers' own function passes is_causal=False: the mask holds causality.
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
# The decoder builds its mask for the attention function by name; without an entry it would pass
# the raw [B, S] padding mask on. This function takes the masks transformers builds for sdpa.
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def use_grouped_attention(model, enabled: bool = True) -> None:
    """Make a Qwen3-VL's text decoder attend with `grouped_sdpa_attention` (``enabled``) or with
    transformers' ``sdpa`` again (not ``enabled``).

    Only a decoder on ``sdpa`` or on this function is switched: a model set to ``eager`` or a flash
    kernel keeps it. The vision tower is left as it is (it has no grouped heads).
    """
    text = model.config.get_text_config()
    if text._attn_implementation not in ("sdpa", GROUPED_SDPA):
        return
    model.set_attn_implementation({"text_config": GROUPED_SDPA if enabled else "sdpa"})

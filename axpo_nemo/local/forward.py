"""Qwen3-VL's decoder forward with image features placed by slot, not by token id.

The stock ``Qwen3VLModel.forward`` treats every ``<|image_pad|>`` id as an image position, so a
sequence in which the policy *sampled* that token cannot be encoded. Generation and training both
go through `encode`, which takes the image positions from the trajectory's image slots.
"""

from __future__ import annotations

import inspect

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

#: The name transformers gives the KV cache, as a forward keyword and as an output field:
#: ``cache`` in the releases that deprecate ``past_key_values`` (removed in 5.40), else the old name.
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen3VLTextModel.forward).parameters else "past_key_values"


def kv_cache(output):
    """The KV cache a transformers forward returned (whatever this transformers release calls it)."""
    return getattr(output, CACHE_ARG)


def encode(model, inputs: dict[str, torch.Tensor], past_key_values=None):
    """Qwen3-VL's decoder over ``batch_inputs``, image features placed by ``visual_mask`` only.

    This is ``Qwen3VLModel.forward`` with the placeholder lookup replaced by the slots' own mask:
    the stock forward treats every ``<|image_pad|>`` id as an image position and fails when the
    model sampled one. Works for any padding (``inputs`` needs ``input_ids``, ``attention_mask``,
    ``position_ids`` ``[4, B, L]``, ``visual_mask`` and, with images, ``pixel_values`` /
    ``image_grid_thw`` in ``visual_mask`` order, or distinct images only and ``image_index``: for
    each image of ``visual_mask`` in order, the position of its pixels). Returns the decoder output
    (``last_hidden_state``, and the KV cache: read it with `kv_cache`).
    """
    dev = next(model.parameters()).device
    core = model.model
    ids = inputs["input_ids"].to(dev)
    embeds = core.get_input_embeddings()(ids)
    extra = {}
    if "pixel_values" in inputs:
        feats = core.get_image_features(
            inputs["pixel_values"].to(dev), inputs["image_grid_thw"].to(dev), return_dict=True
        )
        order = inputs["image_index"].tolist() if "image_index" in inputs else range(len(inputs["image_grid_thw"]))
        visual = inputs["visual_mask"].to(dev)
        image_embeds = torch.cat([feats.pooler_output[i] for i in order]).to(embeds.dtype)
        embeds = embeds.masked_scatter(visual[..., None].expand_as(embeds), image_embeds)
        extra = {
            "visual_pos_masks": visual,
            "deepstack_visual_embeds": [torch.cat([f[i] for i in order]) for f in feats.deepstack_features],
        }
    return core.language_model(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"].to(dev),
        position_ids=inputs["position_ids"].to(dev),
        use_cache=past_key_values is not None,
        **{CACHE_ARG: past_key_values},
        **extra,
    )

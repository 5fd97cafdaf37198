"""Tests for `local.attention`: grouped-query SDPA for the local backend's no-grad CPU passes.

It must take its own path (``enable_gqa=True``, no copied KV heads) exactly for masked multi-token
queries with gradients off, give transformers' ``sdpa`` result there, and leave every other call
(training, one-token decode steps, unmasked calls) to transformers' own function. Rollouts with it
equal rollouts without it: `test_local_generator.py`'s float64 identity test compares against a
generator on transformers' ``sdpa``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from axpo_nemo.local import attention as attention_module
from axpo_nemo.local.attention import GROUPED_SDPA, grouped_sdpa_attention, use_grouped_attention
from axpo_nemo.models import build_tiny_qwen3vl

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


def _inputs(groups: int, q_len: int, kv_len: int, dtype=torch.float32, seed: int = 0):
    """Query/key/value of 2 KV heads, and a left-padded causal mask (row 0 has 3 pads)."""
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads, dim = 3, 2, 16
    q = torch.randn(batch, kv_heads * groups, q_len, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=dtype)
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None].repeat(batch, 1, 1, 1)
    mask[0, :, :, :3] = False
    return q, k, v, mask


class _Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("q_len", "kv_len"), [(7, 7), (5, 40)], ids=["prefill", "after-cache"])
def test_a_masked_no_grad_prefill_attends_grouped_and_equals_transformers_sdpa(sdpa_calls, dtype, q_len, kv_len):
    q, k, v, mask = _inputs(groups=2, q_len=q_len, kv_len=kv_len, dtype=dtype)
    layer = _Layer(groups=2)
    with torch.no_grad():
        ref, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.25)
        del sdpa_calls[:]
        out, weights = grouped_sdpa_attention(layer, q, k, v, mask, scaling=0.25)
    assert [c.get("enable_gqa") for c in sdpa_calls] == [True]  # its own path, keys not repeated
    assert weights is None and out.shape == ref.shape == (3, q_len, 4, 16) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("case", ["gradients on", "one-token query", "no mask", "no groups"])
def test_other_calls_go_to_transformers_sdpa_unchanged(monkeypatch, case):
    q, k, v, mask = _inputs(groups=1 if case == "no groups" else 2, q_len=1 if case == "one-token query" else 6, kv_len=6)
    if case == "no mask":
        mask = None
    if case == "gradients on":
        q.requires_grad_(True)
    delegated = []

    def stock(*args, **kwargs):
        delegated.append(True)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(attention_module, "sdpa_attention_forward", stock)
    layer = _Layer(groups=q.shape[1] // k.shape[1])
    with torch.set_grad_enabled(case == "gradients on"):
        out, _ = grouped_sdpa_attention(layer, q, k, v, mask)
        ref, _ = sdpa_attention_forward(layer, q, k, v, mask)
    assert delegated == [True]
    assert torch.equal(out, ref)


def test_use_grouped_attention_switches_only_a_text_decoder_on_sdpa(bundle):
    config = bundle.model.config
    use_grouped_attention(bundle.model)
    assert config.text_config._attn_implementation == GROUPED_SDPA
    assert bundle.model.model.language_model.layers[0].self_attn.config._attn_implementation == GROUPED_SDPA
    assert config.vision_config._attn_implementation == "sdpa"  # the vision tower has no grouped heads
    assert "axpo" not in config.to_json_string()  # a saved checkpoint does not name it
    use_grouped_attention(bundle.model, enabled=False)
    assert config.text_config._attn_implementation == "sdpa"
    bundle.model.set_attn_implementation({"text_config": "eager"})
    use_grouped_attention(bundle.model)  # a decoder set to eager keeps it
    assert config.text_config._attn_implementation == "eager"
    bundle.model.set_attn_implementation({"text_config": "sdpa"})


def test_a_padded_no_grad_forward_of_the_model_is_the_same_with_it(bundle):
    # The decoder builds its attention masks by the function's name: with the wrong mask the
    # logits would differ by far more than rounding.
    model = bundle.model
    ids = torch.randint(10, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    try:
        with torch.no_grad():
            use_grouped_attention(model, enabled=False)
            ref = model(input_ids=ids, attention_mask=mask).logits
            use_grouped_attention(model)
            out = model(input_ids=ids, attention_mask=mask).logits
    finally:
        use_grouped_attention(model, enabled=False)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=0, atol=1e-5)

"""`AXPOLossFn` against NeMo-RL v0.7.0 itself (runs where ``nemo_rl`` imports; skipped elsewhere)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

pytestmark = pytest.mark.nemo_rl
nemo_rl = pytest.importorskip("nemo_rl")

from core_helpers import PREFIX_LEN, batch, originals, scenario  # noqa: E402
from nemo_rl.algorithms.loss import (  # noqa: E402
    ClippedPGLossConfig,
    ClippedPGLossFn,
    prepare_loss_input,
    wrap_loss_fn_with_input_preparation,
)
from nemo_rl.algorithms.loss.interfaces import LossInputType, LossType  # noqa: E402
from nemo_rl.data.multimodal_utils import PackedTensor  # noqa: E402
from nemo_rl.distributed.batched_data_dict import BatchedDataDict  # noqa: E402

from axpo_nemo import core  # noqa: E402
from axpo_nemo.nemo.loss import AXPO_METRIC_NAMES, AXPOLossFn  # noqa: E402
from axpo_nemo.nemo.train_data import build_train_data, to_batched_data_dict  # noqa: E402

PAD = 0
VOCAB = 1100

#: ClippedPGLossConfig written out by hand for each LossConfig case (the mapping under test).
CASES = [
    (
        core.LossConfig(),
        {"ratio_clip_min": 0.2, "ratio_clip_max": 0.28, "reference_policy_kl_penalty": 0.01},
    ),
    (
        core.LossConfig(dual_clip=3.0, kl_type="k1", kl_coef=0.05, kl_output_clamp=None),
        {
            "ratio_clip_min": 0.2,
            "ratio_clip_max": 0.28,
            "ratio_clip_c": 3.0,
            "reference_policy_kl_penalty": 0.05,
            "reference_policy_kl_type": "k1",
            "kl_output_clamp_value": None,
        },
    ),
    (
        core.LossConfig(clip_low=0.1, clip_high=0.4, kl_coef=0.0),
        {"ratio_clip_min": 0.1, "ratio_clip_max": 0.4, "reference_policy_kl_penalty": 0.0},
    ),
    (
        core.LossConfig(kl_type="k2", kl_input_clamp=0.5, kl_coef=0.2),
        {
            "ratio_clip_min": 0.2,
            "ratio_clip_max": 0.28,
            "reference_policy_kl_penalty": 0.2,
            "reference_policy_kl_type": "k2",
            "kl_input_clamp_value": 0.5,
        },
    ),
]


def with_logprobs(data: BatchedDataDict, seed: int = 0) -> tuple[BatchedDataDict, torch.Tensor]:
    """Add old/reference logprobs ([R', S'], position 0 = 0 like NeMo-RL's get_logprobs) and return
    a leaf ``next_token_logprobs`` [R', S'-1] spread well beyond the clip range."""
    gen = torch.Generator().manual_seed(seed)
    shape = data["input_ids"].shape
    base = -torch.rand(shape, generator=gen) * 3
    base[:, 0] = 0
    data["prev_logprobs"] = base
    data["reference_policy_logprobs"] = base + 0.3 * torch.randn(shape, generator=gen)
    data["reference_policy_logprobs"][:, 0] = 0
    current = (base[:, 1:] + 0.4 * torch.randn(shape[0], shape[1] - 1, generator=gen)).requires_grad_(True)
    return data, current


def grpo_data(gbs: int = 8) -> BatchedDataDict:
    """Plain GRPO (no resampling): the scenario's 8 originals with their group advantages."""
    b = batch(originals())
    adv = core.assemble_advantages(b)
    train = build_train_data(
        b,
        adv.advantages,
        adv.loss_mask,
        [[] for _ in range(b.num_rows)],
        global_batch_size=gbs,
        pad_token_id=PAD,
    )
    return to_batched_data_dict(train)


def axpo_data(gbs: int = 16, row_mask: torch.Tensor | None = None):
    """The AXPO scenario: 8 originals + 4 continuations (rows 8-11 from sources 0 and 1)."""
    b, plan, axpo = scenario()
    adv = core.assemble_advantages(b, plan, axpo, row_mask=row_mask)
    train = build_train_data(
        b,
        adv.advantages,
        adv.loss_mask,
        [[] for _ in range(b.num_rows)],
        global_batch_size=gbs,
        pad_token_id=PAD,
    )
    return to_batched_data_dict(train), adv


def global_counts(data) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo-RL's normalisers (megatron/data.py): Σ sample_mask and Σ token_mask[:, 1:]·sample_mask."""
    seqs = data["sample_mask"].sum()
    toks = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).sum()
    return seqs, toks


def run(loss_fn, data, current, micro_batch: int | None = None):
    """Loss (summed over micro-batches), grad of ``current``, and metrics summed like NeMo-RL does."""
    seqs, toks = global_counts(data)
    current.grad = None
    size = micro_batch or data.size
    total, metrics = torch.zeros(()), {}
    for start in range(0, data.size, size):
        end = min(start + size, data.size)
        loss, m = loss_fn(current[start:end], data.slice(start, end), seqs, toks)
        total = total + loss
        for key, value in m.items():
            metrics.setdefault(key, []).append(value)
    total.backward()
    summed = {k: float(sum(v)) for k, v in metrics.items() if "_min" not in k and "_max" not in k}
    return total.detach(), current.grad.clone(), summed


@pytest.mark.parametrize(("cfg", "pg_fields"), CASES)
@pytest.mark.parametrize("micro_batch", [None, 2])
def test_equals_clipped_pg_loss_fn_when_resampling_is_off(cfg, pg_fields, micro_batch):
    data, current = with_logprobs(grpo_data())
    ours, ours_grad, ours_metrics = run(AXPOLossFn(cfg), data, current, micro_batch)
    theirs, theirs_grad, theirs_metrics = run(
        ClippedPGLossFn(ClippedPGLossConfig(**pg_fields)), data, current, micro_batch
    )
    assert ours.item() != 0 and ours_grad.abs().sum() > 0
    # Exact on any CPU: AXPOLossFn runs ClippedPGLossFn's own ops on the same tensors and shapes.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=0)
    for key, value in theirs_metrics.items():
        assert ours_metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # No resampling: no resampled or credited tokens.
    assert ours_metrics["axpo_resampled_token_share"] == 0
    assert ours_metrics["axpo_source_prefix_token_share"] == 0


def direct_loss(data, current, cfg: core.LossConfig) -> torch.Tensor:
    """The AXPO token-level loss written out: PPO-clip (asymmetric, dual clip) + β·KL over AXPO's
    loss tokens, divided by the global loss-token count. NeMo-RL weights the KL by
    exp(logπ − sg(logπ)) (value 1; it adds the score-function gradient of the KL), detached where
    the input clamp bites."""
    keep = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]) > 0
    n = keep.sum()
    zero = torch.zeros(())
    adv = torch.where(keep, data["advantages"][:, 1:], zero)
    old = torch.where(keep, data["prev_logprobs"][:, 1:], zero)
    ref = torch.where(keep, data["reference_policy_logprobs"][:, 1:], zero)
    lp = torch.where(keep, current, zero)
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high))
    if cfg.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
    d = ref - lp
    weight = torch.exp(lp - lp.detach())
    if cfg.kl_input_clamp is not None:
        clamped = d.clamp(-cfg.kl_input_clamp, cfg.kl_input_clamp)
        weight = torch.where(clamped == d, weight, weight.detach())  # a clamped token: no gradient at all
        d = clamped
    kl = {"k1": -d, "k2": d * d / 2, "k3": d.exp() - 1 - d}[cfg.kl_type] * weight
    if cfg.kl_output_clamp is not None:
        kl = kl.clamp(-cfg.kl_output_clamp, cfg.kl_output_clamp)
    return ((pg + cfg.kl_coef * kl) * keep).sum() / n


@pytest.mark.parametrize(("cfg", "pg_fields"), CASES)
def test_equals_the_direct_formula_with_axpo_masks(cfg, pg_fields):
    row_mask = torch.ones(12, dtype=torch.bool)
    row_mask[5] = False  # excluded (e.g. NaN logprobs): stays in the batch with zero weight
    data, _ = axpo_data(gbs=16, row_mask=row_mask)
    data, current = with_logprobs(data, seed=1)
    # Off the loss mask anything may be there: the excluded row and the padding rows hold NaN.
    for key in ("prev_logprobs", "reference_policy_logprobs", "generation_logprobs"):
        data[key][5] = math.nan
        data[key][12:] = math.nan
    data["advantages"][12:] = math.nan
    with torch.no_grad():
        current[12:] = math.nan

    loss, grad, _ = run(AXPOLossFn(cfg), data, current, micro_batch=4)
    current.grad = None
    expected = direct_loss(data, current, cfg)
    expected.backward()
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, current.grad, rtol=1e-6, atol=1e-7)
    # AXPO's structure reaches the loss: frozen prefixes, padding and the excluded row get no gradient,
    # the continuations (rows 8-11) and the credited source prefixes (rows 0-1, tokens 3-5) do.
    assert grad[8:12, : PREFIX_LEN - 1].eq(0).all() and grad[5].eq(0).all() and grad[12:].eq(0).all()
    assert grad[8:12].abs().sum() > 0 and grad[0:2, 2:5].abs().sum() > 0
    # NeMo-RL's loss alone would be poisoned by the NaN off the mask.
    seqs, toks = global_counts(data)
    raw, _ = ClippedPGLossFn(ClippedPGLossConfig(**pg_fields))(current.detach(), data, seqs, toks)
    assert math.isnan(raw.item())


def test_loss_value_matches_the_local_backend_core_policy_loss():
    """Same data through core.policy_loss (the local trainer's loss): equal values; with β = 0 the
    gradients agree too (NeMo-RL's KL adds a score-function gradient term the core omits)."""
    data, _ = axpo_data(gbs=4)
    data, current = with_logprobs(data, seed=2)
    for cfg in (core.LossConfig(), core.LossConfig(kl_coef=0.0, dual_clip=2.0)):
        loss, grad, _ = run(AXPOLossFn(cfg), data, current, micro_batch=3)
        lp = torch.cat([torch.zeros(current.shape[0], 1), current], dim=1)
        mask = (data["token_mask"] * data["sample_mask"][:, None]).bool()
        current.grad = None
        core_loss, _ = core.policy_loss(
            lp,
            data["prev_logprobs"],
            data["advantages"],
            mask,
            cfg,
            ref_logprobs=data["reference_policy_logprobs"],
        )
        core_loss.backward()
        torch.testing.assert_close(loss, core_loss.detach(), rtol=1e-6, atol=1e-7)
        if cfg.kl_coef == 0:
            torch.testing.assert_close(grad, current.grad, rtol=1e-6, atol=1e-7)


def test_axpo_metrics_sum_over_micro_batches_to_the_global_value():
    data, adv = axpo_data(gbs=16)
    data, current = with_logprobs(data, seed=3)
    mask = adv.loss_mask
    n = int(mask.sum())
    # Scenario: 6 tool rows x 8 loss tokens + 2 no-tool rows x 7 + 4 continuations x 5 = 82 tokens.
    assert n == 82
    full_loss, _, global_metrics = run(AXPOLossFn(), data, current)
    for micro_batch in (1, 3, 4, 16):
        loss, _, metrics = run(AXPOLossFn(), data, current, micro_batch)
        torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-7)
        for key in AXPO_METRIC_NAMES:
            # float32 sums in a different grouping: equal to float32 precision.
            assert metrics[key] == pytest.approx(global_metrics[key], rel=1e-6, abs=1e-9), (key, micro_batch)
    assert global_metrics["axpo_resampled_token_share"] == pytest.approx(20 / 82)
    assert global_metrics["axpo_source_prefix_token_share"] == pytest.approx(6 / 82)  # rows 0, 1: tokens 3-5
    assert global_metrics["axpo_resampled_sample_share"] == pytest.approx(4 / 12)
    assert global_metrics["axpo_advantage_mean"] == pytest.approx(float(adv.advantages[mask].sum()) / 82)
    assert global_metrics["axpo_advantage_abs_mean"] == pytest.approx(
        float(adv.advantages[mask].abs().sum()) / 82
    )
    assert global_metrics["num_valid_samples"] == 12


def test_attributes_nemo_rl_reads_and_pickling():
    loss_fn = AXPOLossFn(core.LossConfig(kl_coef=0.03))
    assert loss_fn.loss_type == LossType.TOKEN_LEVEL
    assert loss_fn.input_type == LossInputType.LOGPROB
    assert loss_fn.reference_policy_kl_penalty == 0.03
    assert loss_fn.use_linear_ce_fusion is False
    assert loss_fn.pg_config.ratio_clip_max == 0.28 and loss_fn.pg_config.token_level_loss is True
    data, current = with_logprobs(grpo_data())
    seqs, toks = global_counts(data)
    restored = pickle.loads(pickle.dumps(loss_fn))  # Policy.train ships the loss to Ray workers
    assert restored(current, data, seqs, toks)[0] == loss_fn(current, data, seqs, toks)[0]
    with_is = AXPOLossFn(overrides={"use_importance_sampling_correction": True})
    assert with_is.pg_config.use_importance_sampling_correction is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="v0.7.0's non-parallel logprob path calls .cuda()")
def test_through_nemo_rl_input_preparation_from_logits():
    """The worker path: logits -> prepare_loss_input -> AXPOLossFn, per micro-batch."""
    data, _ = axpo_data(gbs=4)
    data, _ = with_logprobs(data, seed=4)
    data = data.to("cuda")
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(*data["input_ids"].shape, VOCAB, generator=gen).cuda().requires_grad_(True)
    seqs, toks = global_counts(data)
    loss_fn = AXPOLossFn()
    total = 0.0
    for start in range(0, data.size, 4):
        mb = data.slice(start, start + 4)
        loss, metrics = wrap_loss_fn_with_input_preparation(
            logits[start : start + 4], mb, seqs, toks, loss_fn=loss_fn, prepare_fn=prepare_loss_input
        )
        total = total + loss
        assert set(AXPO_METRIC_NAMES) <= set(metrics)
    total.backward()
    lp = torch.log_softmax(logits.detach(), -1)[:, :-1].gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
    current = lp.clone().requires_grad_(True)
    expected, _, _ = run(loss_fn, data, current)
    torch.testing.assert_close(total.detach(), expected, rtol=1e-6, atol=1e-7)
    # Position 0 of each row never sees a gradient through the loss (its logits predict token 1 only
    # when token 1 is a loss token; prompts never are).
    assert logits.grad[:, 0].abs().sum() == 0


def test_sequence_packing_style_per_row_dicts_sum_to_the_batch_loss():
    """SequencePackingLossWrapper calls the loss once per sequence with a plain dict, unpadded."""
    data, _ = axpo_data(gbs=4)
    data, current = with_logprobs(data, seed=6)
    seqs, toks = global_counts(data)
    loss_fn = AXPOLossFn()
    batch_loss, _, batch_metrics = run(loss_fn, data, current)
    total, shares = 0.0, 0.0
    for row in range(data.size):
        length = int(data["input_lengths"][row])
        one = {k: (v[row : row + 1, :length] if v.dim() > 1 else v[row : row + 1]) for k, v in data.items()}
        loss, metrics = loss_fn(current[row : row + 1, : length - 1].detach(), one, seqs, toks)
        total += loss.item()
        shares += metrics["axpo_resampled_token_share"]
    assert total == pytest.approx(batch_loss.item(), rel=1e-6)
    assert shares == pytest.approx(batch_metrics["axpo_resampled_token_share"])


def test_missing_keys_and_bad_shapes_raise():
    data, current = with_logprobs(grpo_data())
    seqs, toks = global_counts(data)
    loss_fn = AXPOLossFn()
    broken = BatchedDataDict({k: v for k, v in data.items() if k != "advantages"})
    with pytest.raises(KeyError, match="advantages"):
        loss_fn(current, broken, seqs, toks)
    broken = BatchedDataDict(dict(data.items()))
    broken["advantages"] = data["advantages"][:, 0]
    with pytest.raises(ValueError, match="advantages has shape"):
        loss_fn(current, broken, seqs, toks)
    with pytest.raises(ValueError, match="next_token_logprobs has shape"):
        loss_fn(current[:, :-1], data, seqs, toks)


# --- the train data inside NeMo-RL's BatchedDataDict ----------------------------------------


def image(t: int, h: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(t * h * w, 4, generator=gen),
        "image_grid_thw": torch.tensor([t, h, w]),
    }


def multimodal_train_data(gbs: int):
    b, plan, axpo = scenario()
    adv = core.assemble_advantages(b, plan, axpo)
    images = [[image(1, 2, 2, 10 * r + j) for j in range(r % 3)] for r in range(b.num_rows)]
    train = build_train_data(
        b, adv.advantages, adv.loss_mask, images, global_batch_size=gbs, pad_token_id=PAD, seq_multiple=8
    )
    return train, images


def test_train_data_builds_into_batched_data_dict_with_packed_tensors():
    train, images = multimodal_train_data(gbs=8)
    data = to_batched_data_dict(train)
    assert isinstance(data, BatchedDataDict) and data.size == 16
    assert isinstance(data["pixel_values"], PackedTensor) and isinstance(data["image_grid_thw"], PackedTensor)
    assert len(data["pixel_values"]) == 16 and data["pixel_values"].dim_to_pack == 0
    assert data["input_ids"] is train.tensors["input_ids"]
    mm = data.get_multimodal_dict(as_tensors=True)
    assert set(mm) == {"pixel_values", "image_grid_thw"}
    flat = [im for row in images for im in row]
    torch.testing.assert_close(mm["pixel_values"], torch.cat([im["pixel_values"] for im in flat]))
    assert mm["image_grid_thw"].tolist() == [im["image_grid_thw"].tolist() for im in flat]


def test_shards_and_micro_batches_keep_each_rows_images():
    train, images = multimodal_train_data(gbs=8)
    data = to_batched_data_dict(train)
    shards = data.shard_by_batch_size(shards=2, batch_size=8)
    assert [s.size for s in shards] == [8, 8]
    # shard 0 holds rows 0-3 and 8-11 (first half of each global batch), shard 1 the rest.
    expected_rows = [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    for shard, rows in zip(shards, expected_rows, strict=True):
        torch.testing.assert_close(shard["input_ids"], train.tensors["input_ids"][rows])
        for mb_index, mb in enumerate(shard.make_microbatch_iterator(2)):
            mb_rows = rows[2 * mb_index : 2 * mb_index + 2]
            got = mb.get_multimodal_dict(as_tensors=True)
            flat = [im for r in mb_rows if r < 12 for im in images[r]]
            if flat:
                torch.testing.assert_close(
                    got["pixel_values"], torch.cat([im["pixel_values"] for im in flat])
                )
            else:
                assert got["pixel_values"] is None
    rejoined = BatchedDataDict.from_batches(shards)
    assert rejoined.size == 16 and len(rejoined["pixel_values"]) == 16


def test_dynamic_batching_truncates_every_per_token_key_together():
    train, _ = multimodal_train_data(gbs=16)
    data = to_batched_data_dict(train)
    data, current = with_logprobs(data, seed=7)
    seqs, toks = global_counts(data)
    full_loss, _, _ = run(AXPOLossFn(), data, current)
    data["current"] = torch.cat([torch.zeros(data.size, 1), current.detach()], dim=1)  # ride along, [R', S']
    shards, _ = data.shard_by_batch_size(
        shards=2,
        batch_size=16,
        dynamic_batching_args={
            "max_tokens_per_microbatch": 32,
            "sequence_length_round": 4,
            "input_key": "input_ids",
            "input_lengths_key": "input_lengths",
        },
    )
    total = 0.0
    loss_fn = AXPOLossFn()
    for shard in shards:
        for mb in shard.make_microbatch_iterator_with_dynamic_shapes():
            width = mb["input_ids"].shape[1]
            assert all(v.shape[1] == width for v in mb.values() if torch.is_tensor(v) and v.dim() > 1)
            assert width <= data["input_ids"].shape[1]
            loss, _ = loss_fn(mb["current"][:, 1:], mb, seqs, toks)
            total += loss.item()
    assert total == pytest.approx(full_loss.item(), rel=1e-6)

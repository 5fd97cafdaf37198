"""The trajectory -> NeMo-RL train-data translation, on plain tensors (no NeMo-RL needed)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from core_helpers import OTHER_LP, PREFIX_LEN, SCENARIO_MASK, no_tool_rollout, scenario, tool_rollout

from axpo_nemo import core
from axpo_nemo.nemo import adapter
from axpo_nemo.nemo.loss import AXPOLossFn, clipped_pg_config
from axpo_nemo.nemo.train_data import NemoTrainData, build_train_data, to_batched_data_dict

PAD = 0
IMG = 900  # the <|image_pad|> id in the image tests
PATCH_DIM = 6


def axpo_step():
    """The shared two-group scenario (8 originals + 4 continuations of rows 0 and 1), 13 tokens."""
    batch, plan, axpo = scenario()
    adv = core.assemble_advantages(batch, plan, axpo)
    return batch, adv


def build(batch, adv, images=None, **kwargs) -> NemoTrainData:
    kwargs.setdefault("global_batch_size", 8)
    kwargs.setdefault("pad_token_id", PAD)
    images = images if images is not None else [[] for _ in range(batch.num_rows)]
    return build_train_data(batch, adv.advantages, adv.loss_mask, images, **kwargs)


def image(t: int, h: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(t * h * w, PATCH_DIM, generator=gen),
        "image_grid_thw": torch.tensor([t, h, w]),
    }


def test_keys_shapes_dtypes_and_row_padding():
    batch, adv = axpo_step()
    data = build(batch, adv, global_batch_size=8)
    t = data.tensors
    assert (data.num_real_rows, data.num_pad_rows, data.num_rows, data.seq_len) == (12, 4, 16, 13)
    expected = {
        "input_ids": ((16, 13), torch.long),
        "input_lengths": ((16,), torch.int32),
        "token_mask": ((16, 13), torch.long),
        "sample_mask": ((16,), torch.float32),
        "generation_logprobs": ((16, 13), torch.float32),
        "advantages": ((16, 13), torch.float32),
        "axpo_resampled": ((16,), torch.float32),
        "axpo_prefix_end": ((16,), torch.long),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == expected
    assert data.multimodal == {}


@pytest.mark.parametrize(("rows_gbs", "pad"), [(1, 0), (4, 0), (5, 3), (12, 0), (16, 4), (32, 20)])
def test_rows_padded_to_global_batch_multiple_never_dropped(rows_gbs, pad):
    batch, adv = axpo_step()
    data = build(batch, adv, global_batch_size=rows_gbs)
    assert data.num_real_rows == 12 and data.num_pad_rows == pad
    assert data.num_rows % rows_gbs == 0
    # Every real row (the 4 resampled continuations included) is there, in order.
    torch.testing.assert_close(data.tensors["input_ids"][:12], batch.token_ids)
    torch.testing.assert_close(data.tensors["axpo_resampled"][:12], (~batch.is_original).float())


def test_padding_rows_have_zero_weight_and_no_image():
    batch, adv = axpo_step()
    images = [[image(1, 2, 2, seed=i)] for i in range(batch.num_rows)]
    data = build(batch, adv, images, global_batch_size=16)
    t, pad = data.tensors, slice(12, 16)
    assert t["sample_mask"][pad].tolist() == [0.0] * 4
    assert int(t["token_mask"][pad].abs().sum()) == 0
    assert int(t["advantages"][pad].abs().sum()) == 0 and int(t["generation_logprobs"][pad].abs().sum()) == 0
    assert t["input_ids"][pad].eq(PAD).all()
    assert t["input_lengths"][pad].tolist() == [1] * 4
    assert t["axpo_resampled"][pad].tolist() == [0.0] * 4 and t["axpo_prefix_end"][pad].tolist() == [0] * 4
    assert data.multimodal["pixel_values"][12:] == [None] * 4
    assert data.multimodal["image_grid_thw"][12:] == [None] * 4
    # Real rows keep their weight.
    assert t["sample_mask"][:12].tolist() == [1.0] * 12


def test_masks_advantages_and_logprobs_match_the_core_unshifted():
    batch, adv = axpo_step()
    t = build(batch, adv).tensors
    mask = torch.tensor(SCENARIO_MASK)
    assert torch.equal(adv.loss_mask, mask)
    assert torch.equal(t["token_mask"][:12].bool(), mask)
    torch.testing.assert_close(t["advantages"][:12], adv.advantages)
    torch.testing.assert_close(t["generation_logprobs"][:12], torch.where(mask, batch.logprobs, 0.0))
    assert t["input_lengths"][:12].tolist() == batch.lengths.tolist()
    # Padding inside a row (no-tool rows are 10 tokens) is the pad id and carries nothing.
    assert t["input_ids"][2, 10:].eq(PAD).all() and not t["token_mask"][2, 10:].any()
    # Frozen prefixes of continuations carry no loss; AXPO's tags say which rows/tokens are special.
    assert not t["token_mask"][8:12, :PREFIX_LEN].any()
    assert t["axpo_prefix_end"].tolist()[:12] == [PREFIX_LEN, PREFIX_LEN] + [0] * 10


def test_nemo_rl_next_token_pairing_reads_each_token_at_its_own_position():
    """NeMo-RL pairs next_token_logprobs[:, j] (the logprob of token j+1) with key[:, 1:][:, j].

    A tiny bigram "model" gives the logprob of every token; the core stores it at the token's own
    position. Computing it NeMo-RL's way (logits[:, :-1] gathered at input_ids[:, 1:]) and pairing
    it with the train data's [:, 1:] slices must give the core's per-token sums exactly.
    """
    batch, adv = axpo_step()
    t = build(batch, adv, global_batch_size=16, seq_multiple=4).tensors
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1200, 1200, generator=gen).log_softmax(-1)  # table[prev, next]
    ids = t["input_ids"]
    logits = table[ids]  # [R', S', V]: the distribution of the next token after each position
    next_token_lp = logits[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # NeMo-RL's [R', S'-1]

    core_lp = torch.zeros(batch.token_ids.shape)
    core_lp[:, 1:] = table[batch.token_ids[:, :-1], batch.token_ids[:, 1:]]  # token t at t
    mask = t["token_mask"][:, 1:] * t["sample_mask"][:, None]
    nemo_sum = (t["advantages"][:, 1:] * mask * next_token_lp).sum()
    core_sum = (adv.advantages * adv.loss_mask * core_lp).sum()
    torch.testing.assert_close(nemo_sum, core_sum)
    torch.testing.assert_close(mask.sum(), adv.loss_mask.sum().float())
    # Token by token: each loss token t meets its own logprob at NeMo-RL's index t-1.
    rows, cols = torch.nonzero(adv.loss_mask, as_tuple=True)
    torch.testing.assert_close(next_token_lp[rows, cols - 1], core_lp[rows, cols])
    torch.testing.assert_close(t["advantages"][:, 1:][rows, cols - 1], adv.advantages[rows, cols])
    # Position 0 (never a loss token) holds 0 like NeMo-RL's own logprob tensors.
    assert t["generation_logprobs"][:, 0].eq(0).all()


@pytest.mark.parametrize(("multiple", "width"), [(1, 13), (2, 14), (8, 16), (13, 13), (64, 64)])
def test_sequence_length_rounded_up_to_multiple(multiple, width):
    batch, adv = axpo_step()
    data = build(batch, adv, seq_multiple=multiple)
    assert data.seq_len == width
    for key in ("input_ids", "token_mask", "generation_logprobs", "advantages"):
        assert data.tensors[key].shape == (16, width)
    assert data.tensors["input_ids"][:, 13:].eq(PAD).all()
    assert not data.tensors["token_mask"][:, 13:].any()
    assert data.tensors["input_lengths"][:12].max() == 13


def test_batch_wider_than_its_longest_row_is_trimmed():
    batch, adv = axpo_step()
    pad = (0, 7)
    wide = dataclasses.replace(
        batch,
        token_ids=torch.nn.functional.pad(batch.token_ids, pad, value=77),
        generated=torch.nn.functional.pad(batch.generated, pad),
        logprobs=torch.nn.functional.pad(batch.logprobs, pad),
    )
    assert wide.token_ids.shape == (12, 20)
    data = build_train_data(
        wide,
        torch.nn.functional.pad(adv.advantages, pad),
        torch.nn.functional.pad(adv.loss_mask, pad),
        [[] for _ in range(12)],
        global_batch_size=4,
        pad_token_id=PAD,
    )
    assert data.seq_len == 13
    # Tokens past a row's length are the pad id, whatever the batch held there.
    assert data.tensors["input_ids"][2, 10:].eq(PAD).all()


def test_excluded_row_keeps_its_place_with_zero_weight():
    batch, plan, axpo = scenario()
    adv0 = core.assemble_advantages(batch, plan, axpo)
    row_mask = torch.ones(batch.num_rows, dtype=torch.bool)
    row_mask[5] = False
    adv = core.assemble_advantages(batch, plan, axpo, row_mask=row_mask)
    # The excluded row's logprobs may be NaN: they are off the loss mask, so they never reach NeMo-RL.
    batch.logprobs[5, 4] = math.nan
    data = build(batch, adv)
    t = data.tensors
    assert data.num_real_rows == 12
    assert t["sample_mask"][5] == 0 and not t["token_mask"][5].any()
    assert t["input_ids"][5].tolist() == batch.token_ids[5].tolist()
    assert torch.isfinite(t["generation_logprobs"]).all()
    assert t["sample_mask"][[4, 6]].tolist() == [1.0, 1.0]
    assert adv0.loss_mask[5].any()


def test_nonfinite_off_the_loss_mask_is_zeroed():
    batch, adv = axpo_step()
    advantages = adv.advantages.clone()
    advantages[~adv.loss_mask] = math.nan
    data = build_train_data(
        batch, advantages, adv.loss_mask, [[] for _ in range(12)], global_batch_size=4, pad_token_id=PAD
    )
    assert torch.isfinite(data.tensors["advantages"]).all()
    torch.testing.assert_close(data.tensors["advantages"], adv.advantages)


def image_rollout(group: int, image_tokens: list[int], reward: float) -> core.Rollout:
    """A tool rollout whose prompt holds ``image_tokens[0]`` image pads and whose observation holds
    the rest (each image's pad run follows a vision-start token 5)."""
    first, *rest = image_tokens
    prompt = [11, 5] + [IMG] * first + [12]
    obs = [41] + [tok for n in rest for tok in ([5] + [IMG] * n)] + [42]
    body = [21, 22, 1001, 31, 1002]
    answer = [51, 52]
    ids = prompt + body + obs + answer
    gen = [False] * len(prompt) + [True] * len(body) + [False] * len(obs) + [True] * len(answer)
    lps = [0.0 if not g else OTHER_LP for g in gen]
    start = len(prompt) + 2
    return core.Rollout(
        group=group,
        token_ids=ids,
        prompt_len=len(prompt),
        generated=gen,
        logprobs=lps,
        reward=reward,
        correct=reward >= 1,
        tool_calls=[core.ToolCallSpan(start, start + 3)],
        num_turns=2,
    )


def test_several_images_per_row_in_qwen_vl_layout():
    # Row 0: question image (grid 1x4x4 -> 16 patches, 4 tokens) + two tool-result crops
    # (1x2x4 -> 2 tokens, 1x2x2 -> 1 token); row 1: one image; row 2: no image at all.
    per_row = [
        [image(1, 4, 4, 0), image(1, 2, 4, 1), image(1, 2, 2, 2)],
        [image(1, 2, 2, 3)],
        [],
    ]
    per_row[1][0]["image_grid_thw"] = per_row[1][0]["image_grid_thw"][None]  # [1, 3] is accepted too
    rollouts = [image_rollout(0, [4, 2, 1], 1.0), image_rollout(0, [1], 0.0), no_tool_rollout(0, 0.0)]
    batch = core.RolloutBatch.from_rollouts(rollouts)
    adv = core.assemble_advantages(batch)
    data = build(batch, adv, per_row, global_batch_size=4, image_token_id=IMG)
    mm = data.multimodal
    assert set(mm) == {"pixel_values", "image_grid_thw"} and len(mm["pixel_values"]) == 4
    torch.testing.assert_close(mm["pixel_values"][0], torch.cat([im["pixel_values"] for im in per_row[0]]))
    assert mm["pixel_values"][0].shape == (16 + 8 + 4, PATCH_DIM)
    assert mm["image_grid_thw"][0].tolist() == [[1, 4, 4], [1, 2, 4], [1, 2, 2]]
    assert mm["image_grid_thw"][0].dtype == torch.long
    assert mm["image_grid_thw"][1].tolist() == [[1, 2, 2]]
    assert mm["pixel_values"][2] is None and mm["pixel_values"][3] is None
    # Concatenating a micro-batch (what PackedTensor.as_tensor does) lines grids up with patch rows.
    grids = torch.cat([g for g in mm["image_grid_thw"] if g is not None])
    pixels = torch.cat([p for p in mm["pixel_values"] if p is not None])
    assert int(grids.prod(dim=1).sum()) == pixels.shape[0]
    # mm_token_type_ids marks exactly the image pads, 7 in row 0 and 1 in row 1.
    types = data.tensors["mm_token_type_ids"]
    assert types.shape == data.tensors["input_ids"].shape
    assert types.sum(dim=1).tolist() == [7, 1, 0, 0]
    assert torch.equal(types.bool(), data.tensors["input_ids"] == IMG)


def test_text_only_batch_has_no_multimodal_keys_and_no_type_ids_by_default():
    batch, adv = axpo_step()
    data = build(batch, adv)
    assert data.multimodal == {} and "mm_token_type_ids" not in data.tensors


def _bad(batch, adv, **over):
    args = {
        "batch": batch,
        "advantages": adv.advantages,
        "loss_mask": adv.loss_mask,
        "images": [[] for _ in range(batch.num_rows)],
        "global_batch_size": 4,
        "pad_token_id": PAD,
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b, a: {"advantages": a.advantages[:, :-1]}, "advantages has shape"),
        (lambda b, a: {"loss_mask": a.loss_mask[:-1]}, "loss_mask has shape"),
        (lambda b, a: {"loss_mask": a.loss_mask.float()}, "loss_mask must be a bool"),
        (lambda b, a: {"advantages": a.advantages.long()}, "floating point"),
        (lambda b, a: {"images": [[]] * 11}, "images has 11 entries"),
        (lambda b, a: {"global_batch_size": 0}, "global_batch_size"),
        (lambda b, a: {"seq_multiple": 0}, "seq_multiple"),
        (lambda b, a: {"image_token_id": PAD}, "image_token_id equals pad_token_id"),
    ],
)
def test_bad_arguments_raise(change, message):
    batch, adv = axpo_step()
    with pytest.raises(ValueError, match=message):
        build_train_data(**_bad(batch, adv, **change(batch, adv)))


def test_nonfinite_advantage_or_logprob_on_a_loss_token_raises():
    batch, adv = axpo_step()
    advantages = adv.advantages.clone()
    advantages[3, 5] = math.inf
    with pytest.raises(ValueError, match="advantages is non-finite on a loss token of row 3"):
        build_train_data(**_bad(batch, adv, advantages=advantages))
    batch.logprobs[9, 7] = math.nan
    with pytest.raises(ValueError, match=r"batch\.logprobs is non-finite on a loss token of row 9"):
        build_train_data(**_bad(batch, adv))


def test_loss_tokens_that_nemo_rl_cannot_train_on_raise():
    batch, adv = axpo_step()
    mask = adv.loss_mask.clone()
    mask[2, 11] = True  # past the 10-token row
    with pytest.raises(ValueError, match="row 2 has loss tokens past its length"):
        build_train_data(**_bad(batch, adv, loss_mask=mask))
    mask = adv.loss_mask.clone()
    mask[0, 1] = True  # a prompt token
    with pytest.raises(ValueError, match="row 0 has loss tokens the policy did not generate"):
        build_train_data(**_bad(batch, adv, loss_mask=mask))
    r = tool_rollout(0, 1.0)
    r.prompt_len = 0
    r.generated[0] = True
    odd = core.RolloutBatch.from_rollouts([r])
    odd_mask = odd.generated.clone()
    with pytest.raises(ValueError, match="position 0"):
        build_train_data(
            odd, torch.ones(odd_mask.shape), odd_mask, [[]], global_batch_size=1, pad_token_id=PAD
        )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"pixel_values": torch.zeros(4, PATCH_DIM)}, "must be a mapping with keys"),
        ({"pixel_values": torch.zeros(4), "image_grid_thw": torch.tensor([1, 2, 2])}, r"\[patches, dim\]"),
        ({"pixel_values": torch.zeros(4, PATCH_DIM), "image_grid_thw": torch.tensor([1, 2])}, "3 positive"),
        (
            {"pixel_values": torch.zeros(4, PATCH_DIM), "image_grid_thw": torch.tensor([1, 0, 4])},
            "3 positive",
        ),
        (
            {"pixel_values": torch.zeros(5, PATCH_DIM), "image_grid_thw": torch.tensor([1, 2, 2])},
            "5 patch rows",
        ),
        (
            {"pixel_values": torch.zeros(4, PATCH_DIM + 1), "image_grid_thw": torch.tensor([1, 2, 2])},
            "patch dim",
        ),
        (
            {"pixel_values": torch.zeros(4, PATCH_DIM).double(), "image_grid_thw": torch.tensor([1, 2, 2])},
            "float64",
        ),
    ],
)
def test_bad_image_entries_raise_naming_the_image(entry, message):
    batch, adv = axpo_step()
    images = [[] for _ in range(12)]
    images[0] = [image(1, 2, 2, 0)]
    images[4] = [image(1, 2, 2, 1), entry]
    with pytest.raises(ValueError, match=message) as info:
        build_train_data(**_bad(batch, adv, images=images))
    assert "images[4][1]" in str(info.value)


def test_image_token_count_must_match_the_grids():
    rollouts = [image_rollout(0, [4, 2], 1.0), image_rollout(0, [1], 0.0)]
    batch = core.RolloutBatch.from_rollouts(rollouts)
    adv = core.assemble_advantages(batch)
    images = [[image(1, 4, 4, 0), image(1, 2, 2, 1)], [image(1, 2, 2, 2)]]  # row 0 needs 4 + 2 tokens
    with pytest.raises(ValueError, match="row 0 has 6 image tokens but its images' grids need 5"):
        build(batch, adv, images, global_batch_size=2, image_token_id=IMG)
    images[0][1] = image(1, 2, 4, 1)
    assert build(batch, adv, images, global_batch_size=2, image_token_id=IMG).num_rows == 2


VSTART, VEND = 901, 902  # <|vision_start|>, <|vision_end|> in the image tests


def test_padding_rows_carry_one_minimal_image_when_the_step_has_images():
    # Without the vision ids, a padding row has no image: a DP rank whose last micro-batch holds
    # only such rows runs no vision tower (tests/test_nemo_contracts.py, on NeMo-RL's sharding).
    rollouts = [image_rollout(0, [4, 2], 1.0), image_rollout(0, [1], 0.0), no_tool_rollout(0, 0.0)]
    batch = core.RolloutBatch.from_rollouts(rollouts)
    adv = core.assemble_advantages(batch)
    images = [[image(1, 4, 4, 0), image(1, 2, 4, 1)], [image(1, 2, 2, 2)], []]
    data = build(batch, adv, images, global_batch_size=8, image_token_id=IMG, vision_start_id=VSTART,
                 vision_end_id=VEND)  # fmt: skip
    t, mm, pad = data.tensors, data.multimodal, slice(3, 8)
    assert data.num_pad_rows == 5 and t["input_lengths"][pad].tolist() == [3] * 5
    assert t["input_ids"][pad, :3].tolist() == [[VSTART, IMG, VEND]] * 5 and t["input_ids"][pad, 3:].eq(PAD).all()
    assert t["mm_token_type_ids"][pad].sum(dim=1).tolist() == [1] * 5
    for row in range(3, 8):  # the first 2x2 patch window of the step's first image: one token
        torch.testing.assert_close(mm["pixel_values"][row], images[0][0]["pixel_values"][:4])
        assert mm["image_grid_thw"][row].tolist() == [[1, 2, 2]]
    # still zero weight
    assert t["sample_mask"][pad].eq(0).all() and t["token_mask"][pad].eq(0).all()
    assert t["advantages"][pad].eq(0).all() and t["generation_logprobs"][pad].eq(0).all()
    assert mm["pixel_values"][2] is None  # a real row without images stays without
    # a text-only step keeps one-token padding rows
    text_batch, text_adv = axpo_step()  # 12 rows
    text_only = build(text_batch, text_adv, global_batch_size=16, image_token_id=IMG, vision_start_id=VSTART,
                      vision_end_id=VEND)  # fmt: skip
    assert text_only.multimodal == {} and text_only.tensors["input_lengths"][12:].tolist() == [1] * 4
    with pytest.raises(ValueError, match="must differ"):
        build(batch, adv, images, global_batch_size=8, image_token_id=IMG, vision_start_id=IMG, vision_end_id=VEND)


def test_padding_row_images_leave_the_real_rows_logits_unchanged():
    # A real Qwen3-VL (tiny) forward: the padding rows' images go through the vision tower and the
    # M-RoPE index (which walks image_grid_thw across the batch) without touching the real rows.
    from PIL import Image

    from axpo_nemo.agent.protocol import VISION_END, VISION_START, ChatProtocol
    from axpo_nemo.models.qwen3vl import build_tiny_qwen3vl

    bundle = build_tiny_qwen3vl(seed=0)
    proto = ChatProtocol(bundle.processor)
    rollouts, images = [], []
    for i, size in enumerate([(48, 64), (64, 32)]):
        gen = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8).numpy()
        prompt = proto.build_prompt(f"question {i}", [Image.fromarray(pixels)])
        answer = proto.tokenizer("an answer", add_special_tokens=False)["input_ids"]
        ids = prompt.token_ids + answer
        gen_mask = [False] * len(prompt.token_ids) + [True] * len(answer)
        rollouts.append(core.Rollout(group=0, token_ids=ids, prompt_len=len(prompt.token_ids), generated=gen_mask,
                                     logprobs=[-0.5 * g for g in gen_mask], reward=float(i), correct=bool(i)))  # fmt: skip
        slot = prompt.images[0].image
        images.append([{"pixel_values": slot.pixel_values, "image_grid_thw": slot.grid_thw}])
    batch = core.RolloutBatch.from_rollouts(rollouts, pad_id=proto.tokenizer.pad_token_id)
    adv = core.assemble_advantages(batch)
    data = build_train_data(
        batch, adv.advantages, adv.loss_mask, images, global_batch_size=4, pad_token_id=proto.tokenizer.pad_token_id,
        image_token_id=proto.image_pad_id, spatial_merge_size=proto.merge_size,
        vision_start_id=proto.ids[VISION_START], vision_end_id=proto.ids[VISION_END],
    )  # fmt: skip
    assert data.num_pad_rows == 2

    def logits(rows: int) -> torch.Tensor:
        t, mm = data.tensors, data.multimodal
        mask = torch.arange(data.seq_len)[None, :] < t["input_lengths"][:rows, None]
        with torch.no_grad():
            return bundle.model(
                input_ids=t["input_ids"][:rows], attention_mask=mask.long(), mm_token_type_ids=t["mm_token_type_ids"][:rows],
                pixel_values=torch.cat(mm["pixel_values"][:rows]), image_grid_thw=torch.cat(mm["image_grid_thw"][:rows]),
            ).logits  # fmt: skip

    with_pads, alone = logits(4), logits(2)
    for row in range(2):
        n = int(data.tensors["input_lengths"][row])
        torch.testing.assert_close(with_pads[row, :n], alone[row, :n], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(with_pads[2:, :3]).all()


@pytest.mark.skipif(adapter.nemo_rl_available(), reason="NeMo-RL is importable here")
def test_to_batched_data_dict_without_nemo_rl_says_what_is_missing():
    batch, adv = axpo_step()
    with pytest.raises(adapter.NemoRLUnavailable, match="nemo_rl"):
        to_batched_data_dict(build(batch, adv))


# --- the loss module without NeMo-RL (its NeMo-RL behaviour: tests/test_nemo_loss.py) ----------


def test_loss_config_maps_onto_clipped_pg_loss_config():
    cfg = core.LossConfig(
        clip_low=0.1, clip_high=0.3, dual_clip=3.0, kl_coef=0.02, kl_type="k2", kl_output_clamp=None
    )
    fields = clipped_pg_config(cfg, {"use_importance_sampling_correction": True})
    assert fields == {
        "token_level_loss": True,
        "disable_ppo_ratio": False,
        "sequence_level_importance_ratios": False,
        "use_kl_in_reward": False,
        "use_cispo": False,
        "positive_example_nll_weight": 0.0,
        "ratio_clip_min": 0.1,
        "ratio_clip_max": 0.3,
        "ratio_clip_c": 3.0,
        "reference_policy_kl_penalty": 0.02,
        "reference_policy_kl_type": "k2",
        "kl_input_clamp_value": 20.0,
        "kl_output_clamp_value": None,
        "use_importance_sampling_correction": True,
    }


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("ratio_clip_max", "through loss.clip_high"),
        ("reference_policy_kl_penalty", "through loss.kl_coef"),
        ("token_level_loss", "not supported by AXPOLossFn"),
        ("use_cispo", "not supported by AXPOLossFn"),
        ("ratio_clip_maxx", "not supported by AXPOLossFn"),
    ],
)
def test_loss_overrides_that_would_change_the_loss_raise(key, message):
    with pytest.raises(ValueError, match=message):
        clipped_pg_config(core.LossConfig(), {key: 0.5})


@pytest.mark.skipif(adapter.nemo_rl_available(), reason="NeMo-RL is importable here")
def test_axpo_loss_fn_without_nemo_rl_says_what_is_missing():
    with pytest.raises(adapter.NemoRLUnavailable, match=r"nemo-rl:v0\.7\.0"):
        AXPOLossFn()

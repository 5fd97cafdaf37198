"""A step's rollouts as NeMo-RL (v0.7.0) train data: the tensors ``policy.train`` consumes.

Framework-free: `build_train_data` works on plain torch tensors (and is tested without NeMo-RL);
`to_batched_data_dict` is the one step that needs NeMo-RL, and imports it through the adapter.

The contract (docs/nemo_loss.md has the full table):

* Alignment. Every per-token key is ``[R', S']`` and aligned with ``input_ids`` exactly as the
  core's tensors are: position t describes token t, so ``generation_logprobs[:, t]`` is
  log π(token_t | tokens_<t). That is also NeMo-RL's convention: its loss pairs
  ``next_token_logprobs[:, j]`` (the logprob of token j+1) with ``key[:, 1:][:, j]`` — the value
  stored at position j+1 — and ``get_logprobs`` returns ``[R', S']`` with position 0 set to 0. So
  the core's arrays go in unshifted, and position 0 never carries loss (a loss token there raises).
* Right padding; ``S'`` is the longest real row rounded up to ``seq_multiple`` (NeMo-RL's
  ``make_sequence_length_divisible_by``: TP with sequence parallelism, CP).
* Rows. The step's R rows in order (originals, then resampled), then zero-weight padding rows up to
  a multiple of ``global_batch_size`` (``shard_by_batch_size`` asserts divisibility). Rows are
  never dropped: a row excluded from the loss (e.g. non-finite logprobs) keeps its place with an
  all-zero token mask and ``sample_mask`` 0. A padding row has ``token_mask`` 0 and ``sample_mask``
  0 and is one ``pad_token_id`` token, or, when the step has images and the vision token ids are
  given, one minimal image: ``<|vision_start|><|image_pad|><|vision_end|>`` with the first
  merge² patch rows of the step's first image (grid ``(1, merge, merge)``, one token). NeMo-RL
  cuts micro-batches from the rows however its batching mode says (fixed size: contiguous slices,
  so trailing padding rows fill a DP rank's last micro-batches; sequence packing: a bin made only
  of padding rows), so an image in every padding row is what keeps the vision tower in every
  micro-batch of an image step, which Megatron's overlapped gradient reduce needs.
* Multimodal (Qwen3-VL). Per row, ``pixel_values`` is the row's images' patch rows concatenated in
  the order the images appear in its tokens (question image first, then tool-result images), and
  ``image_grid_thw`` is ``[n_i, 3]``, one (t, h, w) row per image; a row without images holds
  None (NeMo-RL's ``PackedTensor`` skips None when it concatenates a micro-batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from axpo_nemo.core.rollout import RolloutBatch

#: Per-token keys NeMo-RL's ClippedPGLossFn reads (besides the logprobs the trainer adds).
TOKEN_KEYS = ("input_ids", "token_mask", "generation_logprobs", "advantages")
#: [R'] 1.0 on resampled rows (AXPO metrics; absent in plain GRPO data).
RESAMPLED_KEY = "axpo_resampled"
#: [R'] for a selected source row, one past its frozen prefix (through ``<tool_call>``); 0 elsewhere.
#: The source's generated tokens in [prompt_len, end) are the prefix-credit tokens.
PREFIX_END_KEY = "axpo_prefix_end"
#: Multimodal keys, per row (NeMo-RL wraps them in ``PackedTensor(dim_to_pack=0)``).
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw")


@dataclass
class NemoTrainData:
    """A step's train data before it becomes a NeMo-RL ``BatchedDataDict``.

    Attributes:
        tensors: ``input_ids`` [R', S'] long, ``input_lengths`` [R'] int32, ``token_mask``
            [R', S'] long (1 on loss tokens), ``sample_mask`` [R'] float32, ``generation_logprobs``
            [R', S'] float32 (behaviour logprobs on loss tokens, 0 elsewhere), ``advantages``
            [R', S'] float32 (0 off the loss tokens), ``axpo_resampled`` [R'] float32,
            ``axpo_prefix_end`` [R'] long, and ``mm_token_type_ids`` [R', S'] long when an image
            token id was given.
        multimodal: ``pixel_values`` and ``image_grid_thw``, one entry per row (None for a row
            without images); empty when no row has an image.
        num_real_rows: R, the step's rollouts (rows [0, R)).
        num_pad_rows: zero-weight rows appended (rows [R, R')).
    """

    tensors: dict[str, torch.Tensor]
    multimodal: dict[str, list]
    num_real_rows: int
    num_pad_rows: int

    @property
    def num_rows(self) -> int:
        """R' = real rows + padding rows (a multiple of the global batch size)."""
        return self.num_real_rows + self.num_pad_rows

    @property
    def seq_len(self) -> int:
        """S', the padded sequence length."""
        return int(self.tensors["input_ids"].shape[1])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _row_images(
    row: int, images: Sequence[Mapping[str, torch.Tensor]], width: int | None, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's (pixel_values [ΣP_i, D], image_grid_thw [n_i, 3]) with every image checked."""
    pixels, grids = [], []
    for j, image in enumerate(images):
        where = f"images[{row}][{j}]"
        if not isinstance(image, Mapping) or any(k not in image for k in MULTIMODAL_KEYS):
            raise ValueError(f"build_train_data: {where} must be a mapping with keys {MULTIMODAL_KEYS}")
        pv = torch.as_tensor(image["pixel_values"])
        grid = torch.as_tensor(image["image_grid_thw"]).reshape(-1)
        if pv.dim() != 2:
            raise ValueError(
                f"build_train_data: {where}['pixel_values'] must be [patches, dim], got {tuple(pv.shape)}"
            )
        if grid.numel() != 3 or grid.is_floating_point() or bool((grid <= 0).any()):
            raise ValueError(
                f"build_train_data: {where}['image_grid_thw'] must be 3 positive integers (t, h, w), "
                f"got {grid.tolist()}"
            )
        if pv.shape[0] != int(grid.prod()):
            raise ValueError(
                f"build_train_data: {where} has {pv.shape[0]} patch rows but image_grid_thw "
                f"{grid.tolist()} implies {int(grid.prod())}"
            )
        if width is not None and pv.shape[1] != width:
            raise ValueError(
                f"build_train_data: {where}['pixel_values'] has patch dim {pv.shape[1]}, other images {width}"
            )
        if dtype is not None and pv.dtype != dtype:
            raise ValueError(f"build_train_data: {where}['pixel_values'] is {pv.dtype}, other images {dtype}")
        width, dtype = pv.shape[1], pv.dtype
        pixels.append(pv)
        grids.append(grid.to(torch.long))
    return torch.cat(pixels), torch.stack(grids)


def build_train_data(
    batch: RolloutBatch,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    images: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    *,
    global_batch_size: int,
    pad_token_id: int,
    seq_multiple: int = 1,
    image_token_id: int | None = None,
    spatial_merge_size: int = 2,
    vision_start_id: int | None = None,
    vision_end_id: int | None = None,
) -> NemoTrainData:
    """Translate a step's rollouts into NeMo-RL train data (module docstring: the contract).

    Args:
        batch: the step's rows (originals, then resampled rows).
        advantages: [R, S] per-token advantages aligned with ``batch.token_ids``
            (`StepAdvantages.advantages`).
        loss_mask: [R, S] bool, the loss tokens (`StepAdvantages.loss_mask`, with rows excluded
            through its ``row_mask`` already all False).
        images: per row, its images in token order, each ``{"pixel_values": [P, D],
            "image_grid_thw": [3] or [1, 3]}`` (P = t·h·w patch rows); an empty sequence for a row
            without images.
        global_batch_size: NeMo-RL's ``train_global_batch_size``; rows are padded to a multiple.
        pad_token_id: the tokenizer's pad id (right padding, padding rows).
        seq_multiple: round the sequence length up to this (``make_sequence_length_divisible_by``).
        image_token_id: Qwen3-VL's ``<|image_pad|>`` id. When given, ``mm_token_type_ids`` (1 on
            image tokens) is added and each row's image-token count is checked against its grids.
        spatial_merge_size: the vision merger's patch merge (2 for Qwen3-VL): an image takes
            t·h·w / merge² tokens.
        vision_start_id, vision_end_id: ``<|vision_start|>`` and ``<|vision_end|>``. With these and
            ``image_token_id``, a step with images gets padding rows that each hold one minimal
            image (module docstring), so every micro-batch carries an image.

    Raises:
        ValueError: naming the bad input — shape or dtype mismatches, a loss token outside a row or
            at position 0, a non-finite advantage or behaviour logprob on a loss token, bad image
            entries, or an image-token count that does not match the grids.
    """
    rows, width = batch.token_ids.shape
    if rows == 0:
        raise ValueError("build_train_data: the batch has no rows")
    if global_batch_size < 1:
        raise ValueError(f"build_train_data: global_batch_size must be >= 1, got {global_batch_size}")
    if seq_multiple < 1:
        raise ValueError(f"build_train_data: seq_multiple must be >= 1, got {seq_multiple}")
    if spatial_merge_size < 1:
        raise ValueError(f"build_train_data: spatial_merge_size must be >= 1, got {spatial_merge_size}")
    if image_token_id is not None and image_token_id == pad_token_id:
        raise ValueError(f"build_train_data: image_token_id equals pad_token_id ({pad_token_id})")
    for name, tensor in (("advantages", advantages), ("loss_mask", loss_mask)):
        if tuple(tensor.shape) != (rows, width):
            raise ValueError(
                f"build_train_data: {name} has shape {tuple(tensor.shape)}, expected {(rows, width)} "
                "like batch.token_ids"
            )
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"build_train_data: loss_mask must be a bool tensor, got {loss_mask.dtype}")
    if not advantages.is_floating_point():
        raise ValueError(f"build_train_data: advantages must be floating point, got {advantages.dtype}")
    if len(images) != rows:
        raise ValueError(f"build_train_data: images has {len(images)} entries, expected one per row ({rows})")

    lengths = batch.lengths.to(torch.long)
    positions = torch.arange(width)
    inside = positions[None, :] < lengths[:, None]
    if bool((loss_mask & ~inside).any()):
        bad = int(torch.nonzero((loss_mask & ~inside).any(dim=1))[0])
        raise ValueError(f"build_train_data: row {bad} has loss tokens past its length {int(lengths[bad])}")
    if bool((loss_mask & ~batch.generated).any()):
        bad = int(torch.nonzero((loss_mask & ~batch.generated).any(dim=1))[0])
        raise ValueError(f"build_train_data: row {bad} has loss tokens the policy did not generate")
    if bool(loss_mask[:, 0].any()):
        raise ValueError(
            "build_train_data: a loss token at position 0 (NeMo-RL reads masks and advantages from "
            "position 1 on, so it would be silently dropped)"
        )
    for name, tensor in (("advantages", advantages), ("batch.logprobs", batch.logprobs)):
        bad_tokens = loss_mask & ~torch.isfinite(tensor)
        if bool(bad_tokens.any()):
            bad = int(torch.nonzero(bad_tokens.any(dim=1))[0])
            raise ValueError(
                f"build_train_data: {name} is non-finite on a loss token of row {bad}; exclude the row "
                "from the loss (assemble_advantages row_mask) instead"
            )

    row_pixels: list[torch.Tensor | None] = [None] * rows
    row_grids: list[torch.Tensor | None] = [None] * rows
    patch_dim, pixel_dtype = None, None
    for row, row_images in enumerate(images):
        if len(row_images):
            row_pixels[row], row_grids[row] = _row_images(row, row_images, patch_dim, pixel_dtype)
            patch_dim, pixel_dtype = row_pixels[row].shape[1], row_pixels[row].dtype
    # A padding row's minimal image: one merged token, the first merge x merge patch window
    # (Qwen-VL orders patch rows window by window, so the first merge² rows are one window).
    pad_image = None
    vision_ids = (image_token_id, vision_start_id, vision_end_id)
    if patch_dim is not None and all(i is not None for i in vision_ids):
        if len(set(vision_ids) | {pad_token_id}) != 4:
            raise ValueError(
                f"build_train_data: image_token_id, vision_start_id, vision_end_id and pad_token_id must "
                f"differ, got {vision_ids} and {pad_token_id}"
            )
        first = next(r for r in range(rows) if row_pixels[r] is not None)
        merge = spatial_merge_size**2
        if row_pixels[first].shape[0] < merge:
            raise ValueError(
                f"build_train_data: row {first}'s first image has fewer than {merge} patch rows "
                f"(spatial_merge_size {spatial_merge_size})"
            )
        pad_image = (
            torch.tensor([vision_start_id, image_token_id, vision_end_id], dtype=torch.long),
            row_pixels[first][:merge].clone(),
            torch.tensor([[1, spatial_merge_size, spatial_merge_size]], dtype=torch.long),
        )
    pad_len = 1 if pad_image is None else len(pad_image[0])

    seq_len = _round_up(max(int(lengths.max()), pad_len), seq_multiple)
    pad_rows = (-rows) % global_batch_size
    total = rows + pad_rows
    keep = min(width, seq_len)

    def per_token(source: torch.Tensor, fill, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((total, seq_len), fill, dtype=dtype)
        out[:rows, :keep] = source[:, :keep].to(dtype)
        return out

    input_ids = per_token(torch.where(inside, batch.token_ids, pad_token_id), pad_token_id, torch.long)
    token_mask = per_token(loss_mask, 0, torch.long)
    gen_lp = per_token(torch.where(loss_mask, batch.logprobs, 0.0), 0.0, torch.float32)
    adv = per_token(torch.where(loss_mask, advantages, 0.0), 0.0, torch.float32)

    input_lengths = torch.full((total,), pad_len, dtype=torch.int32)
    input_lengths[:rows] = lengths.to(torch.int32)
    if pad_image is not None and pad_rows:
        input_ids[rows:, :pad_len] = pad_image[0]
    sample_mask = torch.zeros(total, dtype=torch.float32)
    sample_mask[:rows] = loss_mask.any(dim=1).to(torch.float32)

    resampled = torch.zeros(total, dtype=torch.float32)
    resampled[:rows] = (~batch.is_original).to(torch.float32)
    # A selected source's frozen prefix is its resampled children's prefix (all children share it).
    prefix_end = torch.zeros(total, dtype=torch.long)
    children = torch.nonzero(~batch.is_original).flatten()
    if children.numel():
        prefix_end[batch.source[children]] = batch.prefix_len[children]

    tensors = {
        "input_ids": input_ids,
        "input_lengths": input_lengths,
        "token_mask": token_mask,
        "sample_mask": sample_mask,
        "generation_logprobs": gen_lp,
        "advantages": adv,
        RESAMPLED_KEY: resampled,
        PREFIX_END_KEY: prefix_end,
    }

    pad_pixels, pad_grid = (None, None) if pad_image is None else pad_image[1:]
    pixel_values = row_pixels + [pad_pixels] * pad_rows
    grids = row_grids + [pad_grid] * pad_rows
    multimodal = {"pixel_values": pixel_values, "image_grid_thw": grids} if patch_dim is not None else {}

    if image_token_id is not None:
        is_image = (input_ids == image_token_id).to(torch.long)
        if pad_image is None:
            is_image[rows:] = 0
        tensors["mm_token_type_ids"] = is_image
        merge = spatial_merge_size**2
        for row in range(rows):
            expected = 0 if grids[row] is None else int(grids[row].prod(dim=1).sum()) // merge
            found = int(is_image[row].sum())
            if found != expected:
                raise ValueError(
                    f"build_train_data: row {row} has {found} image tokens but its images' grids need "
                    f"{expected} (grid t·h·w / {merge} each)"
                )
    return NemoTrainData(tensors=tensors, multimodal=multimodal, num_real_rows=rows, num_pad_rows=pad_rows)


def to_batched_data_dict(data: NemoTrainData):
    """The train data as NeMo-RL's ``BatchedDataDict``, multimodal keys as ``PackedTensor``.

    Tensors are shared, not copied. ``PackedTensor(..., dim_to_pack=0)`` holds one entry per row
    (None for a row without images), as NeMo-RL's own Qwen-VL data path builds it, so
    ``shard_by_batch_size``, ``slice`` and ``get_multimodal_dict(as_tensors=True)`` keep each
    row's images with the row.
    """
    from axpo_nemo.nemo import adapter

    batched_data_dict = adapter.batched_data_dict_cls()
    packed_tensor = adapter.packed_tensor_cls()
    out = batched_data_dict(dict(data.tensors))
    for key, per_row in data.multimodal.items():
        if len(per_row) != data.num_rows:
            raise ValueError(
                f"to_batched_data_dict: multimodal[{key!r}] has {len(per_row)} rows, expected {data.num_rows}"
            )
        out[key] = packed_tensor(list(per_row), dim_to_pack=0)
    return out

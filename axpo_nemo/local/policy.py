"""Per-token logprobs of whole sequences under a HF Qwen3-VL: what the trainers score and train on.

``sequence_logprobs(model, seqs)`` returns, for every token t of every sequence, the logprob
``log_softmax(logits_{t-1} / T)[token_t]`` — the same definition (and the same float32 cast of the
logits) as `LocalGenerator`'s behaviour logprobs, so a trajectory sampled at temperature T and
rescored under the same weights gets its behaviour logprobs back. Position 0 (no context) is 0.

Design:

* **Inputs.** A sequence is anything with ``token_ids`` and ``images`` (`ImageSlot`\\ s): a
  `TrajectoryState`, or a `TokenSequence` (`as_sequences` wraps a padded token tensor).
* **Padding: right.** Rows are right-padded, so outputs line up with `core.RolloutBatch`'s
  right-padded ``[R, S]`` tensors with no shift, and no query row is ever fully masked. Positions
  are passed explicitly as ``[4, B, L]`` exactly as the generator does (row 0: the token index,
  rows 1-3: M-RoPE from `mrope_positions`); padding continues the index and is masked out.
  Images of a micro-batch are concatenated row by row, in position order.
* **Micro-batches.** Rows are cut into micro-batches of at most ``micro_batch_size`` rows and
  ``max_tokens`` encoded tokens, so memory is bounded. By default (`plan_micro_batches`) rows are
  ordered by their tokens — a question's N rollouts, a source and its K forks become neighbours —
  and cut where that minimises the tokens encoded given prefix sharing; without sharing, longest
  first (least padding). The plan is deterministic.
* **Shared prefix, encoded once.** The tokens (and images) every row of a micro-batch starts
  with — the system prompt and question, an AXPO fork's frozen prefix — go through the model
  once; the KV cache is repeated for each row and only the rows' own suffixes are encoded on top
  (`shared_prefix_len`; gradients flow back through the cache). This is the training-side
  counterpart of the generator's shared prefill: no prompt is recomputed per rollout.
* **Only needed positions.** The decoder runs over every token, but the LM head, the float32 cast
  and the log-softmax run only at the positions asked for (``needed``: e.g. the loss mask), in
  chunks of ``chunk_tokens``. With gradients on, each chunk is checkpointed: its ``[n, vocab]``
  logits are recomputed in the backward pass instead of being kept.
* **Training.** `iter_logprobs` yields one differentiable `LogprobChunk` per micro-batch, so a
  trainer computes a micro-batch's loss, backpropagates and frees it before the next one
  (gradient accumulation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from axpo_nemo.agent.protocol import ImageSlot
from axpo_nemo.local.forward import encode, kv_cache
from axpo_nemo.local.generator import mrope_positions

#: Shared prefixes shorter than this are not worth a separate forward.
DEFAULT_MIN_SHARED_PREFIX = 32

__all__ = [
    "LogprobChunk",
    "Scorable",
    "TokenSequence",
    "as_sequences",
    "batch_inputs",
    "encode",
    "iter_logprobs",
    "micro_batches",
    "plan_micro_batches",
    "sequence_logprobs",
    "shared_prefix_len",
]


class Scorable(Protocol):
    """What a sequence must offer to be scored (`TrajectoryState` does)."""

    token_ids: Sequence[int]
    images: Sequence[ImageSlot]


@dataclass
class TokenSequence:
    """A plain token sequence, optionally with images (their pad runs already in ``token_ids``)."""

    token_ids: Sequence[int]
    images: Sequence[ImageSlot] = field(default_factory=list)


def as_sequences(
    token_ids: torch.Tensor, lengths: torch.Tensor, images: Sequence[Sequence[ImageSlot]] | None = None
) -> list[TokenSequence]:
    """Rows of a right-padded ``[R, S]`` token tensor as sequences (``images[i]``: row i's slots)."""
    return [
        TokenSequence(token_ids[i, : int(n)].tolist(), list(images[i]) if images is not None else [])
        for i, n in enumerate(lengths.tolist())
    ]


@dataclass
class LogprobChunk:
    """One micro-batch's result.

    Attributes:
        rows: the sequences' indices in the input, in this chunk's row order.
        logprobs: ``[len(rows), W]`` float32 (W: the chunk's longest sequence), 0 where not needed;
            differentiable when computed with gradients.
        entropy: same shape, the entropy of ``softmax(logits / T)`` at needed positions (when asked).
    """

    rows: list[int]
    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None


def micro_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    max_tokens: int | None = None,
    keys: Sequence[Any] | None = None,
) -> list[list[int]]:
    """Split row indices into micro-batches, in a deterministic order.

    Rows are visited longest first (ties by index), or by ``keys`` when given (e.g. the token
    lists: sorted lexicographically, rows sharing a prefix become neighbours). A micro-batch holds
    at most ``micro_batch_size`` rows and, when ``max_tokens`` is set, at most that many padded
    tokens (rows x its longest row), but always at least one row.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (got {micro_batch_size})")
    if keys is None:
        order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    else:
        order = sorted(range(len(lengths)), key=lambda i: (keys[i], i))
    out: list[list[int]] = []
    widest = 0
    for i in order:
        n = int(lengths[i])
        cur = out[-1] if out else None
        if (
            cur is not None
            and len(cur) < micro_batch_size
            and (max_tokens is None or (len(cur) + 1) * max(widest, n) <= max_tokens)
        ):
            cur.append(i)
            widest = max(widest, n)
        else:
            out.append([i])
            widest = n
    return out


#: Planning cost of one extra forward pass, in tokens (favours fewer, fuller micro-batches).
_FORWARD_OVERHEAD_TOKENS = 64


def plan_micro_batches(
    seqs: Sequence[Scorable],
    micro_batch_size: int,
    max_tokens: int | None = None,
    *,
    rows: Sequence[int] | None = None,
    min_shared_prefix: int | None = DEFAULT_MIN_SHARED_PREFIX,
) -> list[list[int]]:
    """Micro-batches (indices into ``seqs``) of ``rows`` (default: all), cheapest first-to-last.

    Without prefix sharing (``min_shared_prefix`` None) this is `micro_batches` by length. With
    it, rows are ordered by their tokens (so a question's rollouts, or a source and its forks,
    are neighbours) and cut into contiguous micro-batches that minimise the tokens encoded: a
    micro-batch of n rows of longest length W sharing a prefix P costs ``P + n·(W - P)`` (P = 0
    when shorter than ``min_shared_prefix``), found exactly by dynamic programming. Limits: at
    most ``micro_batch_size`` rows and ``max_tokens`` encoded tokens (at least one row).
    """
    rows = list(range(len(seqs))) if rows is None else list(rows)
    if min_shared_prefix is None:
        lengths = [len(seqs[i].token_ids) for i in rows]
        return [[rows[i] for i in mb] for mb in micro_batches(lengths, micro_batch_size, max_tokens)]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (got {micro_batch_size})")
    order = sorted(rows, key=lambda i: (list(seqs[i].token_ids), i))
    n = len(order)
    length = [len(seqs[i].token_ids) for i in order]
    # lcp[k]: prefix rows k and k+1 share; a contiguous run shares the minimum over its pairs.
    lcp = [shared_prefix_len([seqs[order[k]], seqs[order[k + 1]]]) for k in range(n - 1)]
    best = [0.0] + [math.inf] * n
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        widest, shared = 0, math.inf
        for a in range(j - 1, max(j - micro_batch_size, 0) - 1, -1):
            widest = max(widest, length[a])
            if a < j - 1:
                shared = min(shared, lcp[a])
            size = j - a
            p = int(shared) if size > 1 and shared >= min_shared_prefix else 0
            tokens = p + size * (widest - p)
            if max_tokens is not None and size > 1 and tokens > max_tokens:
                break
            cost = best[a] + tokens + _FORWARD_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], start[j] = cost, a
    out, j = [], n
    while j > 0:
        out.append(order[start[j] : j])
        j = start[j]
    return out[::-1]


def shared_prefix_len(seqs: Sequence[Scorable]) -> int:
    """Length of the prefix every sequence shares: same tokens and same images.

    At most the shortest length minus one (every row keeps a token of its own), and never inside
    an image's pad run (an image is encoded in one piece).
    """
    if len(seqs) < 2:
        return 0
    n = min(len(s.token_ids) for s in seqs) - 1
    if n <= 0:
        return 0
    ids = torch.tensor([list(s.token_ids[:n]) for s in seqs], dtype=torch.long)
    diff = (ids != ids[0]).any(dim=0).nonzero()
    cut = int(diff[0]) if diff.numel() else n
    first = sorted(seqs[0].images, key=lambda x: x.start)
    for s in seqs[1:]:
        other = {slot.start: slot.image for slot in s.images}
        for slot in first:
            if slot.start >= cut:
                break
            img = other.get(slot.start)
            if img is None or not (img is slot.image or img.fingerprint == slot.image.fingerprint):
                cut = slot.start
                break
    for slot in first:
        if slot.start < cut < slot.end:
            cut = slot.start
    return cut


def _merge_size(model) -> int:
    return int(model.config.vision_config.spatial_merge_size)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def batch_inputs(
    seqs: Sequence[Scorable], merge_size: int, pad_id: int = 0, start: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded forward inputs for ``seqs``: ids, mask, ``[4, B, W]`` positions, images.

    ``visual_mask`` marks the image slots' pad tokens: only they receive image features (a
    ``<|image_pad|>`` the model itself sampled stays an ordinary token, as it was when sampled).
    Rows 1-3 of ``position_ids`` are each row's M-RoPE positions (`mrope_positions`), row 0 the
    token index; padding continues both and is masked out by ``attention_mask``. With ``start``
    the inputs cover tokens ``start:`` only, to follow a cached shared prefix of that length:
    positions are offset and the mask spans prefix + suffix. No image may straddle ``start``.
    """
    width = max(len(s.token_ids) for s in seqs) - start
    rows = len(seqs)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, start + width, dtype=torch.long)
    mask[:, :start] = 1
    pos = torch.zeros(4, rows, width, dtype=torch.long)
    visual = torch.zeros(rows, width, dtype=torch.bool)
    pixels, grids = [], []
    for r, s in enumerate(seqs):
        n = len(s.token_ids) - start
        ids[r, :n] = torch.as_tensor(list(s.token_ids[start:]), dtype=torch.long)
        mask[r, start : start + n] = 1
        pos[0, r] = torch.arange(start, start + width)
        rope = mrope_positions(start + n, s.images, merge_size)[:, start:]
        pos[1:, r, :n] = rope
        nxt = int(rope.max()) + 1 if n else 0
        pos[1:, r, n:] = torch.arange(nxt, nxt + width - n)
        for slot in sorted(s.images, key=lambda x: x.start):
            if slot.start >= start:
                pixels.append(slot.image.pixel_values)
                grids.append(slot.image.grid_thw)
                visual[r, slot.start - start : slot.end - start] = True
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "visual_mask": visual}
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
        inputs["image_grid_thw"] = torch.stack(grids)
    return inputs


def _token_stats(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of ``targets`` (and entropy) from hidden states, via the LM head, in float32."""
    logits = head(hidden).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(1, targets[:, None])[:, 0] - lse
    if not want_entropy:
        return lp, torch.zeros_like(lp)
    return lp, lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def _hidden_states(
    model, seqs: Sequence[Scorable], merge_size: int, pad_id: int, prefix: int
) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Final hidden states of a micro-batch, and a map from (row, position) to their flat index.

    With ``prefix`` > 0 the shared prefix is encoded once (one row, its images once), its KV cache
    is repeated for every row, and only the rows' suffixes are encoded on top of it; gradients
    flow through the cache into the prefix.
    """
    if prefix == 0:
        hidden = encode(model, batch_inputs(seqs, merge_size, pad_id)).last_hidden_state
        width = hidden.shape[1]
        return hidden.reshape(-1, hidden.shape[-1]), lambda r, t: r * width + t
    head = TokenSequence(seqs[0].token_ids[:prefix], [s for s in seqs[0].images if s.end <= prefix])
    pre = encode(
        model, batch_inputs([head], merge_size, pad_id), DynamicCache(config=model.config.get_text_config())
    )
    cache = kv_cache(pre)
    cache.batch_repeat_interleave(len(seqs))
    suffix = encode(model, batch_inputs(seqs, merge_size, pad_id, start=prefix), cache).last_hidden_state
    width = suffix.shape[1]
    pool = torch.cat([pre.last_hidden_state[0], suffix.reshape(-1, suffix.shape[-1])])
    return pool, lambda r, t: torch.where(t < prefix, t, prefix + r * width + (t - prefix))


def _forward_chunk(
    model,
    seqs: Sequence[Scorable],
    needed: torch.Tensor,
    *,
    temperature: float,
    want_entropy: bool,
    merge_size: int,
    pad_id: int,
    chunk_tokens: int,
    min_shared_prefix: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs ``[B, W]`` of one micro-batch at the ``needed`` ``[B, W]`` positions."""
    dev = _device(model)
    lengths = torch.tensor([len(s.token_ids) for s in seqs])
    width = int(lengths.max())
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s.token_ids)] = torch.as_tensor(list(s.token_ids), dtype=torch.long)
    needed = needed[:, :width].clone()
    needed[:, 0] = False
    needed &= torch.arange(width)[None, :] < lengths[:, None]
    prefix = shared_prefix_len(seqs) if min_shared_prefix is not None else 0
    if min_shared_prefix is not None and prefix < min_shared_prefix:
        prefix = 0
    pool, flat = _hidden_states(model, seqs, merge_size, pad_id, prefix)
    rows, cols = needed.nonzero(as_tuple=True)
    h = pool[flat(rows, cols - 1).to(dev)]  # the state before token t predicts token t
    targets = ids[rows, cols].to(dev)
    rows, cols = rows.to(dev), cols.to(dev)
    head = model.get_output_embeddings()
    lps, ents = [], []
    for a in range(0, targets.numel(), chunk_tokens):
        args = (h[a : a + chunk_tokens], targets[a : a + chunk_tokens], head, temperature, want_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_token_stats, *args, use_reentrant=False)
        else:
            lp, ent = _token_stats(*args)
        lps.append(lp)
        ents.append(ent)
    shape = (len(seqs), width)
    flat_lp = torch.cat(lps) if lps else pool.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(shape, dtype=torch.float32, device=dev).index_put((rows, cols), flat_lp)
    ent_out = None
    if want_entropy:
        flat_ent = torch.cat(ents) if ents else flat_lp
        ent_out = torch.zeros(shape, dtype=torch.float32, device=dev).index_put((rows, cols), flat_ent)
    return out, ent_out


def _needed_mask(seqs: Sequence[Scorable], needed: Any) -> torch.Tensor:
    """``[R, S]`` bool of positions to score (default: every token after the first)."""
    width = max(len(s.token_ids) for s in seqs)
    if needed is None:
        lengths = torch.tensor([len(s.token_ids) for s in seqs])
        return torch.arange(width)[None, :] < lengths[:, None]
    if isinstance(needed, torch.Tensor):
        mask = needed.to(torch.bool).cpu()
    else:
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, row in enumerate(needed):
            row = torch.as_tensor(row, dtype=torch.bool)
            mask[i, : row.numel()] = row
    if mask.shape[1] < width:
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    return mask


def iter_logprobs(
    model,
    seqs: Sequence[Scorable],
    *,
    micro_batch_size: int,
    temperature: float = 1.0,
    needed: torch.Tensor | Sequence[Sequence[bool]] | None = None,
    entropy: bool = False,
    max_tokens: int | None = None,
    chunk_tokens: int = 1024,
    pad_id: int = 0,
    batches: Sequence[Sequence[int]] | None = None,
    min_shared_prefix: int | None = DEFAULT_MIN_SHARED_PREFIX,
) -> Iterator[LogprobChunk]:
    """Per-micro-batch logprobs of ``seqs`` (see the module docstring), in `micro_batches` order.

    Gradients follow the caller's grad mode: inside ``torch.no_grad()`` nothing is recorded;
    otherwise each chunk's ``logprobs`` is differentiable, to be backpropagated before the next
    chunk is requested (the generator computes lazily).

    Args:
        model: a ``Qwen3VLForConditionalGeneration`` (its ``.model`` and output embeddings are used).
        seqs: sequences with ``token_ids`` and ``images``.
        micro_batch_size: rows per forward at most.
        temperature: T of ``log_softmax(logits / T)``; T <= 0 (greedy sampling) scores at T = 1,
            like the generator.
        needed: ``[R, S]`` bool (or per-row bool lists) of positions to score; default: all.
        entropy: also return the entropy at the needed positions.
        max_tokens: padded tokens per micro-batch at most.
        chunk_tokens: positions sent through the LM head at once.
        pad_id: id written into padding (never attended to).
        batches: explicit micro-batches of row indices (default: `plan_micro_batches`).
        min_shared_prefix: encode a micro-batch's shared prefix once when it is at least this
            long (None: never; each row is then encoded whole).
    """
    if not seqs:
        return
    temperature = float(temperature) if temperature > 0 else 1.0
    mask = _needed_mask(seqs, needed)
    merge = _merge_size(model)
    if batches is None:
        batches = plan_micro_batches(seqs, micro_batch_size, max_tokens, min_shared_prefix=min_shared_prefix)
    for rows in batches:
        rows = list(rows)
        lp, ent = _forward_chunk(
            model,
            [seqs[i] for i in rows],
            mask[rows],
            temperature=temperature,
            want_entropy=entropy,
            merge_size=merge,
            pad_id=pad_id,
            chunk_tokens=chunk_tokens,
            min_shared_prefix=min_shared_prefix,
        )
        yield LogprobChunk(rows, lp, ent)


def sequence_logprobs(
    model,
    seqs: Sequence[Scorable],
    *,
    micro_batch_size: int,
    temperature: float = 1.0,
    grad: bool = False,
    needed: torch.Tensor | Sequence[Sequence[bool]] | None = None,
    entropy: bool = False,
    max_tokens: int | None = None,
    chunk_tokens: int = 1024,
    pad_id: int = 0,
    width: int | None = None,
    min_shared_prefix: int | None = DEFAULT_MIN_SHARED_PREFIX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[R, S]`` float32 per-token logprobs of ``seqs``, right-padded, aligned with their tokens.

    ``logprobs[i, t] = log_softmax(logits_{t-1} / T)[token_t]`` for needed positions t >= 1 of
    row i, else 0; S is the longest sequence (or ``width``). Without ``grad`` the result is on the
    CPU and nothing is recorded for autograd. With ``grad`` it stays on the model's device and
    holds every micro-batch's graph at once: to bound memory in training use `iter_logprobs`.
    Returns ``(logprobs, entropy)`` when ``entropy`` is set. Other arguments: `iter_logprobs`.
    """
    rows = len(seqs)
    width = max(width or 0, max((len(s.token_ids) for s in seqs), default=0))
    with torch.set_grad_enabled(grad):
        dev = _device(model) if grad else torch.device("cpu")
        out = torch.zeros(rows, width, dtype=torch.float32, device=dev)
        ent = torch.zeros(rows, width, dtype=torch.float32, device=dev) if entropy else None
        for chunk in iter_logprobs(
            model,
            seqs,
            micro_batch_size=micro_batch_size,
            temperature=temperature,
            needed=needed,
            entropy=entropy,
            max_tokens=max_tokens,
            chunk_tokens=chunk_tokens,
            pad_id=pad_id,
            min_shared_prefix=min_shared_prefix,
        ):
            w = chunk.logprobs.shape[1]
            index = torch.tensor(chunk.rows, device=dev)
            part = torch.nn.functional.pad(chunk.logprobs.to(dev), (0, width - w))
            out = out.index_copy(0, index, part) if grad else out.index_copy_(0, index, part)
            if ent is not None and chunk.entropy is not None:
                e = torch.nn.functional.pad(chunk.entropy.to(dev), (0, width - w))
                ent = ent.index_copy(0, index, e) if grad else ent.index_copy_(0, index, e)
    return (out, ent) if entropy else out

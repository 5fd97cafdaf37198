"""The KV caches of `LocalGenerator`: grown in place while decoding, kept from one turn to the next.

**In-place growth.** transformers' ``DynamicLayer`` appends each decoded token with ``torch.cat``:
a fresh copy of the whole layer at every step, which on a CPU costs more than the step's compute
(at 64 rows of 1,000 tokens, each copy is a new 33 MB block, faulted in page by page). A
`GrowingLayer` writes the token into a buffer with room to spare and hands attention a view of it;
it grows by half when full.

**Cross-turn reuse.**
Inside ``LocalGenerator.rollout_session()`` (which `agent.loop.run_rollouts` opens around its
rounds), every row a ``generate`` call decodes leaves its KV cache behind: the context and the
sampled tokens but the last (which was never fed to the model), with the runs of positions that
hold them (the batch's padding skipped). Rows that end with their batch keep views of the batch's
cache, which nothing writes to again, so a turn's end copies nothing (nor does a finished
trajectory's entry, which is never used); a row that ends while others decode keeps a copy, since
a view would hold the whole batch's cache. At the trajectory's next turn the generator takes that
cache back and prefills only what came after it: the last sampled token, the tool observation and
its images. This is what vLLM's prefix caching does on a cluster.

Safety: an entry is used only for the longest prefix on which it provably holds: the state's
leading tokens must equal the entry's, and every image slot in that prefix must be the same image
(fingerprint) at the same position; a prefix never ends inside an image. Anything else (a caller
that edited the tokens, a scripted turn appended after a sampled one) only shortens the prefix,
down to a full prefill. Since attention is causal, the KV of a prefix is the KV of the first tokens
of a longer sequence, so a shortened entry is still exact.

Lifetime: the entries live in a `TurnCaches` of one session on one thread (the trainer's
speculative wave rolls out on a second thread, with a session of its own). A finished trajectory's
entry is dropped at the next ``generate`` call of the session, and every entry when the session
ends. A ``generate`` call takes its trajectories' entries out of the store and frees them once their
KV is in the batch's cache, so a trajectory's KV is not held twice while it decodes (a previous
batch's cache, which views hold, goes with the last of them).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from axpo_nemo.agent.trajectory import TrajectoryState

__all__ = [
    "CachedContext",
    "GrowingLayer",
    "TurnCaches",
    "extract_row",
    "grow_in_place",
    "past_cache",
    "turn_cache_session",
]


class GrowingLayer(DynamicLayer):
    """A cache layer whose ``keys``/``values`` are views of buffers with room to grow (module docstring).

    Only what the generator's loop uses is supported: ``update`` (append), ``batch_select_indices``
    and the length queries; anything else would act on the views, not the buffers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Use ``keys``/``values`` ``[B, H, capacity, D]`` as the buffers; the first ``length``
        positions are filled."""
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._keys, self._values, self._length = keys, values, length
        self._expose()

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, room: int) -> GrowingLayer:
        """A layer holding copies of ``keys``/``values`` ``[B, H, L, D]``, ``room`` positions to spare."""
        n = keys.shape[-2]
        return cls(_copy_into(keys, n + room), _copy_into(values, n + room), n)

    def _expose(self) -> None:
        self.keys = self._keys[..., : self._length, :]
        self.values = self._values[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new positions in place (growing the buffers by half when full)."""
        end = self._length + key_states.shape[-2]
        capacity = self._keys.shape[-2]
        if end > capacity:
            capacity = max(end, capacity + capacity // 2)
            self._keys = _copy_into(self.keys, capacity)
            self._values = _copy_into(self.values, capacity)
        self._keys[..., self._length : end, :] = key_states
        self._values[..., self._length : end, :] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (buffers included)."""
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._expose()


def _copy_into(data: torch.Tensor, capacity: int) -> torch.Tensor:
    """A ``[..., capacity, D]`` buffer whose first positions hold ``data`` ``[..., L, D]``."""
    buf = data.new_empty(*data.shape[:-2], capacity, data.shape[-1])
    buf[..., : data.shape[-2], :] = data
    return buf


def grow_in_place(cache, room: int, config) -> DynamicCache:
    """``cache`` with `GrowingLayer`\\ s (copies with ``room`` positions to spare; as is if it has them)."""
    if all(isinstance(layer, GrowingLayer) for layer in cache.layers):
        return cache
    out = DynamicCache(config=config)
    out.layers[:] = [GrowingLayer.holding(layer.keys, layer.values, room) for layer in cache.layers]
    return out


@dataclass
class CachedContext:
    """The KV of a trajectory's first ``len(token_ids)`` tokens.

    Attributes:
        token_ids: the tokens the KV covers.
        slots: ``{start: (end, fingerprint)}`` of every image in those tokens.
        keys, values: per decoder layer, ``[kv_heads, P, head_dim]``.
        runs: the ``(start, end)`` ranges of those P positions that hold the tokens' KV, in order
            (padding between them skipped); None: the first ``len(token_ids)`` positions.
    """

    token_ids: list[int]
    slots: dict[int, tuple[int, str]]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    runs: tuple[tuple[int, int], ...] | None = None

    @staticmethod
    def slots_of(state: TrajectoryState) -> dict[int, tuple[int, str]]:
        """``{start: (end, fingerprint)}`` of a state's images."""
        return {s.start: (s.end, s.image.fingerprint) for s in state.images}

    def usable_length(self, state: TrajectoryState) -> int:
        """Leading tokens of ``state`` whose KV this entry holds (0: none).

        At most ``len(state) - 1``: the last context token is always fed again, for its logits.
        """
        n = max(min(len(self.token_ids), len(state) - 1), 0)
        own = state.token_ids
        if own[:n] != self.token_ids[:n]:
            n = next(i for i, (a, b) in enumerate(zip(own, self.token_ids, strict=False)) if a != b)
        mine = self.slots_of(state)
        for start in sorted(set(mine) | set(self.slots)):
            if start >= n:
                break
            if mine.get(start) != self.slots.get(start) or mine[start][0] > n:
                return start  # a different image here, or the prefix would end inside it
        return n

    def __len__(self) -> int:
        """Tokens covered."""
        return len(self.token_ids)

    def write_prefix(self, layer: int, n: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy decoder layer ``layer``'s KV of the first ``n`` tokens into ``keys``/``values``
        ``[kv_heads, n, head_dim]``."""
        done = 0
        for a, b in self.runs or ((0, len(self)),):
            take = min(b - a, n - done)
            if take <= 0:
                break
            keys[:, done : done + take] = self.keys[layer][:, a : a + take]
            values[:, done : done + take] = self.values[layer][:, a : a + take]
            done += take


class TurnCaches:
    """The cache entries of one rollout session on one thread, by trajectory identity."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[TrajectoryState, CachedContext]] = {}

    def __len__(self) -> int:
        """Entries held."""
        return len(self._entries)

    def take(self, state: TrajectoryState) -> CachedContext | None:
        """Remove and return ``state``'s entry (None if it has none)."""
        held = self._entries.pop(id(state), None)
        if held is None or held[0] is not state:
            return None
        return held[1]

    def put(self, state: TrajectoryState, entry: CachedContext) -> None:
        """Keep ``entry`` as ``state``'s cache (replacing any)."""
        self._entries[id(state)] = (state, entry)

    def drop_finished(self) -> None:
        """Drop the entries of finished trajectories."""
        for key in [k for k, (s, _) in self._entries.items() if s.finished]:
            del self._entries[key]

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()


@contextlib.contextmanager
def turn_cache_session(tls: threading.local, enabled: bool) -> Iterator[TurnCaches | None]:
    """Give the calling thread a fresh `TurnCaches` (``tls.turn_caches``) until the block ends.

    Nested sessions each get their own store; the outer one's is restored afterwards. With
    ``enabled`` False the thread has no store inside the block, so nothing is kept.
    """
    outer = getattr(tls, "turn_caches", None)
    store = TurnCaches() if enabled else None
    tls.turn_caches = store
    try:
        yield store
    finally:
        if store is not None:
            store.clear()
        tls.turn_caches = outer


def extract_row(
    cache, row: int, valid: torch.Tensor, copy: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[tuple[int, int], ...]]:
    """Row ``row`` of a batched cache, from its first to its last ``valid`` (bool ``[L]``) position.

    Returns per-layer keys and values ``[kv_heads, span, head_dim]`` and the runs of valid positions
    in that span (`CachedContext.runs`). Views of the cache's buffers unless ``copy``: a view keeps
    the whole batch's buffers alive for as long as it lives.
    """
    flags = valid.to("cpu", torch.int8)
    zero = flags.new_zeros(1)
    edges = torch.diff(flags, prepend=zero, append=zero).nonzero().flatten().tolist()
    first, last = edges[0], edges[-1]
    runs = tuple((a - first, b - first) for a, b in zip(edges[0::2], edges[1::2], strict=True))
    keys = [layer.keys[row][:, first:last] for layer in cache.layers]
    values = [layer.values[row][:, first:last] for layer in cache.layers]
    if copy:
        keys, values = [k.clone() for k in keys], [v.clone() for v in values]
    return keys, values, runs


def past_cache(
    entries: Sequence[tuple[CachedContext, int] | None],
    width: int,
    template: CachedContext,
    config,
    room: int | None = None,
) -> DynamicCache:
    """A batched, left-padded cache of ``width`` positions: row i holds ``entries[i]``'s first n.

    ``entries[i]`` is ``(entry, n)`` or None (an all-padding row); ``template`` gives the shapes,
    dtype and device. Padding positions are zeros, to be masked out by the attention mask. With
    ``room``, the layers are `GrowingLayer`\\ s with that many positions to spare (the prefill
    then writes its tokens in place); else transformers' own.
    """
    cache = DynamicCache(config=config)
    for li, (k0, v0) in enumerate(zip(template.keys, template.values, strict=True)):
        capacity = width + (room or 0)
        keys = k0.new_empty(len(entries), k0.shape[0], capacity, k0.shape[2])
        values = v0.new_empty(len(entries), v0.shape[0], capacity, v0.shape[2])
        for r, held in enumerate(entries):
            n = held[1] if held is not None else 0
            keys[r, :, : width - n].zero_()  # only the padding: the rest is overwritten
            values[r, :, : width - n].zero_()
            if n > 0:
                held[0].write_prefix(li, n, keys[r, :, width - n : width], values[r, :, width - n : width])
        if room is None:
            cache.update(keys, values, li)
        else:
            cache.layers[li] = GrowingLayer(keys, values, width)
    return cache

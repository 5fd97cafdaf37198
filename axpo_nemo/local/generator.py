"""Batched, KV-cached sampling on a Hugging Face transformers Qwen3-VL: the local `Generator`.

One ``generate`` call samples one assistant turn for every given state:

1. **Prefill, shared.** States whose contexts are identical (same tokens, same image pixels: the N
   rollouts of a question at turn 0, or the K forks of one AXPO prefix) are prefilled once; the
   resulting KV cache rows are then gathered (``Cache.batch_select_indices`` with repeated indices)
   so each state gets its own copy. ``stats`` counts prefilled sequences and tokens. An image
   that several prefilled contexts show (by fingerprint: a group's zooms on the same box) goes
   through the vision tower once. With gradients off on the CPU, padded prefills attend without
   copying each KV head per query head (`local.attention`; same results).
2. **Positions.** Contexts are left-padded. Qwen3-VL uses 3-D M-RoPE: position ids are computed
   here, per row, from the state's image slots exactly as ``Qwen3VLModel.get_rope_index`` does
   (text runs advance all three axes together; an image's pads get (t, h, w) grid positions and
   advance the text position by max(h, w) / merge), and passed explicitly as ``[4, B, L]`` (row 0:
   the plain token index used for the causal mask, rows 1-3: t/h/w). A decoded token's position
   is the row's max position + 1 on all three axes, i.e. ``len + rope_delta``. Passing positions
   explicitly means the model's cached ``rope_deltas`` is neither read nor written.
3. **Decode.** A plain loop over ``model(input_ids=[B,1], cache=cache, ...)``; each row
   stops on its stop tokens (kept in the output) or its ``max_new_tokens``; finished rows are
   dropped from the batch and cache. The cache grows in place (`local.kv_reuse.GrowingLayer`)
   instead of being copied at every step.
4. **Cross-turn reuse.** Inside ``rollout_session()`` (`run_rollouts` opens one around its rounds)
   a finished row's KV cache is kept (`local.kv_reuse`), and the trajectory's next turn prefills
   only the tokens after it: the last sampled token and the tool observation, with its images. The
   reused KV sits left-padded in front of the new tokens, which are left-padded too; the attention
   mask skips both paddings. Rows with identical contexts still prefill their new tokens once.
   ``reuse_kv=False`` re-prefills every context (same tokens, logprobs equal to float rounding).

**Behaviour logprob.** The logprob returned for a sampled token is ``log_softmax(logits / T)`` at
that token: the log-probability under the policy at temperature T, which is what a trainer
recomputes with a full forward pass. Top-p only truncates the set tokens are drawn from; the
logprob is *not* renormalised over the nucleus (so with top_p < 1 it is the logprob of the tempered
policy, not of the truncated sampling distribution, like vLLM's default). T = 0 means greedy; the
logprob is then ``log_softmax(logits)``. Logits are cast to float32 first.

**Seeding.** Each row samples with its own ``torch.Generator`` seeded from
``(params.seed, state.seed, len(state.token_ids))`` and draws exactly one uniform per token
(inverse-CDF over the probabilities sorted in descending order, stable sort), so a state's
continuation does not depend on which other states share its batch, nor on prefix sharing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from axpo_nemo.agent.loop import Continuation, SamplingParams, WorkCounters, per_state_params
from axpo_nemo.agent.protocol import ImageSlot
from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed
from axpo_nemo.local.attention import use_grouped_attention
from axpo_nemo.local.forward import CACHE_ARG, encode, kv_cache
from axpo_nemo.local.kv_reuse import CachedContext, extract_row, grow_in_place, past_cache, turn_cache_session

__all__ = ["GeneratorStats", "LocalGenerator", "mrope_positions", "row_seed", "sample_tokens"]

#: Decode positions a batch's cache has room for at first; it grows by half when full.
_ROOM = 512


@dataclass
class GeneratorStats(WorkCounters):
    """Work counters of a `LocalGenerator` (cumulative; `reset` clears them).

    Several threads may call ``generate`` at once (the trainer's speculative resampling does):
    each call counts on its own and adds to ``stats`` when it ends.

    Attributes:
        generate_calls: ``generate`` calls.
        prefill_calls: model forwards over contexts.
        prefill_sequences: distinct contexts prefilled.
        prefill_tokens: tokens of those contexts run through the model (padding excluded).
        reused_tokens: context tokens whose KV came from the trajectory's previous turn instead.
        shared_rows: rows that reused another row's prefill (their cache was expanded from it).
        decode_steps: single-token decode forwards.
        sampled_tokens: tokens returned.
    """

    generate_calls: int = 0
    prefill_calls: int = 0
    prefill_sequences: int = 0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    shared_rows: int = 0
    decode_steps: int = 0
    sampled_tokens: int = 0


def mrope_positions(length: int, images: Sequence[ImageSlot], merge_size: int) -> torch.Tensor:
    """[3, length] M-RoPE (t, h, w) position ids of a sequence, as ``get_rope_index`` computes them.

    ``images`` are the sequence's image slots (any order).
    """
    pos = torch.empty(3, length, dtype=torch.long)
    cur, i = 0, 0
    for slot in sorted(images, key=lambda s: s.start):
        n_text = slot.start - i
        pos[:, i : slot.start] = torch.arange(cur, cur + n_text)
        cur += n_text
        t, h, w = (int(x) for x in slot.image.grid_thw)
        h, w = h // merge_size, w // merge_size
        grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pos[:, slot.start : slot.end] = torch.stack(grid).reshape(3, -1) + cur
        cur += max(h, w)
        i = slot.end
    pos[:, i:] = torch.arange(cur, cur + length - i)
    return pos


def row_seed(state: TrajectoryState, params: SamplingParams) -> int:
    """The seed of the ``torch.Generator`` that samples ``state``'s turn: a function of the
    parameters' seed, the trajectory's seed and its length, never of the batch it shares."""
    return derive_seed(params.seed, state.seed, len(state))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens [B], logprobs [B] = log_softmax(logits / T)).

    Each row draws one uniform from its own generator and inverts the CDF of its nucleus
    (probabilities sorted descending, stable), so rows never interact. ``temperature <= 0`` is
    greedy (logprob at T = 1).
    """
    logits = logits.float()
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).to(logits)
    logp = torch.log_softmax(logits / temp[:, None], dim=-1)
    probs, order = logp.exp().sort(dim=-1, descending=True, stable=True)
    csum = probs.cumsum(dim=-1)
    keep = (csum - probs) < top_p.to(logits)[:, None]  # the most likely token is always kept
    kept = (probs * keep).cumsum(dim=-1)
    u = torch.tensor([float(torch.rand((), generator=g, dtype=torch.float64)) for g in generators])
    target = u.to(kept) * kept[:, -1]
    idx = torch.searchsorted(kept, target[:, None], right=True)
    idx = torch.minimum(idx, keep.sum(dim=-1, keepdim=True) - 1)
    tokens = order.gather(1, idx).squeeze(1)
    tokens = torch.where(greedy.to(tokens.device), logits.argmax(dim=-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


class LocalGenerator:
    """The `Generator` of the local backend: a HF Qwen3-VL sampled with its own KV-cached loop.

    Args:
        model: a ``Qwen3VLForConditionalGeneration`` (any device / dtype).
        tokenizer: its tokenizer (stop texts are resolved to ids through it).
        merge_size: the image processor's spatial merge size (default: the vision config's).
        share_prefixes: prefill identical contexts once and expand the cache (forks, groups).
        max_batch_size: rows decoded together at most (more states run in several batches).
        prefill_batch_size: contexts prefilled per forward at most.
        cpu_threads: intra-op threads while sampling on the CPU (restored afterwards); None keeps
            torch's setting. Decode-step matmuls are tiny, so extra threads only add OpenMP
            synchronisation, which costs 10-20x when another process holds a core.
        reuse_kv: keep each trajectory's KV cache across the turns of a ``rollout_session`` (off:
            every turn re-prefills its whole context).
        grow_cache_in_place: decode into a cache with room to grow (off: transformers'
            ``DynamicCache``, which copies the whole cache at every step; for benchmarks).
        grouped_attention: put the model's text decoder on `local.attention.grouped_sdpa_attention`,
            which prefills on CPU without copying each KV head per query head (same results; it
            changes no call with gradients on, so training is untouched). Off: transformers'
            ``sdpa``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        merge_size: int | None = None,
        share_prefixes: bool = True,
        max_batch_size: int | None = None,
        prefill_batch_size: int | None = None,
        cpu_threads: int | None = 1,
        reuse_kv: bool = True,
        grow_cache_in_place: bool = True,
        grouped_attention: bool = True,
    ) -> None:
        self.model = model
        use_grouped_attention(model, grouped_attention)
        self.reuse_kv = reuse_kv
        self.grow_cache_in_place = grow_cache_in_place
        self.cpu_threads = cpu_threads
        self.tokenizer = tokenizer
        self.merge_size = int(merge_size or model.config.vision_config.spatial_merge_size)
        self.share_prefixes = share_prefixes
        self.max_batch_size = max_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(e) for e in eos)
        self.stats = GeneratorStats()
        self._stats_lock = threading.Lock()
        self._tls = threading.local()  # this thread's counters of its last call, and its turn caches

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> LocalGenerator:
        """A generator for a `PolicyBundle` (model, processor, tokenizer)."""
        kwargs.setdefault("merge_size", bundle.processor.image_processor.merge_size)
        return cls(bundle.model, bundle.tokenizer, **kwargs)

    @property
    def last_call_stats(self) -> GeneratorStats:
        """The work of the calling thread's last ``generate`` call (threads may generate at once)."""
        return getattr(self._tls, "stats", None) or GeneratorStats()

    @contextmanager
    def rollout_session(self) -> Iterator[None]:
        """Keep the calling thread's trajectories' KV caches across ``generate`` calls until the
        block ends (module docstring, point 4); other threads are not affected."""
        with turn_cache_session(self._tls, self.reuse_kv):
            yield

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    def _stop_ids(self, params: SamplingParams) -> dict[int, str]:
        ids = {}
        for text in params.stop_token_texts:
            token_id = self.tokenizer.convert_tokens_to_ids(text)
            if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != text:
                raise ValueError(f"stop text {text!r} is not a single token")
            ids[int(token_id)] = text
        if not params.ignore_eos:
            for e in self.eos_ids:
                ids.setdefault(e, self.tokenizer.convert_ids_to_tokens(e))
        return ids

    def _context_key(self, state: TrajectoryState, row: int) -> tuple:
        if not self.share_prefixes:
            return (row,)
        return tuple(state.token_ids), tuple(s.image.fingerprint for s in state.images)

    def generate(
        self, states: Sequence[TrajectoryState], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Continuation]:
        """Sample one turn for each state (see the module docstring); never mutates the states."""
        params = per_state_params(states, params)
        self._tls.stats = GeneratorStats(generate_calls=1)
        store = getattr(self._tls, "turn_caches", None)
        if store is not None:
            store.drop_finished()
        out: list[Continuation | None] = [None] * len(states)
        groups: dict[tuple, list[int]] = {}
        for i, (s, p) in enumerate(zip(states, params, strict=True)):
            if p.max_new_tokens <= 0:
                out[i] = Continuation([], [], "length")
            else:
                groups.setdefault(self._context_key(s, i), []).append(i)
        order = [i for rows in groups.values() for i in rows]  # identical contexts stay adjacent
        size = self.max_batch_size or max(len(order), 1)
        was_training = self.model.training
        self.model.eval()
        threads = torch.get_num_threads()
        if self.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            with torch.inference_mode():
                for k in range(0, len(order), size):
                    rows = order[k : k + size]
                    results = self._generate_batch([states[i] for i in rows], [params[i] for i in rows])
                    for i, res in zip(rows, results, strict=True):
                        out[i] = res
        finally:
            self.model.train(was_training)
            torch.set_num_threads(threads)
            with self._stats_lock:
                for name, value in self._tls.stats.as_dict().items():
                    setattr(self.stats, name, getattr(self.stats, name) + value)
        return out  # type: ignore[return-value]

    def _prefill(
        self,
        contexts: list[TrajectoryState],
        reused: list[tuple[CachedContext, int] | None],
        room: int | None,
    ):
        """Left-padded forward over distinct contexts: (cache, last logits, mask, next rope pos).

        ``reused[c]`` is ``(entry, n)`` when context c's first n tokens come from a cached entry
        (only the rest is run); the cache then holds that KV left-padded to the widest one. With
        ``room`` (decode positions) the cache's layers grow in place.
        """
        dev = self.device
        done = [held[1] if held is not None else 0 for held in reused]
        past = max(done)
        width = max(len(c) - n for c, n in zip(contexts, done, strict=True))
        template = next((held[0] for held in reused if held is not None and held[1] > 0), None)
        text_config = self.model.config.get_text_config()
        chunk = self.prefill_batch_size or len(contexts)
        caches, logits, rope_next = [], [], []
        mask = torch.zeros(len(contexts), past + width, dtype=torch.long)
        for k in range(0, len(contexts), chunk):
            part = contexts[k : k + chunk]
            ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            pos = torch.zeros(4, len(part), width, dtype=torch.long)
            visual = torch.zeros(len(part), width, dtype=torch.bool)
            pixels, grids, image_index, seen = [], [], [], {}
            for r, c in enumerate(part):
                n0, n = done[k + r], len(c)
                pad = width - (n - n0)
                ids[r, pad:] = torch.tensor(c.token_ids[n0:])
                mask[k + r, past - n0 : past] = 1
                mask[k + r, past + pad :] = 1
                pos[0, r, pad:] = torch.arange(n0, n)
                rope = mrope_positions(n, c.images, self.merge_size)
                pos[1:, r, pad:] = rope[:, n0:]
                rope_next.append(int(rope.max()) + 1 if n else 0)
                for slot in sorted(c.images, key=lambda s: s.start):
                    if slot.start >= n0:  # images in the reused prefix are already in its KV
                        image = slot.image
                        if image.fingerprint not in seen:  # the same image is encoded once
                            seen[image.fingerprint] = len(pixels)
                            pixels.append(image.pixel_values)
                            grids.append(image.grid_thw)
                        image_index.append(seen[image.fingerprint])
                        visual[r, pad + slot.start - n0 : pad + slot.end - n0] = True
                self._tls.stats.prefill_tokens += n - n0
                self._tls.stats.reused_tokens += n0
            inputs = {
                "input_ids": ids,
                "attention_mask": mask[k : k + len(part)],
                "position_ids": pos,
                "visual_mask": visual,
            }
            if pixels:
                inputs["pixel_values"] = torch.cat(pixels)
                inputs["image_grid_thw"] = torch.stack(grids)
                inputs["image_index"] = torch.tensor(image_index)
            if template is None:
                start = DynamicCache(config=text_config)
            else:
                extra = None if room is None else width + room
                start = past_cache(reused[k : k + len(part)], past, template, text_config, extra)
            # Image features go where the slots say, so a sampled <|image_pad|> is just a token.
            out = encode(self.model, inputs, past_key_values=start)
            self._tls.stats.prefill_calls += 1
            caches.append(kv_cache(out))
            logits.append(self.model.lm_head(out.last_hidden_state[:, -1]).float())
        self._tls.stats.prefill_sequences += len(contexts)
        cache = caches[0]
        if len(caches) > 1:  # same padded width, so the chunks stack on the batch dim
            cache = DynamicCache(config=text_config)
            for li in range(len(caches[0].layers)):
                keys = torch.cat([c.layers[li].keys for c in caches])
                cache.update(keys, torch.cat([c.layers[li].values for c in caches]), li)
        return cache, torch.cat(logits), mask.to(dev), torch.tensor(rope_next)

    def _take_cached(
        self, states: list[TrajectoryState], row_ctx: list[int], contexts: list[TrajectoryState]
    ) -> list[tuple[CachedContext, int] | None]:
        """Per distinct context, the longest usable cached prefix among its rows' entries."""
        reused: list[tuple[CachedContext, int] | None] = [None] * len(contexts)
        store = getattr(self._tls, "turn_caches", None)
        if store is None:
            return reused
        for s, u in zip(states, row_ctx, strict=True):
            entry = store.take(s)
            if entry is None:
                continue
            n = entry.usable_length(contexts[u])
            if n > 0 and (reused[u] is None or n > reused[u][1]):
                reused[u] = (entry, n)
        return reused

    def _keep_cached(self, cache, mask, rows: list[int], js: list[int], states, tokens, last: bool) -> None:
        """Put the KV of finished batch rows ``js`` (states ``rows``) in the session's store.

        ``last``: no row of the batch decodes further, so its cache is dropped next; the entries
        then hold views of it instead of copies (nothing writes to it again, and a row that never
        comes back, a finished trajectory's, costs no copy).
        """
        store = getattr(self._tls, "turn_caches", None)
        if store is None:
            return
        for j, r in zip(js, rows, strict=True):
            s = states[r]
            keys, values, runs = extract_row(cache, j, mask[j].bool(), copy=not last)
            covered = s.token_ids + tokens[r][:-1]  # the last sampled token was never fed
            held = sum(b - a for a, b in runs)
            if held != len(covered):
                raise AssertionError(f"cached {held} positions for {len(covered)} tokens")
            store.put(s, CachedContext(covered, CachedContext.slots_of(s), keys, values, runs))

    def _generate_batch(
        self, states: list[TrajectoryState], params: list[SamplingParams]
    ) -> list[Continuation]:
        dev = self.device
        first: dict[tuple, int] = {}
        row_ctx = [first.setdefault(self._context_key(s, r), len(first)) for r, s in enumerate(states)]
        contexts = [states[row_ctx.index(u)] for u in range(len(first))]
        room = min(max(p.max_new_tokens for p in params), _ROOM) if self.grow_cache_in_place else None
        reused = self._take_cached(states, row_ctx, contexts)
        cache, logits, mask, rope_next = self._prefill(contexts, reused, room)
        del reused  # the entries' KV is in the batch's cache now: free it while decoding
        if len(contexts) < len(states):
            index = torch.tensor(row_ctx, device=dev)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
            self._tls.stats.shared_rows += len(states) - len(contexts)
        if room is not None:  # the loop feeds at most max_new_tokens - 1 tokens
            cache = grow_in_place(cache, room, self.model.config.get_text_config())
        idx_cpu = torch.tensor(row_ctx)
        text_pos = torch.tensor([len(s) for s in states])
        rope_pos = rope_next[idx_cpu]

        gens = [torch.Generator().manual_seed(row_seed(s, p)) for s, p in zip(states, params, strict=True)]
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        stops = [self._stop_ids(p) for p in params]
        tokens: list[list[int]] = [[] for _ in states]
        logprobs: list[list[float]] = [[] for _ in states]
        ends: list[tuple[str, str | None]] = [("length", None)] * len(states)
        alive = list(range(len(states)))
        while True:
            tok, lp = sample_tokens(logits, temperature, top_p, [gens[r] for r in alive])
            keep = []
            for j, (r, t, x) in enumerate(zip(alive, tok.tolist(), lp.tolist(), strict=True)):
                tokens[r].append(t)
                logprobs[r].append(x)
                if t in stops[r]:
                    ends[r] = ("stop", stops[r][t])
                elif len(tokens[r]) < params[r].max_new_tokens:
                    keep.append(j)
            if len(keep) < len(alive):
                kept = set(keep)
                done = [j for j in range(len(alive)) if j not in kept]
                self._keep_cached(cache, mask, [alive[j] for j in done], done, states, tokens, not keep)
            if not keep:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, tok, temperature, top_p = mask[sel], tok[sel], temperature[sel], top_p[sel]
                sel_cpu = sel.cpu()
                text_pos, rope_pos = text_pos[sel_cpu], rope_pos[sel_cpu]
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            pos = torch.stack([text_pos, rope_pos, rope_pos, rope_pos])[:, :, None].to(dev)
            res = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{CACHE_ARG: cache},
            )
            self._tls.stats.decode_steps += 1
            cache = kv_cache(res)
            logits = res.logits[:, -1].float()
            text_pos, rope_pos = text_pos + 1, rope_pos + 1
        self._tls.stats.sampled_tokens += sum(len(t) for t in tokens)
        return [
            Continuation(t, x, reason, stop)
            for t, x, (reason, stop) in zip(tokens, logprobs, ends, strict=True)
        ]

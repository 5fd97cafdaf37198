"""Tests for the local KV-cached Qwen3-VL generator on the tiny model.

Guarantees checked: behaviour logprobs equal a fresh full forward's log_softmax(logits / T) (also
after an image observation and under left padding), forks prefill their shared prefix once and
sample exactly what from-scratch sampling samples, the loop runs end to end on the model, and
cross-turn KV reuse (`local.kv_reuse`) samples the same tokens and logprobs as re-prefilling every
turn (with prefills attending grouped, `local.attention`, against transformers' sdpa), keeps no
cache past a finished trajectory or a `run_rollouts` call, and none across threads, and a cache
grown in place decodes what transformers' copy-per-step cache decodes.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import replace

import pytest
import torch
from image_helpers import random_image as _image
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, Generator, SamplingParams, run_rollouts
from axpo_nemo.agent.protocol import ChatProtocol, ToolResponse, format_assistant_turn
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.agent.trajectory import TrajectoryState, fork_at_tool_call, to_rollouts
from axpo_nemo.core.rollout import RolloutBatch
from axpo_nemo.local import LocalGenerator, mrope_positions
from axpo_nemo.local import generator as generator_module
from axpo_nemo.local.kv_reuse import CachedContext, GrowingLayer, extract_row
from axpo_nemo.models import build_tiny_qwen3vl


class EchoTool:
    """Echoes its arguments and returns a crop of the question image."""

    name = "echo"

    def schema(self):
        return {"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text=f"echo {arguments}", images=[context.images[0].crop((0, 0, 64, 64))])


CALL = format_assistant_turn("Let me zoom in.", tool_calls=[("echo", {"text": "hi"})])


class ForcedFirstTurn:
    """Turn 0 of a fresh state is a scripted tool call; everything else comes from ``inner``."""

    def __init__(self, inner, tokenizer, text=CALL):
        self.inner = inner
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, states, params):
        out: list[Continuation | None] = [None] * len(states)
        rest = [i for i, s in enumerate(states) if s.num_turns or s.open_turn_tokens]
        for i, _s in enumerate(states):
            if i not in rest:
                out[i] = Continuation(list(self.ids), [0.0] * len(self.ids), "stop", "</tool_call>")
        if rest:
            params = params if isinstance(params, SamplingParams) else [params[i] for i in rest]
            for i, c in zip(rest, self.inner.generate([states[i] for i in rest], params), strict=True):
                out[i] = c
        return out


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


@pytest.fixture(scope="module")
def bundle():
    return build_tiny_qwen3vl(seed=0)


@pytest.fixture(scope="module")
def proto(bundle):
    return ChatProtocol(bundle.processor)


@pytest.fixture(scope="module")
def prompt(proto):
    return proto.build_prompt("What does the sign say?", [_image(120, 90, 1)], [EchoTool()])


def full_forward_logprobs(model, state: TrajectoryState, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of every token given its prefix, from one uncached forward."""
    inputs = state.model_inputs()
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return torch.cat([torch.zeros(1), logp.gather(1, inputs["input_ids"][0, 1:, None])[:, 0]])


def state_with_image_observation(proto, prompt, seed=0) -> TrajectoryState:
    """prompt, a scripted tool-call turn, then an observation holding an image."""
    state = TrajectoryState.from_prompt(prompt, seed=seed, index=seed)
    ids = proto.tokenizer(CALL, add_special_tokens=False)["input_ids"]
    state.append_generated(ids, [0.0] * len(ids))
    state.close_turn("stop", "</tool_call>", proto.parse_turn(CALL))
    crop = proto.process_image(_image(80, 64, 7))
    state.append_observation(proto.render_observation([ToolResponse("a crop", [crop])]))
    return state


def test_mrope_positions_match_transformers(bundle, proto, prompt):
    state = state_with_image_observation(proto, prompt)
    inputs = state.model_inputs()
    ref, _ = bundle.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    assert len(state.images) == 2
    assert torch.equal(mrope_positions(len(state), state.images, 2), ref[:, 0])


def test_logprobs_equal_full_forward_in_a_padded_batch(bundle, proto, prompt):
    """Three contexts of different lengths (so left padding), one after an image observation."""
    after_image = state_with_image_observation(proto, prompt, seed=0)
    fresh = TrajectoryState.from_prompt(prompt, seed=1)
    text_only = TrajectoryState.from_prompt(proto.build_prompt("Hi", [], [EchoTool()]), seed=2)
    states = [after_image, fresh, text_only]
    gen = LocalGenerator.from_bundle(bundle)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    for s, c in zip(states, gen.generate(states, params), strict=True):
        n = len(c.token_ids)
        assert 1 <= n <= 12 and len(c.logprobs) == n
        s.append_generated(c.token_ids, c.logprobs)
        ref = full_forward_logprobs(bundle.model, s, temperature=0.7)[-n:]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)
    assert gen.stats.prefill_sequences == 3 and gen.stats.shared_rows == 0


def test_an_image_several_contexts_show_goes_through_the_vision_tower_once(bundle, proto, prompt, monkeypatch):
    other = proto.build_prompt("What colour is the sign?", [_image(120, 90, 1)], [EchoTool()])
    states = [state_with_image_observation(proto, p) for p in (prompt, other)]  # 4 slots, 2 images
    encoder = bundle.model.model.get_image_features
    seen = []

    def spy(pixel_values, image_grid_thw, **kwargs):
        seen.append(len(image_grid_thw))
        return encoder(pixel_values, image_grid_thw, **kwargs)

    monkeypatch.setattr(bundle.model.model, "get_image_features", spy)
    params = SamplingParams(max_new_tokens=5, temperature=0.7, seed=3, ignore_eos=True, stop_token_texts=())
    out = LocalGenerator.from_bundle(bundle).generate(states, params)
    monkeypatch.undo()
    assert seen == [2]
    for s, c in zip(states, out, strict=True):
        s.append_generated(c.token_ids, c.logprobs)
        ref = full_forward_logprobs(bundle.model, s, temperature=0.7)[-5:]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_samples_do_not_depend_on_batch_composition(bundle, proto, prompt):
    target = state_with_image_observation(proto, prompt, seed=5)
    others = [TrajectoryState.from_prompt(prompt, seed=i) for i in range(3)]
    params = SamplingParams(max_new_tokens=10, seed=1, ignore_eos=True, stop_token_texts=())
    gen = LocalGenerator.from_bundle(bundle)
    (alone,) = gen.generate([target], params)
    batched = gen.generate([others[0], target, *others[1:]], params)[1]
    assert alone.token_ids == batched.token_ids
    torch.testing.assert_close(
        torch.tensor(alone.logprobs), torch.tensor(batched.logprobs), atol=1e-4, rtol=0
    )
    chunked = LocalGenerator.from_bundle(bundle, max_batch_size=2, prefill_batch_size=1)
    assert chunked.generate([*others, target], params)[3].token_ids == alone.token_ids
    assert chunked.stats.prefill_calls == 3  # batches {o, o} and {o, target}: 1 + 2 one-row prefills
    (again,) = gen.generate([target], params)
    assert again.token_ids == alone.token_ids  # deterministic
    (other_seed,) = gen.generate([target], SamplingParams(max_new_tokens=10, seed=2, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_two_threads_may_generate_at_once(bundle, prompt):
    # The trainer's speculative wave samples on a second thread while the originals decode.
    import threading

    params = SamplingParams(max_new_tokens=12, seed=1, ignore_eos=True, stop_token_texts=())
    gen = LocalGenerator.from_bundle(bundle)
    first = [TrajectoryState.from_prompt(prompt, seed=i) for i in range(3)]
    second = [TrajectoryState.from_prompt(prompt, seed=10 + i) for i in range(2)]
    solo = [c.token_ids for c in gen.generate(first + second, params)]
    solo_steps = gen.last_call_stats.decode_steps
    gen.stats.reset()
    results, work = {}, {}

    def run(name, states):
        results[name] = [c.token_ids for c in gen.generate(states, params)]
        work[name] = gen.last_call_stats  # this thread's own call
    threads = [threading.Thread(target=run, args=a) for a in (("a", first), ("b", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] + results["b"] == solo
    assert work["a"].sampled_tokens == 36 and work["b"].sampled_tokens == 24
    assert work["a"].decode_steps == work["b"].decode_steps == solo_steps == 11
    assert gen.stats.generate_calls == 2 and gen.stats.sampled_tokens == 60 and gen.stats.decode_steps == 22


def test_forks_prefill_the_prefix_once_and_match_scratch(bundle, proto, prompt):
    source = TrajectoryState.from_prompt(prompt, seed=0, index=0)
    gen = LocalGenerator.from_bundle(bundle)
    run_rollouts(
        [source],
        ForcedFirstTurn(gen, proto.tokenizer),
        [EchoTool()],
        AgentLoopConfig(max_turns=1),
        protocol=proto,
    )
    assert source.finish_reason == "max_turns"
    k = 4
    forks = fork_at_tool_call(source, k)
    scratch = [copy.deepcopy(f) for f in forks]  # same tokens / seeds, separate image objects
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)

    gen.stats.reset()
    shared = gen.generate(forks, params)
    assert (
        gen.stats.prefill_calls == 1 and gen.stats.prefill_sequences == 1 and gen.stats.shared_rows == k - 1
    )
    assert gen.stats.prefill_tokens == forks[0].prefix_len

    alone = LocalGenerator.from_bundle(bundle, share_prefixes=False)
    separate = [alone.generate([s], params)[0] for s in scratch]
    assert alone.stats.prefill_sequences == k and alone.stats.prefill_tokens == k * forks[0].prefix_len
    for a, b in zip(shared, separate, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert len({tuple(c.token_ids) for c in shared}) > 1  # different seeds, different samples


def test_stop_tokens_and_per_state_budgets(bundle, prompt):
    gen = LocalGenerator.from_bundle(bundle)
    state = TrajectoryState.from_prompt(prompt)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_texts=(), ignore_eos=True)
    (c,) = gen.generate([state], greedy)
    assert c.stop_reason == "length" and len(c.token_ids) == 6
    stop_text = bundle.tokenizer.convert_ids_to_tokens(c.token_ids[2])
    stopping = SamplingParams(
        max_new_tokens=6, temperature=0.0, stop_token_texts=(stop_text,), ignore_eos=True
    )
    short, stopped = gen.generate(
        [state, state], [SamplingParams(max_new_tokens=2, temperature=0.0), stopping]
    )
    first = c.token_ids.index(c.token_ids[2])
    assert stopped.token_ids == c.token_ids[: first + 1]
    assert (stopped.stop_reason, stopped.stop_token) == ("stop", stop_text)
    assert short.token_ids == c.token_ids[:2] and short.stop_reason == "length"
    (empty,) = gen.generate([state], SamplingParams(max_new_tokens=0))
    assert empty == Continuation([], [], "length")
    assert isinstance(gen, Generator)


def test_end_to_end_loop_on_the_tiny_model(bundle, proto, prompt):
    other = proto.build_prompt("How many cats?", [_image(64, 64, 2)], [EchoTool()])
    states = [
        TrajectoryState.from_prompt(p, group=g, seed=10 * g + i, index=2 * g + i)
        for g, p in enumerate([prompt, other])
        for i in range(2)
    ]
    gen = LocalGenerator.from_bundle(bundle)
    cfg = AgentLoopConfig(max_turns=3, max_new_tokens=24, max_total_tokens=1024, seed=7)
    run_rollouts(states, ForcedFirstTurn(gen, proto.tokenizer), [EchoTool()], cfg, protocol=proto)
    assert all(s.finished for s in states)
    assert gen.stats.shared_rows >= 2  # the two rollouts of each question share turn 1's context
    for s in states:
        assert s.tool_calls[0].error is None and s.tool_calls[0].num_images == 1
        assert 2 <= s.num_turns <= 3 and len(s.images) >= 2
    # the model's own tokens (turn 1 on) carry its behaviour logprobs, after the image observation
    s = states[0]
    ref = full_forward_logprobs(bundle.model, s, temperature=1.0)
    model_tokens = torch.zeros(len(s), dtype=torch.bool)
    model_tokens[s.turns[1].start :] = torch.tensor(s.generated[s.turns[1].start :])
    torch.testing.assert_close(torch.tensor(s.logprobs)[model_tokens], ref[model_tokens], atol=1e-4, rtol=0)

    forks = fork_at_tool_call(states[0], 2)
    run_rollouts(forks, gen, [EchoTool()], cfg, protocol=proto)
    rollouts = to_rollouts(states) + to_rollouts(forks, lambda s: (1.0, True))
    batch = RolloutBatch.from_rollouts(rollouts, pad_id=bundle.tokenizer.pad_token_id)
    assert batch.num_rows == 6 and batch.tool_using[:4].all()
    assert batch.source.tolist() == [-1, -1, -1, -1, 0, 0]


def test_a_sampled_image_pad_token_does_not_break_the_next_prefill():
    # The policy can sample <|image_pad|>; image features must follow the slots, not the token id.
    bundle = build_tiny_qwen3vl(seed=0)
    proto = ChatProtocol(bundle.processor)
    state = TrajectoryState.from_prompt(proto.build_prompt("hi", [Image.new("RGB", (64, 64))], []))
    pad = proto.token_id("<|image_pad|>")
    state.append_generated([pad, pad], [0.0, 0.0])
    (out,) = LocalGenerator.from_bundle(bundle).generate([state], SamplingParams(4, 1.0, 1.0, ("<|im_end|>",), 0))
    assert 1 <= len(out.token_ids) <= 4


ZOOM_CALL = format_assistant_turn("Closer.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})])


class SampledThenZoom:
    """The model samples each turn; a scripted ``image_zoom_in`` call is appended to some turns.

    A state's turn t < 2 samples ``2 + seed % 4`` tokens (stop tokens off) and then calls the tool,
    except turn 1 of a state whose seed is a multiple of 3, which samples with the loop's own
    params, calls nothing and so ends the trajectory early. Turn 2 is always the loop's own. The
    scripted call follows sampled tokens, so the next turn's cached prefix ends inside the turn.
    ``calls`` records each inner call's work, the KV entries held right after it (trajectory
    ids) and the call's trajectories (ids).
    """

    def __init__(self, inner: LocalGenerator, tokenizer):
        self.inner = inner
        self.ids = tokenizer(ZOOM_CALL, add_special_tokens=False)["input_ids"]
        self.calls: list[tuple[object, list[int], list[int]]] = []

    def rollout_session(self):
        """The inner generator's session (its caches across turns)."""
        return self.inner.rollout_session()

    def generate(self, states, params):
        """Sampled turns, with the scripted call appended where the class docstring says."""
        params = [params] * len(states) if isinstance(params, SamplingParams) else list(params)
        scripted = [s.num_turns == 0 or (s.num_turns == 1 and s.seed % 3 != 0) for s in states]
        asked = [
            replace(p, max_new_tokens=2 + s.seed % 4, stop_token_texts=(), ignore_eos=True) if call else p
            for s, p, call in zip(states, params, scripted, strict=True)
        ]
        out = self.inner.generate(states, asked)
        store = getattr(self.inner._tls, "turn_caches", None)
        held = [] if store is None else [id(s) for s, _ in store._entries.values()]
        self.calls.append((self.inner.last_call_stats, held, [id(s) for s in states]))
        return [
            Continuation(c.token_ids + self.ids, c.logprobs + [0.0] * len(self.ids), "stop", "</tool_call>")
            if call
            else c
            for c, call in zip(out, scripted, strict=True)
        ]


def assert_same_rollouts(got_states, ref_states, ties: int = 1, atol: float = 1e-4) -> None:
    """Token for token the same rollouts with logprobs equal to ``atol``, but for float ties.

    The tiny random model's next-token distribution is nearly uniform, so two tokens' probabilities
    can differ by less than float rounding (1e-9): the sampler's descending sort may then order them
    differently on two computations of the same logits and pick the other one. At most ``ties`` rows
    may part ways, each at a sampled token whose logprob equals the reference's token's to 1e-4 (a
    tie), after identical tokens and logprobs.
    """
    parted = 0
    for got, ref in zip(got_states, ref_states, strict=True):
        lp, ref_lp = torch.tensor(got.logprobs), torch.tensor(ref.logprobs)
        if got.token_ids == ref.token_ids:
            assert (got.finish_reason, len(got.images)) == (ref.finish_reason, len(ref.images))
            torch.testing.assert_close(lp, ref_lp, atol=atol, rtol=0)
            continue
        parted += 1
        j = next(i for i, (a, b) in enumerate(zip(got.token_ids, ref.token_ids, strict=False)) if a != b)
        assert got.generated[j] and ref.generated[j] and got.logprobs[j] != 0.0
        torch.testing.assert_close(lp[: j + 1], ref_lp[: j + 1], atol=atol, rtol=0)
    assert parted <= ties


def _zoom_rollouts(bundle, proto, reuse: bool, **generator_kwargs):
    """Five 3-turn zoom rollouts of two questions (different lengths), then forks of two of them.

    ``reuse=False`` is the generator as it was before cross-turn reuse: every turn re-prefills its
    context, decoding copies the cache at every step and prefills attend with transformers' sdpa.
    """
    if not reuse:
        generator_kwargs.update(grow_cache_in_place=False, grouped_attention=False)
    zoom = ImageZoomTool()
    prompts = [
        proto.build_prompt("What does the sign say?", [_image(120, 90, 1)], [zoom]),
        proto.build_prompt("How many dots are in this much longer question?", [_image(96, 96, 2)], [zoom]),
    ]
    states = [TrajectoryState.from_prompt(prompts[i % 2], group=i % 2, seed=i, index=i) for i in range(5)]
    gen = LocalGenerator.from_bundle(bundle, reuse_kv=reuse, **generator_kwargs)
    cfg = AgentLoopConfig(max_turns=3, max_new_tokens=20, max_total_tokens=2048, temperature=0.8, seed=7)
    wrapper = SampledThenZoom(gen, proto.tokenizer)
    run_rollouts(states, wrapper, [zoom], cfg, protocol=proto)
    forks = fork_at_tool_call(states[1], 3) + fork_at_tool_call(states[2], 2)
    fork_wrapper = SampledThenZoom(gen, proto.tokenizer)
    run_rollouts(forks, fork_wrapper, [zoom], cfg, protocol=proto)
    return states, forks, wrapper.calls, fork_wrapper.calls, gen


@pytest.mark.parametrize(
    ("batching", "room"),
    [({}, 512), ({"max_batch_size": 3, "prefill_batch_size": 2}, 2)],
    ids=["one-batch", "chunked-small-room"],
)
def test_cross_turn_kv_reuse_matches_reprefill(bundle, proto, batching, room, monkeypatch):
    monkeypatch.setattr(generator_module, "_ROOM", room)  # 2: the caches grow while decoding
    states, forks, calls, fork_calls, _ = _zoom_rollouts(bundle, proto, reuse=True, **batching)
    ref_states, ref_forks, ref_calls, _, _ = _zoom_rollouts(bundle, proto, reuse=False, **batching)
    assert {s.finish_reason for s in states} == {"length"} and {s.num_turns for s in states} == {2, 3}
    assert {len(s.images) for s in states} == {2, 3}  # zoomed images in the observations
    assert_same_rollouts(states + forks, ref_states + ref_forks)
    # turn 0 reuses nothing; later turns prefill only what follows each trajectory's cache
    assert calls[0][0].reused_tokens == 0 and all(c[0].reused_tokens > 0 for c in calls[1:])
    assert all(c[0].reused_tokens == 0 for c in ref_calls)
    for (c, *_), (r, *_) in zip(calls[1:], ref_calls[1:], strict=True):
        assert c.prefill_tokens + c.reused_tokens == r.prefill_tokens
        assert c.prefill_tokens < r.prefill_tokens / 3
    # the forks of one source share their prefix's prefill, then each reuses its own cache
    first = fork_calls[0][0]
    assert (first.prefill_sequences, first.shared_rows, first.reused_tokens) == (2, 3, 0)
    assert all(c[0].reused_tokens > 0 for c in fork_calls[1:])
    # the reused path's logprobs are the model's, after two image observations
    s = next(s for s in states if s.num_turns == 3)
    ref = full_forward_logprobs(bundle.model, s, temperature=0.8)
    sampled = torch.tensor(s.generated) & (torch.tensor(s.logprobs) != 0)
    torch.testing.assert_close(torch.tensor(s.logprobs)[sampled], ref[sampled], atol=1e-4, rtol=0)


def test_cross_turn_kv_reuse_is_token_for_token_the_same_in_float64(bundle, proto, sdpa_calls):
    # In float64 the two paths' logits differ by ~1e-15, far below any gap the float32 sampler
    # could see, so there are no ties to flip: every rollout, fork included, is the same token for
    # token and its logprobs agree to 1e-5. (In float32 a near-uniform random model can flip a tie:
    # test_cross_turn_kv_reuse_matches_reprefill allows one row.)
    def grouped() -> bool:  # a masked call that did not repeat the KV heads
        return any(c.get("enable_gqa") and c.get("attn_mask") is not None for c in sdpa_calls)

    double = replace(bundle, model=copy.deepcopy(bundle.model).double())
    states, forks, calls, *_ = _zoom_rollouts(double, proto, reuse=True)
    assert grouped()  # padded prefills attended grouped (local.attention)
    del sdpa_calls[:]
    ref_states, ref_forks, *_ = _zoom_rollouts(double, proto, reuse=False)
    assert not grouped()  # transformers' sdpa repeats the KV heads when there is a mask
    assert calls[1][0].reused_tokens > 0  # the reuse path ran
    assert_same_rollouts(states + forks, ref_states + ref_forks, ties=0, atol=1e-5)


def test_turn_caches_live_no_longer_than_their_trajectory_or_rollout_call(bundle, proto):
    states, forks, calls, fork_calls, gen = _zoom_rollouts(bundle, proto, reuse=True)
    # after each call the store holds exactly that call's rows: finished trajectories were dropped
    assert [len(held) for _, held, _ in calls] == [5, 5, 3]
    assert all(sorted(held) == sorted(rows) for _, held, rows in calls + fork_calls)
    assert getattr(gen._tls, "turn_caches", None) is None  # the session ended with run_rollouts
    (outside,) = gen.generate([copy.deepcopy(states[0])], SamplingParams(max_new_tokens=2))
    assert getattr(gen._tls, "turn_caches", None) is None and len(outside.token_ids) >= 1

    # two threads roll out at once, each with its own session: the same as one after the other
    results = {}

    def run(name):
        got, got_forks, *_ = _zoom_rollouts(bundle, proto, reuse=True)
        results[name] = [s.token_ids for s in got + got_forks]

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] == results["b"] == [s.token_ids for s in states + forks]


def test_a_cached_prefix_stops_where_the_state_differs(bundle, proto, prompt):
    state = state_with_image_observation(proto, prompt)
    entry = CachedContext(
        list(state.token_ids), CachedContext.slots_of(state), [torch.zeros(1, len(state), 1)], []
    )
    assert entry.usable_length(state) == len(state) - 1  # the last token is always fed again
    edited = copy.deepcopy(state)
    edited.token_ids[-5] += 1
    assert entry.usable_length(edited) == len(state) - 5
    obs = state.images[1]
    assert entry.usable_length(state_with_image_observation(proto, prompt, seed=1)) == len(state) - 1
    other = copy.deepcopy(state)  # same tokens, another image in the observation's slot
    other.images[1] = replace(obs, image=proto.process_image(_image(80, 64, 8)))
    assert entry.usable_length(other) == obs.start
    short = CachedContext(state.token_ids[: obs.start + 3], entry.slots, [], [])
    assert short.usable_length(state) == obs.start  # never ends inside an image

    # an edited turn is prefilled from where it differs, and samples what a full prefill samples
    params = SamplingParams(max_new_tokens=6, seed=4, ignore_eos=True, stop_token_texts=())
    runs = {}
    for reuse in (True, False):
        gen = LocalGenerator.from_bundle(bundle, reuse_kv=reuse)
        s = copy.deepcopy(state)
        with gen.rollout_session():
            (first,) = gen.generate([s], params)
            other = 7 if first.token_ids[3] != 7 else 8  # a token the model did not sample
            s.append_generated([*first.token_ids[:3], other], first.logprobs[:4])
            (second,) = gen.generate([s], params)
            runs[reuse] = (second, gen.last_call_stats)
    assert runs[True][0].token_ids == runs[False][0].token_ids
    torch.testing.assert_close(
        torch.tensor(runs[True][0].logprobs), torch.tensor(runs[False][0].logprobs), atol=1e-4, rtol=0
    )
    assert runs[True][1].reused_tokens == len(state) + 3 and runs[True][1].prefill_tokens == 1


def test_a_growing_layer_appends_in_place_and_grows_when_full():
    keys, values = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    layer = GrowingLayer.holding(keys, values, room=2)
    new = [(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)) for _ in range(2)]
    storage = layer.keys.untyped_storage().data_ptr()
    for k, v in new:
        layer.update(k, v)
    assert layer.keys.untyped_storage().data_ptr() == storage  # within its room: no copy
    big = (torch.randn(3, 2, 3, 5), torch.randn(3, 2, 3, 5))
    out_k, out_v = layer.update(*big)  # past its room: grows
    want_k = torch.cat([keys, new[0][0], new[1][0], big[0]], dim=-2)
    want_v = torch.cat([values, new[0][1], new[1][1], big[1]], dim=-2)
    assert torch.equal(out_k, want_k) and torch.equal(out_v, want_v) and layer.get_seq_length() == 9
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, want_k[[2, 0]]) and torch.equal(layer.values, want_v[[2, 0]])
    layer.update(torch.zeros(2, 2, 1, 5), torch.ones(2, 2, 1, 5))
    assert torch.equal(layer.keys[:, :, :9], want_k[[2, 0]]) and layer.values[:, :, 9].eq(1).all()


def test_a_kept_row_skips_the_batch_padding_and_is_a_view_only_when_asked():
    keys, values = torch.randn(2, 2, 9, 3), torch.randn(2, 2, 9, 3)
    layer = GrowingLayer.holding(keys, values, room=4)
    cache = type("Cache", (), {"layers": [layer]})()
    valid = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)  # left padding, a gap, a tail
    for copied in (False, True):
        got_k, got_v, runs = extract_row(cache, 1, valid, copy=copied)
        assert runs == ((0, 2), (3, 6))
        shares = got_k[0].untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr()
        assert shares != copied
        entry = CachedContext(list(range(5)), {}, got_k, got_v, runs)
        out_k, out_v = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
        entry.write_prefix(0, 4, out_k, out_v)  # a prefix that ends inside the second run
        assert torch.equal(out_k, keys[1][:, valid][:, :4]) and torch.equal(out_v, values[1][:, valid][:, :4])


def test_a_cache_grown_in_place_decodes_like_the_copying_cache(bundle, proto, prompt, monkeypatch):
    monkeypatch.setattr(generator_module, "_ROOM", 3)  # grow several times within the turn
    states = [
        state_with_image_observation(proto, prompt, seed=0),
        TrajectoryState.from_prompt(prompt, seed=1),
        TrajectoryState.from_prompt(proto.build_prompt("Hi", [], [EchoTool()]), seed=2),
    ]
    params = [
        SamplingParams(max_new_tokens=m, seed=5, ignore_eos=True, stop_token_texts=()) for m in (12, 4, 9)
    ]
    grown = LocalGenerator.from_bundle(bundle).generate(states, params)
    copied = LocalGenerator.from_bundle(bundle, grow_cache_in_place=False).generate(states, params)
    assert [len(c.token_ids) for c in grown] == [12, 4, 9]  # rows leave the batch at different steps
    for a, b in zip(grown, copied, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)

"""Benchmark the local generator: rollout tokens/s on the tiny Qwen3-VL, with and without forking.

Three batches of ``--batch`` rows sample ``--new-tokens`` tokens each (stop tokens off):

* ``distinct``: every row its own question (own image), so every row is prefilled;
* ``forked``: ``batch / k`` tool-call prefixes forked ``k`` times; each prefix is prefilled once
  and its KV cache expanded ``k`` times;
* ``forked-unshared``: the same forks with prefix sharing off (one prefill per row).

Usage: ``python tools/bench_generator.py [--batch 16] [--new-tokens 64] [--k 4] [--repeats 3]
[--threads 1] [--device auto]``. One CPU thread is the default: the tiny model gains nothing from
more, and on a busy machine OpenMP threads waiting on each other slow every step down.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from axpo_nemo.agent.loop import SamplingParams
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.trajectory import ToolCallRecord, TrajectoryState, fork_at_tool_call
from axpo_nemo.local import LocalGenerator
from axpo_nemo.models import build_tiny_qwen3vl, resolve_device

SCHEMA = {"type": "function", "function": {"name": "image_zoom_in", "parameters": {"type": "object"}}}


def _image(seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (112, 112, 3), generator=gen, dtype=torch.uint8).numpy())


def _source(proto: ChatProtocol, i: int) -> TrajectoryState:
    """A question whose first turn reached a tool call (ready to fork)."""
    prompt = proto.build_prompt(f"Question {i}: what is in the picture?", [_image(i)], [SCHEMA])
    state = TrajectoryState.from_prompt(prompt, seed=i, index=i)
    text = format_assistant_turn(
        "Let me look closer.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})]
    )
    ids = proto.tokenizer(text, add_special_tokens=False)["input_ids"]
    state.append_generated(ids, [0.0] * len(ids))
    parsed, spans = proto.parse_turn_tokens(ids)
    state.close_turn("stop", "</tool_call>", parsed)
    a, b = spans[0]
    state.tool_calls.append(
        ToolCallRecord(state.turn_start + a, state.turn_start + b, 0, parsed.tool_calls[0].name, {})
    )
    return state


def _run(gen: LocalGenerator, states, params, repeats: int) -> dict[str, float]:
    gen.generate(states[:2], SamplingParams(max_new_tokens=2))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        gen.stats.reset()
        t0 = time.perf_counter()
        out = gen.generate(states, params)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    tokens = sum(len(c.token_ids) for c in out)
    return {
        "seconds": best,
        "new_tokens": tokens,
        "tokens_per_s": tokens / best,
        "prefill_sequences": gen.stats.prefill_sequences,
        "prefill_tokens": gen.stats.prefill_tokens,
    }


def main() -> None:
    """Run the three scenarios and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = build_tiny_qwen3vl(seed=0)
    device = resolve_device(args.device)
    bundle.model.to(device)
    proto = ChatProtocol(bundle.processor)
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_token_texts=(), ignore_eos=True, seed=1)

    distinct = []
    for i in range(args.batch):
        s = _source(proto, i)
        distinct.append(fork_at_tool_call(s, 1)[0])  # same shape of context as the forks
    forks = [f for i in range(args.batch // args.k) for f in fork_at_tool_call(_source(proto, i), args.k)]

    rows = {
        "distinct": _run(LocalGenerator.from_bundle(bundle), distinct, params, args.repeats),
        "forked": _run(LocalGenerator.from_bundle(bundle), forks, params, args.repeats),
        "forked-unshared": _run(
            LocalGenerator.from_bundle(bundle, share_prefixes=False), forks, params, args.repeats
        ),
    }
    print(
        f"tiny Qwen3-VL on {device}, torch threads {torch.get_num_threads()}: batch {args.batch}, "
        f"{args.new_tokens} new tokens/row, k={args.k}, best of {args.repeats}"
    )
    print(
        f"{'scenario':<16} {'seconds':>8} {'tokens':>7} {'tok/s':>8} {'prefill seqs':>13} {'prefill toks':>13}"
    )
    for name, r in rows.items():
        print(
            f"{name:<16} {r['seconds']:>8.3f} {r['new_tokens']:>7d} {r['tokens_per_s']:>8.1f} "
            f"{r['prefill_sequences']:>13d} {r['prefill_tokens']:>13d}"
        )


if __name__ == "__main__":
    main()

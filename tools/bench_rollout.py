"""Benchmark multi-turn tool rollouts against single-turn rollouts of the same length, on the demo setup.

The demo config (`load_config("demo")`): its tiny Qwen3-VL, its tools (brief schemas) and its
rollout limits (3 turns of at most 96 new tokens), on questions with an image from the synthetic
task (`data.synth`, written to a temporary folder). ``B`` questions x ``N`` rollouts each
(default: the demo's 8 x 8).

* ``multi-turn``: 3 turns. In every turn the model samples ``--think`` tokens (default: the demo's
  ``rollout.max_new_tokens``; stop tokens off). A random tiny model never writes a tool call, so
  turns 0 and 1 then get a scripted ``image_zoom_in`` call appended (about 50 tokens, which a
  trained model would have decoded and this benchmark prefills instead), which the real tool
  runs: its crop comes back as an image observation (about 95 tokens with the image). The model's
  sampled text is cut before any special token it drew (those tokens were decoded all the same),
  as if its thinking ended there.
* ``single-turn``: one turn in which the model samples ``3 x --think`` tokens: the same number of
  decoded tokens per rollout, and no observation to prefill. With ``--count-calls`` it samples the
  scripted calls' tokens too (a trained model decodes its calls): the same number of assistant
  tokens per rollout.

Each mode runs on several generator configurations (``--configs``, default all but ``grow``):

* ``before``: the generator as it was: every turn re-prefills its whole context
  (``reuse_kv=False``) and decoding appends to transformers' ``DynamicCache``, which copies the
  whole cache at every step (``grow_cache_in_place=False``);
* ``reuse``: cross-turn KV reuse only (each turn prefills only what follows the trajectory's cache);
* ``grow``: in-place cache growth only;
* ``after``: both (the generator's defaults).

The runs alternate within each repeat (so load drift on a shared machine hits all alike), after
one untimed round of every run at full batch. Per run: the median wall time of ``run_rollouts``
over the repeats, the median CPU time of this process (steadier than wall time on a shared
machine), decoded tokens/s (wall), and the generator's prefilled and reused tokens; then, per
configuration, the multi-turn / single-turn time ratio in wall and CPU time, and the multi-turn
speed-up over ``before``. The last line is the wall-time ratio of the last configuration given
(``after`` by default). It also says whether every configuration's multi-turn rollouts came out
token for token the same as ``before``'s (a near-tie in the sampler's sort can flip one token of a
random tiny model's near-uniform distribution: float rounding, as with another batch composition).

Usage: ``python tools/bench_rollout.py [--quick] [--b 8] [--n 8] [--think 96] [--repeats 3]
[--configs before,reuse,after] [--threads 1] [--device cpu]``. ``--quick`` runs 4 x 4 rollouts
(same tokens per turn).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, per_state_params, run_rollouts
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.sample import read_samples
from axpo_nemo.agent.tools.registry import build_tools
from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed
from axpo_nemo.config import load_config
from axpo_nemo.data.synth import synthesize
from axpo_nemo.local import LocalGenerator
from axpo_nemo.models import build_policy, resolve_device

BOXES = ([0, 0, 500, 500], [250, 250, 750, 750])
CONFIGS = {
    "before": {"reuse_kv": False, "grow_cache_in_place": False},
    "reuse": {"reuse_kv": True, "grow_cache_in_place": False},
    "grow": {"reuse_kv": False, "grow_cache_in_place": True},
    "after": {"reuse_kv": True, "grow_cache_in_place": True},
}


def zoom_calls(tokenizer) -> list[list[int]]:
    """The token ids of the scripted ``image_zoom_in`` calls, one per box of ``BOXES``."""
    return [
        tokenizer(
            format_assistant_turn("Let me zoom in.", tool_calls=[("image_zoom_in", {"bbox_2d": box})]),
            add_special_tokens=False,
        )["input_ids"]
        for box in BOXES
    ]


class ThinkThenZoom:
    """The model samples ``think`` tokens each turn; every turn but the last then calls the zoom tool.

    Forwards ``rollout_session`` to the generator, so `run_rollouts` keeps its KV caches across
    turns when the generator reuses them. Counts the generator's work over the calls it makes.
    """

    def __init__(self, inner: LocalGenerator, tokenizer, think: int, turns: int) -> None:
        """Wrap ``inner``; ``think`` tokens sampled per turn, ``turns`` turns per trajectory."""
        self.inner, self.think, self.turns = inner, think, turns
        self.calls = zoom_calls(tokenizer)
        self.special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.work: dict[str, int] = {}

    def rollout_session(self):
        """The inner generator's session (cross-turn KV reuse)."""
        return self.inner.rollout_session()

    def generate(self, states, params):
        """Sample ``think`` tokens per state, cut before a special token, then append the call."""
        asked = [
            replace(p, max_new_tokens=self.think, stop_token_texts=(), ignore_eos=True)
            for p in per_state_params(states, params)
        ]
        out = self.inner.generate(states, asked)
        for name, value in self.inner.last_call_stats.as_dict().items():
            self.work[name] = self.work.get(name, 0) + value
        result = []
        for s, c in zip(states, out, strict=True):
            cut = next((i for i, t in enumerate(c.token_ids) if t in self.special), len(c.token_ids))
            ids, logprobs = list(c.token_ids[:cut]), list(c.logprobs[:cut])
            if s.num_turns + 1 < self.turns:
                call = self.calls[s.num_turns % len(self.calls)]
                result.append(Continuation(ids + call, logprobs + [0.0] * len(call), "stop", "</tool_call>"))
            else:
                result.append(Continuation(ids, logprobs, "length"))
        return result


def _run(
    config: str,
    multi: bool,
    bundle,
    prompts,
    tools,
    loop: AgentLoopConfig,
    think: int,
    n: int,
    seed: int,
    extra: int,
) -> dict:
    gen = LocalGenerator.from_bundle(bundle, **CONFIGS[config])
    turns = loop.max_turns if multi else 1
    wrapper = ThinkThenZoom(gen, bundle.tokenizer, think if multi else think * loop.max_turns + extra, turns)
    states = [
        TrajectoryState.from_prompt(p, group=g, seed=derive_seed("bench", seed, g, i), index=g * n + i)
        for g, p in enumerate(prompts)
        for i in range(n)
    ]
    cfg = replace(loop, max_turns=turns)
    t0, cpu0 = time.perf_counter(), time.process_time()
    run_rollouts(states, wrapper, tools, cfg, protocol=ChatProtocol(bundle.processor))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        "rows": [s.token_ids for s in states],
        "decoded": wrapper.work["sampled_tokens"],
        "prefill_tokens": wrapper.work["prefill_tokens"],
        "reused_tokens": wrapper.work["reused_tokens"],
        "images": sum(len(s.images) for s in states),
    }


def main() -> None:
    """Run every (configuration, mode) pair interleaved and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 questions x 4 rollouts")
    parser.add_argument("--b", type=int, default=None, help="questions (default: rollout.questions_per_step)")
    parser.add_argument(
        "--n", type=int, default=None, help="rollouts per question (default: rollout.group_size)"
    )
    parser.add_argument(
        "--think", type=int, default=None, help="tokens sampled per turn (default: rollout.max_new_tokens)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--configs", default="before,reuse,after", help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--count-calls",
        action="store_true",
        help="single-turn rollouts also sample the scripted calls' tokens",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    cfg = load_config("demo")
    b = args.b or (4 if args.quick else cfg.rollout.questions_per_step)
    n = args.n or (4 if args.quick else cfg.rollout.group_size)
    think = args.think or cfg.rollout.max_new_tokens

    data_dir = Path(tempfile.mkdtemp(prefix="axpo-bench-rollout-"))
    synthesize(replace(cfg.data.synth, num_sft=0, num_eval=0), data_dir)
    questions = [q for q in read_samples(data_dir / cfg.data.rl_file) if q.images][:b]
    tools = build_tools(
        replace(cfg.tools, search=replace(cfg.tools.search, corpus_path=str(data_dir / "corpus.jsonl")))
    )
    bundle = build_policy(cfg.model, seed=cfg.seed)
    bundle.model.to(resolve_device(args.device))
    protocol = ChatProtocol(bundle.processor)
    prompts = [
        protocol.build_prompt(q.question, q.load_images(data_dir), list(tools.values())) for q in questions
    ]
    extra = (
        sum(len(c) for c in zoom_calls(bundle.tokenizer)[: cfg.rollout.max_turns - 1])
        if args.count_calls
        else 0
    )
    loop = AgentLoopConfig.from_rollout_config(
        cfg.rollout, max_new_tokens=think * cfg.rollout.max_turns + extra
    )
    keys = [(c, multi) for c in configs for multi in (False, True)]
    runs: dict[tuple[str, bool], list[dict]] = {k: [] for k in keys}
    try:
        for c, multi in keys:  # untimed warm-up at full batch
            _run(c, multi, bundle, prompts, tools, loop, 2, n, args.seed, 0)
        for _ in range(args.repeats):
            for c, multi in keys:
                runs[c, multi].append(
                    _run(c, multi, bundle, prompts, tools, loop, think, n, args.seed, extra)
                )
    finally:
        tools.close()

    print(
        f"demo model on {args.device}, threads={args.threads}: {len(prompts)} questions x {n} rollouts, "
        f"{loop.max_turns} turns x {think} tokens (single turn: {think * loop.max_turns + extra}), "
        f"median of {args.repeats} interleaved repeats"
    )
    header = f"{'config':<7} {'mode':<12} {'wall_s':>7} {'cpu_s':>7} {'tokens/s':>9} {'decoded':>8} {'prefilled':>9}"
    print(header + f" {'reused':>8} {'images':>6}")
    wall = {k: statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    cpu = {k: statistics.median(r["cpu_s"] for r in rs) for k, rs in runs.items()}
    for c, multi in keys:
        r = runs[c, multi][-1]
        print(
            f"{c:<7} {'multi-turn' if multi else 'single-turn':<12} {wall[c, multi]:>7.2f} {cpu[c, multi]:>7.2f} "
            f"{r['decoded'] / wall[c, multi]:>9.1f} {r['decoded']:>8d} {r['prefill_tokens']:>9d} "
            f"{r['reused_tokens']:>8d} {r['images']:>6d}"
        )
    base = configs[0]
    for c in configs:
        line = (
            f"{c:<7} multi-turn/single-turn time ratio: {wall[c, True] / wall[c, False]:.3f} wall, "
            f"{cpu[c, True] / cpu[c, False]:.3f} CPU"
        )
        if c != base:
            same = sum(
                a == b for a, b in zip(runs[c, True][-1]["rows"], runs[base, True][-1]["rows"], strict=True)
            )
            line += (
                f"; multi-turn {wall[base, True] / wall[c, True]:.2f}x faster than {base} "
                f"({cpu[base, True] / cpu[c, True]:.2f}x CPU), rollouts identical to {base}'s: {same}/{b * n}"
            )
        print(line)
    last = configs[-1]
    print(f"multi-turn/single-turn time ratio {wall[last, True] / wall[last, False]:.3f}")


if __name__ == "__main__":
    main()

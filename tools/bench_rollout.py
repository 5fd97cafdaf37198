"""Benchmark multi-turn tool rollouts against single-turn rollouts of the same length, on the demo setup.

The demo config (`load_config("demo")`): its tiny Qwen3-VL, its tools (brief schemas) and its
rollout limits (3 turns of at most 96 new tokens), on questions with an image from the synthetic
task (`data.synth`, written to a temporary folder). ``B`` questions x ``N`` rollouts each
(default: the demo's 8 x 8).

* ``multi-turn``: 3 turns. In every turn the model samples ``--think`` tokens (default: the demo's
  ``rollout.max_new_tokens``; special tokens masked out, so its thinking never ends early). A random
  tiny model never writes a tool call, so in turns 0 and 1 the scripted ``image_zoom_in`` call
  follows (about 50 tokens): by default (``--calls decode``) the generator decodes it token by
  token, each step's sampled token replaced by the call's next one, which is the work a trained
  model does when it writes its call; the real tool runs it, and its crop comes back as an image
  observation (about 95 tokens with the image).
* ``single-turn``: one turn in which the model samples as many tokens as a multi-turn rollout
  decodes (``3 x --think`` plus the calls' tokens): the same generated tokens per rollout, and no
  observation to prefill.

``--calls prefill`` is the earlier setting: the calls are appended after each turn's sampled tokens
(the text cut before any special token the model drew) and prefilled with the next turn's
observation, and single-turn rollouts sample ``3 x --think`` tokens, or with ``--count-calls``
the calls' tokens too.

Each mode runs on several generator configurations (``--configs``, default ``before,reuse,after``):

* ``before``: the generator as it was: every turn re-prefills its whole context
  (``reuse_kv=False``), decoding appends to transformers' ``DynamicCache``, which copies the
  whole cache at every step (``grow_cache_in_place=False``), and prefills attend with
  transformers' ``sdpa``, which copies each KV head per query head (``grouped_attention=False``);
* ``reuse``: cross-turn KV reuse only (each turn prefills only what follows the trajectory's cache);
* ``grow``: in-place cache growth only;
* ``reuse+grow``: both, prefills attending with transformers' ``sdpa``;
* ``after``: all three (the generator's defaults).

The runs alternate within each repeat (so load drift on a shared machine hits all alike), after
one untimed round of every run at full batch. Per run: the median wall time of ``run_rollouts``
over the repeats, the median CPU time of this process (steadier than wall time on a shared
machine), decoded tokens/s (wall), and the generator's prefilled and reused tokens; then, per
configuration, the multi-turn / single-turn time ratio in wall and CPU time, and the multi-turn
speed-up over ``before``. The ratio is the median over the repeats of each repeat's own ratio
(its multi-turn run against the single-turn run just before it), with the lowest and highest: on
a host whose speed drifts by a third from one minute to the next, a ratio of two medians taken
at different times moves more than the change being measured. The last line is that wall-time
ratio for the last configuration given (``after`` by default). It also says whether every configuration's multi-turn rollouts came out
token for token the same as ``before``'s (a near-tie in the sampler's sort can flip one token of a
random tiny model's near-uniform distribution: float rounding, as with another batch composition).

Usage: ``python tools/bench_rollout.py [--quick] [--b 8] [--n 8] [--think 96] [--repeats 3]
[--configs before,reuse,after] [--calls decode|prefill] [--count-calls] [--threads 1] [--device cpu]``. ``--quick`` runs 4 x 4 rollouts
(same tokens per turn).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import axpo_nemo.local.generator as generator_module
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
    "before": {"reuse_kv": False, "grow_cache_in_place": False, "grouped_attention": False},
    "reuse": {"reuse_kv": True, "grow_cache_in_place": False, "grouped_attention": False},
    "grow": {"reuse_kv": False, "grow_cache_in_place": True, "grouped_attention": False},
    "reuse+grow": {"reuse_kv": True, "grow_cache_in_place": True, "grouped_attention": False},
    "after": {"reuse_kv": True, "grow_cache_in_place": True, "grouped_attention": True},
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

    With ``decode_calls`` the generator decodes the call (`ScriptedSampler`); otherwise the call's
    tokens are appended to the turn's sampled ones and prefilled at the next turn. Forwards
    ``rollout_session`` to the generator, so `run_rollouts` keeps its KV caches across turns when
    the generator reuses them. Counts the generator's work over the calls it makes.
    """

    def __init__(self, inner: LocalGenerator, tokenizer, think: int, turns: int, decode_calls: bool) -> None:
        """Wrap ``inner``; ``think`` tokens sampled per turn, ``turns`` turns per trajectory."""
        self.inner, self.think, self.turns, self.decode_calls = inner, think, turns, decode_calls
        self.calls = zoom_calls(tokenizer)
        self.special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.sampler = ScriptedSampler(sorted(self.special))
        self.work: dict[str, int] = {}

    def rollout_session(self):
        """The inner generator's session (cross-turn KV reuse)."""
        return self.inner.rollout_session()

    def generate(self, states, params):
        """Sample ``think`` tokens per state, then the call (decoded, or appended)."""
        calls = [
            self.calls[s.num_turns % len(self.calls)] if s.num_turns + 1 < self.turns else [] for s in states
        ]
        if self.decode_calls:
            asked = [
                replace(
                    p,
                    max_new_tokens=self.think + len(call),
                    stop_token_texts=("</tool_call>",) if call else (),
                    ignore_eos=True,
                )
                for p, call in zip(per_state_params(states, params), calls, strict=True)
            ]
            with self.sampler.scripted(states, asked, self.think, calls):
                out = self.inner.generate(states, asked)
        else:
            asked = [
                replace(p, max_new_tokens=self.think, stop_token_texts=(), ignore_eos=True)
                for p in per_state_params(states, params)
            ]
            out = self.inner.generate(states, asked)
        for name, value in self.inner.last_call_stats.as_dict().items():
            self.work[name] = self.work.get(name, 0) + value
        if self.decode_calls:
            return out
        result = []
        for c, call in zip(out, calls, strict=True):
            cut = next((i for i, t in enumerate(c.token_ids) if t in self.special), len(c.token_ids))
            ids, logprobs = list(c.token_ids[:cut]), list(c.logprobs[:cut])
            if call:
                result.append(Continuation(ids + call, logprobs + [0.0] * len(call), "stop", "</tool_call>"))
            else:
                result.append(Continuation(ids, logprobs, "length"))
        return result


class ScriptedSampler:
    """Stands in for the generator's ``sample_tokens`` while a scripted call is decoded.

    Special tokens are masked out of every row's distribution (the thinking never ends early);
    after ``think`` sampled tokens, a row's token is replaced by its call's next one (logprob 0, as
    in the prefilled calls). The generator seeds one ``torch.Generator`` per row with
    `row_seed`; that seed identifies the row here, since the batch order changes as rows finish.
    """

    def __init__(self, special_ids: list[int]) -> None:
        """Mask ``special_ids`` while scripted."""
        self.special = torch.tensor(special_ids)
        self.rows: dict[int, list] = {}

    @contextlib.contextmanager
    def scripted(self, states, params, think: int, calls: list[list[int]]):
        """Route the generator's sampling through this object for one ``generate`` call."""
        self.rows = {
            generator_module.row_seed(s, p): [0, think, call] for s, p, call in zip(states, params, calls, strict=True)
        }
        original = generator_module.sample_tokens
        generator_module.sample_tokens = lambda *args: self(original, *args)
        try:
            yield
        finally:
            generator_module.sample_tokens = original

    def __call__(self, original, logits, temperature, top_p, generators):
        """Sample with special tokens masked, then put each scripted row's call token in place."""
        logits = logits.index_fill(1, self.special.to(logits.device), float("-inf"))
        tokens, logprobs = original(logits, temperature, top_p, generators)
        for j, g in enumerate(generators):
            row = self.rows[g.initial_seed()]
            step, think, call = row
            row[0] += 1
            if step >= think:
                tokens[j], logprobs[j] = call[step - think], 0.0
        return tokens, logprobs


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
    decode_calls: bool,
) -> dict:
    gen = LocalGenerator.from_bundle(bundle, **CONFIGS[config])
    turns = loop.max_turns if multi else 1
    wrapper = ThinkThenZoom(
        gen, bundle.tokenizer, think if multi else think * loop.max_turns + extra, turns, decode_calls
    )
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
        "--calls",
        choices=("decode", "prefill"),
        default="decode",
        help="decode the scripted calls token by token (a trained model's work), or prefill them",
    )
    parser.add_argument(
        "--count-calls",
        action="store_true",
        help="--calls prefill: single-turn rollouts also sample the scripted calls' tokens",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args.count_calls and args.calls != "prefill":
        parser.error("--count-calls applies to --calls prefill (decoded calls are always counted)")
    decode_calls = args.calls == "decode"
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
        if args.count_calls or decode_calls
        else 0
    )
    loop = AgentLoopConfig.from_rollout_config(
        cfg.rollout, max_new_tokens=think * cfg.rollout.max_turns + extra
    )
    keys = [(c, multi) for c in configs for multi in (False, True)]
    runs: dict[tuple[str, bool], list[dict]] = {k: [] for k in keys}
    try:
        for c, multi in keys:  # untimed warm-up at full batch
            _run(c, multi, bundle, prompts, tools, loop, 2, n, args.seed, extra, decode_calls)
        for _ in range(args.repeats):
            for c, multi in keys:
                runs[c, multi].append(
                    _run(c, multi, bundle, prompts, tools, loop, think, n, args.seed, extra, decode_calls)
                )
    finally:
        tools.close()

    print(
        f"demo model on {args.device}, threads={args.threads}: {len(prompts)} questions x {n} rollouts, "
        f"{loop.max_turns} turns x {think} tokens, calls {'decoded' if decode_calls else 'prefilled'} "
        f"(single turn: {think * loop.max_turns + extra}), "
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

    def paired(c: str, field: str) -> list[float]:
        return sorted(m[field] / s[field] for s, m in zip(runs[c, False], runs[c, True], strict=True))

    for c in configs:
        w, p = paired(c, "seconds"), paired(c, "cpu_s")
        line = (
            f"{c:<7} multi-turn/single-turn time ratio: {statistics.median(w):.3f} wall "
            f"({w[0]:.3f}-{w[-1]:.3f}), {statistics.median(p):.3f} CPU ({p[0]:.3f}-{p[-1]:.3f})"
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
    print(f"multi-turn/single-turn time ratio {statistics.median(paired(configs[-1], 'seconds')):.3f}")


if __name__ == "__main__":
    main()

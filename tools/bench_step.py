"""Benchmark one RL step of the local trainer: AXPO versus GRPO wall time at equal N.

Demo-sized setup: the tiny Qwen3-VL, B=8 questions x N=8 rollouts, K=4, r=0.25, up to 96 new
tokens per turn and 3 turns, on the synthetic tool task (`data.synth`) with the real tools
(``image_zoom_in``, sandboxed ``python``, BM25 ``search``). A random tiny model never writes a
well-formed tool call (and a few dozen SFT steps only teach it the markers, not valid JSON), so
with ``--scripted-calls p`` (default 0.5) a fraction p of the fresh rollouts of tool questions
open with the question's reference tool call, scripted, and an AXPO fork of one (cut after
``<tool_call>``) gets the call's body; the tools run for real and every later turn is sampled by
the model. Scripted tokens cost no decoding, in originals and forks alike; with
``--think-tokens L`` the model first samples up to L thinking tokens before a scripted call (a
Thinking model reasons before it acts), which originals decode and forks inherit with the prefix. ``--sft-steps``
optionally fine-tunes the model on the task's SFT trajectories first. The KL term is on
(``--kl-coef 0.01``, the paper's default) so every row is trained; with 0, rows without advantage
signal skip training, which on this task (the tiny model is never right) is nearly all of them.

Both algorithms start from the same weights and seeds (their first step samples identical
original rollouts); AXPO then resamples (at most r·B·N extra rollouts from frozen prefixes, each
prefix prefilled once) and trains on the extra rows. After one untimed step each (sandbox pool
start, caches), the algorithms alternate step by step so load drift on a shared machine hits
both alike, and each timed step starts every algorithm from the same weights (GRPO's), so their
original rollouts are identical and the ratio measures AXPO's own extra work
(``--independent`` lets them drift apart instead). Reported per step: time and its breakdown (rollout, resample, logprobs, train),
rows, tool use, triggered groups, prefixes, and the generator's prefilled tokens and rows that
reused a shared prefill; then the mean AXPO/GRPO step-time ratio (target <= 1.15), in wall time
and in this process's CPU time (which other processes on a shared machine disturb far less).

AXPO runs with speculative resampling (the trainer's default: the wave starts once every
original's first turn is done, on a second thread; `rl.speculative_resampling`);
``--no-speculation`` measures the sequential wave instead. ``--budget-matched`` adds GRPO with
N·(1+r) rollouts per question (``grpo_bm``).

Usage: ``python tools/bench_step.py [--steps 3] [--budget-matched] [--sft-steps 0]
[--max-new-tokens 96] [--scripted-calls 0.5] [--kl-coef 0.01] [--threads 1] [--device cpu]
[--think-tokens 0] [--independent] [--no-speculation] [--extra-prefixes N]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, SamplingParams
from axpo_nemo.agent.protocol import ChatProtocol, format_assistant_turn
from axpo_nemo.agent.sample import read_samples
from axpo_nemo.agent.tools.registry import ToolsConfig, build_tools
from axpo_nemo.agent.tools.search import SearchConfig
from axpo_nemo.agent.trajectory import derive_seed
from axpo_nemo.core import AdvantageConfig, AXPOConfig, LossConfig
from axpo_nemo.data.synth import SynthConfig, synthesize
from axpo_nemo.local import LocalGenerator
from axpo_nemo.local.rl import RLConfig, RLTrainer
from axpo_nemo.local.sft import SFTConfig, SFTTrainer
from axpo_nemo.models import build_tiny_qwen3vl, resolve_device

PHASES = ("rollout_s", "resample_s", "logprob_s", "train_s")


class ReferenceCalls:
    """Scripted tool calls around the tiny model (see the module docstring).

    A fraction p of the fresh rollouts of tool questions get the question's reference call as
    their first turn; an AXPO fork of such a rollout (cut right after ``<tool_call>``) gets the
    call's body. Everything else is sampled by ``inner``. Sampled turns are cut before any vision
    control token the model emits (`_without_vision_tokens`). Generator work is counted per
    phase: ``rollout`` (original rollouts) and ``resample`` (forks).
    """

    def __init__(self, inner: LocalGenerator, questions, tokenizer, p: float, think_tokens: int = 0) -> None:
        self.inner, self.p, self.think_tokens = inner, p, think_tokens
        names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        self.vision_ids = {tokenizer.convert_tokens_to_ids(n) for n in names}
        markers = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<|im_end|>", "<|im_start|>")
        self.special_ids = self.vision_ids | {tokenizer.convert_tokens_to_ids(n) for n in markers}
        self.call_open = tokenizer.convert_tokens_to_ids("<tool_call>")
        self.turns = {}
        for i, q in enumerate(questions):
            call = q.metadata.get("reference_call")
            if call:
                text = format_assistant_turn(
                    "I need the tool.", tool_calls=[(call["name"], call["arguments"])]
                )
                self.turns[i] = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.phase_stats: dict[str, Counter] = {"rollout": Counter(), "resample": Counter()}
        self.lock = threading.Lock()

    def rollout_session(self):
        """The inner generator's session: `run_rollouts` keeps each rollout's KV cache across turns."""
        return self.inner.rollout_session()

    def _scripted(self, state) -> list[int] | None:
        ids = self.turns.get(state.metadata.get("question"))
        if not ids:
            return None
        if state.source is not None:  # a fork at its <tool_call>: the call's body
            if state.num_turns == 0 and state.token_ids[-1] == self.call_open:
                return ids[ids.index(self.call_open) + 1 :]
            return None
        if state.num_turns or state.open_turn_tokens:
            return None
        return ids if (derive_seed("script", state.seed) % 1000) < self.p * 1000 else None

    def generate(self, states, params):
        """Scripted turns where drawn, the model's samples elsewhere."""
        params = [params] * len(states) if isinstance(params, SamplingParams) else list(params)
        out: list = [None] * len(states)
        rest, thinking = [], []
        for i, s in enumerate(states):
            ids = self._scripted(s)
            if ids is None:
                rest.append(i)
            else:  # behaviour logprobs vary by seed so that uncertainty ranks the candidates
                lp = -1.0 - (derive_seed("lp", s.seed) % 100) / 100
                out[i] = Continuation(list(ids), [lp] * len(ids), "stop", "</tool_call>")
                if self.think_tokens and s.source is None:
                    thinking.append(i)
        if thinking:  # the model thinks before its scripted call (forks reuse this from the prefix)
            think = replace(
                params[thinking[0]], max_new_tokens=self.think_tokens, stop_token_texts=(), ignore_eos=True
            )
            sampled = self._counted([states[i] for i in thinking], [think] * len(thinking))
            for i, c in zip(thinking, sampled, strict=True):
                cut = next((j for j, t in enumerate(c.token_ids) if t in self.special_ids), len(c.token_ids))
                call = out[i]
                out[i] = Continuation(
                    list(c.token_ids[:cut]) + call.token_ids,
                    list(c.logprobs[:cut]) + call.logprobs,
                    "stop",
                    "</tool_call>",
                )
        if rest:
            sampled = self._counted([states[i] for i in rest], [params[i] for i in rest])
            for i, c in zip(rest, sampled, strict=True):
                out[i] = self._without_vision_tokens(c)
        return out

    def _counted(self, states, params):
        sampled = self.inner.generate(states, params)
        phase = "resample" if any(s.source is not None for s in states) else "rollout"
        with self.lock:  # the speculative wave generates on its own thread
            self.phase_stats[phase].update(self.inner.last_call_stats.as_dict())
        return sampled

    def _without_vision_tokens(self, cont: Continuation) -> Continuation:
        # Work-around: LocalGenerator's prefill fails on a context holding an <|image_pad|> the
        # model sampled (its forward takes every pad id for an image), so such a turn is cut
        # just before the first vision token, as if it had hit its length limit.
        cut = next((j for j, t in enumerate(cont.token_ids) if t in self.vision_ids), None)
        if cut is None:
            return cont
        return Continuation(cont.token_ids[:cut], cont.logprobs[:cut], "length")


def _sft_warmup(bundle, data_dir: Path, tools, proto, loop: AgentLoopConfig, steps: int) -> None:
    samples = list(read_samples(data_dir / "sft.jsonl"))
    cfg = SFTConfig(steps=steps, lr=3e-3, warmup_steps=min(5, steps), batch_size=8, micro_batch_size=8)
    trainer = SFTTrainer(bundle, samples, data_dir, tools, proto, cfg, loop)
    t0 = time.perf_counter()
    history = trainer.train()
    print(
        f"SFT warm-up: {steps} steps on {len(trainer.examples)} trajectories in "
        f"{time.perf_counter() - t0:.1f} s, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}"
    )


def _trainer(
    algorithm: str, base, data_dir: Path, tools, loop: AgentLoopConfig, args, group_size: int
) -> RLTrainer:
    bundle = copy.deepcopy(base)
    questions = list(read_samples(data_dir / "rl.jsonl"))
    generator = LocalGenerator.from_bundle(bundle)
    reference = copy.deepcopy(base.model) if args.kl_coef > 0 else None
    return RLTrainer(
        bundle,
        reference,
        questions,
        data_dir,
        tools,
        ChatProtocol(bundle.processor),
        ReferenceCalls(generator, questions, bundle.tokenizer, args.scripted_calls, args.think_tokens),
        AXPOConfig(r=args.r, k=args.k),
        AdvantageConfig(),
        LossConfig(kl_coef=args.kl_coef),
        RLConfig(
            steps=args.steps,
            lr=1e-4,
            micro_batch_size=args.micro_batch_size,
            speculative_resampling=not args.no_speculation,
            **({} if args.extra_prefixes is None else {"speculative_extra_prefixes": args.extra_prefixes}),
            seed=0,
        ),
        loop,
        questions_per_step=args.b,
        group_size=group_size,
        algorithm=algorithm,
    )


def _timed_steps(trainers: dict[str, RLTrainer], steps: int, synced: bool) -> dict[str, list[dict]]:
    """Alternate the algorithms step by step (so machine-load drift hits both alike).

    ``synced``: every step starts each algorithm from GRPO's current weights, so all of them
    sample the same original rollouts and the ratio isolates AXPO's own work (the resample wave
    and its rows); otherwise each trains on, and their rollouts drift apart.
    """
    results: dict[str, list[dict]] = {alg: [] for alg in trainers}
    for _ in range(steps):
        weights = copy.deepcopy(trainers["grpo"].model.state_dict()) if synced else None
        for alg, trainer in trainers.items():
            if weights is not None:
                trainer.model.load_state_dict(weights)
            wrapper = trainer.generator
            for counter in wrapper.phase_stats.values():
                counter.clear()
            cpu0 = time.process_time()
            metrics = trainer.step()
            metrics["step_cpu_s"] = time.process_time() - cpu0
            for phase, counter in wrapper.phase_stats.items():
                metrics.update({f"{phase}_{k}": float(v) for k, v in counter.items()})
            results[alg].append(metrics)
    return results


def main() -> None:
    """Run both algorithms and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=3, help="timed RL steps per algorithm (after one untimed)"
    )
    parser.add_argument("--sft-steps", type=int, default=0)
    parser.add_argument("--scripted-calls", type=float, default=0.5)
    parser.add_argument(
        "--think-tokens",
        type=int,
        default=0,
        help="tokens the model samples (thinks) before a scripted call; forks reuse them as their prefix",
    )
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--r", type=float, default=0.25)
    parser.add_argument(
        "--budget-matched", action="store_true", help="also run GRPO with N·(1+r) rollouts per question"
    )
    parser.add_argument(
        "--kl-coef", type=float, default=0.01, help="0 lets zero-advantage rows skip training"
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--independent",
        action="store_true",
        help="let each algorithm train on from its own weights (default: every step starts from the same weights)",
    )
    parser.add_argument(
        "--no-speculation",
        action="store_true",
        help="AXPO without speculative resampling: the wave starts after the originals finish",
    )
    parser.add_argument(
        "--extra-prefixes",
        type=int,
        default=None,
        help="prefixes speculated beyond the budget (default: rl.speculative_extra_prefixes' default)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="reuse a synthesized dataset folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="axpo-bench-"))
    if not (data_dir / "rl.jsonl").exists():
        synthesize(SynthConfig(num_sft=64, num_rl=64, num_eval=0, tool_fraction=0.75), data_dir)
    tools = build_tools(
        ToolsConfig(
            enabled=["image_zoom_in", "python", "search"],
            search=SearchConfig(corpus_path=str(data_dir / "corpus.jsonl")),
        )
    )
    loop = AgentLoopConfig(
        max_turns=3, max_new_tokens=args.max_new_tokens, max_total_tokens=4096, max_images=4
    )
    base = build_tiny_qwen3vl(seed=0)
    base.model.to(resolve_device(args.device))
    try:
        if args.sft_steps:
            _sft_warmup(base, data_dir, tools, ChatProtocol(base.processor), loop, args.sft_steps)
        trainers = {alg: _trainer(alg, base, data_dir, tools, loop, args, args.n) for alg in ("grpo", "axpo")}
        if args.budget_matched:
            n_bm = round(args.n * (1 + args.r))
            trainers["grpo_bm"] = _trainer("grpo", base, data_dir, tools, loop, args, n_bm)
        for trainer in trainers.values():  # untimed: starts the sandbox pool, warms caches
            trainer.step()
        results = _timed_steps(trainers, args.steps, synced=not args.independent)
    finally:
        tools.close()

    print(
        f"\nB={args.b} N={args.n} K={args.k} r={args.r} max_new_tokens={args.max_new_tokens} "
        f"threads={args.threads} think_tokens={args.think_tokens} device={args.device} "
        f"weights={'independent' if args.independent else 'synced'} "
        f"speculation={'off' if args.no_speculation else 'on'}"
    )
    header = f"{'algorithm':<9} {'step':>4} {'step_s':>7} " + " ".join(f"{p:>10}" for p in PHASES)
    header += f" {'rows':>5} {'tool_use':>8} {'triggered':>9} {'prefixes':>8} {'speculated':>10} {'hits':>4}"
    print(header)
    for alg, steps in results.items():
        for m in steps:
            print(
                f"{alg:<9} {int(m['step']):>4} {m['step_s']:>7.2f} "
                + " ".join(f"{m[p]:>10.2f}" for p in PHASES)
                + f" {int(m['rows']):>5} {m['tool_use_rate']:>8.2f} {int(m['triggered_groups']):>9}"
                f" {int(m['prefixes_selected']):>8} {int(m['speculated_prefixes']):>10}"
                f" {int(m['speculation_hits']):>4}"
            )
    mean = {
        alg: {k: statistics.mean(m[k] for m in steps) for k in ("step_s", "step_cpu_s", *PHASES)}
        for alg, steps in results.items()
    }
    print("\ngenerator work per step (mean): decode steps / prefilled tokens / rows reusing a shared prefill")
    for alg, steps in results.items():
        parts = []
        for phase in ("rollout", "resample"):
            work = [
                statistics.mean(m.get(f"{phase}_{k}", 0.0) for m in steps)
                for k in ("decode_steps", "prefill_tokens", "shared_rows")
            ]
            parts.append(f"{phase}: " + " / ".join(f"{w:.0f}" for w in work))
        print(f"  {alg:<5} " + "   ".join(parts))
    print("\nmean seconds per step:")
    for alg, values in mean.items():
        print(f"  {alg:<5} " + "  ".join(f"{k}={v:.2f}" for k, v in values.items()))
    ratios = [a["step_s"] / g["step_s"] for a, g in zip(results["axpo"], results["grpo"], strict=True)]
    print("AXPO/GRPO step-time ratio per step: " + ", ".join(f"{x:.3f}" for x in ratios))
    print(
        f"AXPO/GRPO median step-time ratio: {statistics.median(ratios):.3f} (robust to a step slowed by other load)"
    )
    print(
        f"AXPO/GRPO mean step-time ratio: {mean['axpo']['step_s'] / mean['grpo']['step_s']:.3f} (target <= 1.15)"
    )
    cpu = mean["axpo"]["step_cpu_s"] / mean["grpo"]["step_cpu_s"]
    print(
        f"AXPO/GRPO mean step CPU-time ratio: {cpu:.3f} (this process's CPU seconds; steadier than wall time on a shared machine)"
    )
    rows = {alg: statistics.mean(m["rows"] for m in steps) for alg, steps in results.items()}
    print(f"AXPO/GRPO rows ratio: {rows['axpo'] / rows['grpo']:.3f} (extra rollouts at most r = {args.r})")
    if "grpo_bm" in mean:
        bm = mean["axpo"]["step_s"] / mean["grpo_bm"]["step_s"]
        print(f"AXPO / budget-matched GRPO (N={round(args.n * (1 + args.r))}) mean step-time ratio: {bm:.3f}")


if __name__ == "__main__":
    main()

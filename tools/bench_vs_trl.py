"""Benchmark this project's local GRPO step against TRL's ``GRPOTrainer`` (1.16) on the same Qwen3-VL.

Both trainers start from identical weights (the tiny Qwen3-VL of `build_tiny_qwen3vl`, or with
``--arch 2b`` a randomly initialised model of Qwen3-VL-2B's sizes) and run GRPO with the same B
questions x N rollouts, micro-batch, temperature, optimizer (AdamW, constant LR, gradient clipping
at 1.0) and loss (token-level PPO-clip normalised over the step's tokens: TRL's ``dapo``; clip
0.2 / 0.28), with no KL term (TRL's default ``beta=0``; ours ``loss.kl_coef=0``), no gradient
checkpointing and the given dtype (float32 on the CPU: TRL's ``bf16`` default is turned off).
Two workloads:

* ``single``: one turn per rollout, an image in every prompt, no tools.
* ``tools``: multi-turn tool rollouts: the first turn calls ``image_zoom_in`` (the project's tool,
  run for real on the question's image; TRL calls it through an environment whose method wraps
  it), the tool answers with an image, and a second turn answers. TRL masks the tool's tokens
  from the loss (``tool_mask``) as the project does (observations carry no loss).

A randomly initialised model never writes a tool call, so every turn is pinned: the model samples
exactly ``--think-tokens`` tokens (stop and end-of-sequence tokens off, control tokens suppressed
in TRL's ``generate`` and replaced by a plain token in ours), then a scripted tail is appended
without decoding: the tool call in a ``tools`` first turn, a boxed answer in its second, nothing
in ``single``. Both frameworks therefore decode the same number of tokens per rollout and train
on sequences of the same shape. The reward is a hash of the sampled tokens (a value in [0, 1), so
no group has zero variance and every row is trained in both frameworks; ours also has
``skip_zero_advantage`` off).

Timing: TRL runs its own ``Trainer.train`` loop; a callback runs one step of ours after each of
TRL's optimizer steps, so the two alternate step by step and load drift on a shared machine hits
both. The first ``--warmup`` steps of each are not timed. Per step: wall time and its parts,

* ``gen``: rollouts (prompt encoding, generation, tool calls, parsing). Ours: ``rollout_s``
  minus the reward; TRL: ``_generate``.
* ``score``: rewards and advantages, plus what each framework computes before the update.
  Ours: rewards and the old-policy logprob pass (``logprob_s``); TRL: the rest of
  ``_generate_and_score_completions`` (rewards, advantages, re-processing the images into the
  forward inputs). TRL skips the old-logprob pass when each generation batch gets exactly one
  optimizer step (``num_iterations=1``), using the detached current logprobs instead.
* ``update``: forward/backward of the loss over the micro-batches and the optimizer step (ours:
  ``train_s``; TRL: the step minus the above and minus fetching the batch).
* ``other``: the rest (TRL: fetching the generation batch from its data loader).
* ``decode``: time inside the model's generate/decode calls (part of ``gen``), and the decoded
  tokens per second of ``gen``.

The medians over the timed steps give ours/TRL ratios per workload; the last line printed is
``GRPO step ours/TRL ratio X``, the worse (larger) of the workloads' ratios. A workload that
fails in either framework is reported with its error and left out of that line.

This file holds our side, the alternation and the report; TRL's side is in `bench_vs_trl_trl`, and
what both use (workloads, model, questions, reward, scripted tails, timing) in `bench_vs_trl_common`.

Usage: ``python tools/bench_vs_trl.py [--quick] [--b 4] [--n 8] [--think-tokens 64]
[--micro-batch-size 8] [--steps 6] [--warmup 1] [--threads 1] [--workloads single tools]
[--device cpu] [--dtype float32] [--arch tiny]``. Needs ``trl==1.16.0`` (``pip install -e
".[bench]"``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from bench_vs_trl_common import (
    FULL,
    PHASES,
    QUICK,
    TRL_VERSION,
    WORKLOADS,
    Tails,
    _sync,
    _time_calls,
    build_bundle,
    control_ids,
    make_questions,
    scripted_tails,
    token_reward,
)
from bench_vs_trl_trl import build_trl, describe_trl, trl_step_record

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, SamplingParams, per_state_params
from axpo_nemo.agent.protocol import IM_END, TOOL_CALL_CLOSE, ChatProtocol
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.config.rl import RLConfig
from axpo_nemo.core import AdvantageConfig, AXPOConfig, LossConfig
from axpo_nemo.local import LocalGenerator
from axpo_nemo.local.rl import RLTrainer
from axpo_nemo.models import PolicyBundle, resolve_device

# -- ours --------------------------------------------------------------------------------------------


class PinnedTurns:
    """A `Generator` around a `LocalGenerator` that pins every turn (see the module docstring).

    The model samples exactly ``think_tokens`` tokens (no stop tokens, EOS ignored); sampled
    control tokens are replaced by ``filler``; then the scripted tail of `Tails` for the state's
    turn is appended (no decoding). Counts decoded tokens and the time spent in the model.
    """

    def __init__(self, inner: LocalGenerator, tokenizer, think_tokens: int, tails: Tails) -> None:
        self.inner, self.think_tokens, self.tails = inner, think_tokens, tails
        self.control = set(control_ids(tokenizer))
        self.filler = int(tokenizer(" x", add_special_tokens=False)["input_ids"][-1])
        self.decoded_tokens = 0
        self.decode_s = 0.0

    @property
    def rollout_session(self) -> Callable[[], Any] | None:
        """The inner generator's ``rollout_session`` (per-rollout state kept across turns), when it
        has one: the agent loop opens it, so this wrapper keeps what the generator does."""
        return getattr(self.inner, "rollout_session", None)

    def generate(
        self, states: Sequence[Any], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Continuation]:
        """Pinned turns for ``states`` (the given params' limits and stop tokens are overridden)."""
        pinned = [
            replace(p, max_new_tokens=self.think_tokens, stop_token_texts=(), ignore_eos=True)
            for p in per_state_params(states, params)
        ]
        t0 = time.perf_counter()
        sampled = self.inner.generate(states, pinned)
        self.decode_s += time.perf_counter() - t0
        out = []
        for state, cont in zip(states, sampled, strict=True):
            self.decoded_tokens += len(cont.token_ids)
            ids = [self.filler if t in self.control else t for t in cont.token_ids]
            logprobs = list(cont.logprobs)
            if state.num_turns == 0 and self.tails.call:
                tail, stop = self.tails.call, TOOL_CALL_CLOSE
            elif state.num_turns > 0 and self.tails.answer:
                tail, stop = self.tails.answer, IM_END
            else:
                tail, stop = [], None
            out.append(
                Continuation(ids + tail, logprobs + [-1.0] * len(tail), "stop" if stop else "length", stop)
            )
        return out


def build_ours(
    bundle: PolicyBundle, questions: list[Sample], workload: str, args: argparse.Namespace, steps: int
) -> tuple[RLTrainer, PinnedTurns, dict[str, float]]:
    """Our GRPO trainer on ``bundle`` (trained in place); returns it, its generator and a dict the
    reward time accumulates in (key ``reward_s``)."""
    tools = {"image_zoom_in": ImageZoomTool()} if workload == "tools" else {}
    generator = PinnedTurns(
        LocalGenerator.from_bundle(bundle),
        bundle.tokenizer,
        args.think_tokens,
        scripted_tails(bundle.tokenizer, workload),
    )
    loop = AgentLoopConfig(
        max_turns=3 if workload == "tools" else 1,
        max_new_tokens=args.think_tokens,
        max_total_tokens=8192,
        max_images=4,
        temperature=1.0,
        top_p=1.0,
    )
    trainer = RLTrainer(
        policy_bundle=bundle,
        reference_model=None,
        questions=questions,
        data_root=".",
        tools=tools,
        protocol=ChatProtocol(bundle.processor),
        generator=generator,
        axpo_cfg=AXPOConfig(),
        adv_cfg=AdvantageConfig(),
        loss_cfg=LossConfig(kl_coef=0.0, clip_low=0.2, clip_high=0.28),
        rl_cfg=RLConfig(
            steps=steps,
            lr=args.lr,
            weight_decay=0.0,
            grad_clip=1.0,
            micro_batch_size=args.micro_batch_size,
            skip_zero_advantage=False,
            seed=0,
        ),
        loop_cfg=loop,
        questions_per_step=args.b,
        group_size=args.n,
        reward_fn=lambda state, sample: (
            token_reward(t for t, g in zip(state.token_ids, state.generated, strict=True) if g),
            False,
        ),
        algorithm="grpo",
    )
    sink = {"reward_s": 0.0}
    _time_calls(trainer, "_rewarded", sink, "reward_s")
    return trainer, generator, sink


def ours_step(trainer: RLTrainer, generator: PinnedTurns, sink: dict[str, float], device) -> dict[str, float]:
    """One timed step of ours, split into the phases of the module docstring."""
    sink["reward_s"] = 0.0
    generator.decode_s, generator.decoded_tokens = 0.0, 0
    _sync(device)
    t0 = time.perf_counter()
    m = trainer.step()
    _sync(device)
    step = time.perf_counter() - t0
    gen = m["rollout_s"] + m["resample_s"] - sink["reward_s"]
    score = sink["reward_s"] + m["logprob_s"]
    update = m["train_s"]
    return {
        "step": step,
        "gen": gen,
        "score": score,
        "update": update,
        "other": step - gen - score - update,
        "decode": generator.decode_s,
        "decoded_tokens": float(generator.decoded_tokens),
        "loss_tokens": m["loss_tokens"] / m["rows"],
        "tool_calls": float(np.mean([len(s.tool_calls) for s in trainer.last.states])),
        "tool_errors": float(
            np.mean([c.error is not None for s in trainer.last.states for c in s.tool_calls] or [0.0])
        ),
    }


# -- one workload ------------------------------------------------------------------------------------


@dataclass
class WorkloadResult:
    """Per-step records of both frameworks on one workload, or why it failed."""

    workload: str
    ours: list[dict[str, float]] = field(default_factory=list)
    trl: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    trl_settings: str = ""
    prompt_tokens: dict[str, float] = field(default_factory=dict)
    peak_memory_gb: dict[str, float] = field(default_factory=dict)


def run_workload(
    workload: str, args: argparse.Namespace, log: Callable[[str], None] = print
) -> WorkloadResult:
    """Build both trainers from the same weights and alternate their steps (module docstring)."""
    from transformers import TrainerCallback

    result = WorkloadResult(workload)
    steps = args.warmup + args.steps
    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device)
    questions = make_questions(max(4 * args.b, 8))
    base = build_bundle(args.arch, args.device, dtype)
    ours_bundle = base
    trl_bundle = copy.deepcopy(base)
    trainer, generator, sink = build_ours(ours_bundle, questions, workload, args, steps)
    state: dict[str, Any] = {"ours_done": 0, "in_ours": False}

    def one_ours_step() -> None:
        """One step of ours, recorded after the warm-up."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        state["in_ours"] = True
        record = ours_step(trainer, generator, sink, device)
        state["in_ours"] = False
        if device.type == "cuda":
            result.peak_memory_gb["ours"] = max(
                result.peak_memory_gb.get("ours", 0.0), torch.cuda.max_memory_allocated() / 2**30
            )
        state["ours_done"] += 1
        if state["ours_done"] > args.warmup:
            result.ours.append(record)
        if trainer.last is not None:
            result.prompt_tokens["ours"] = float(np.mean([s.prompt_len for s in trainer.last.states]))

    class Interleave(TrainerCallback):
        """After each TRL optimizer step: record it, then run one step of ours."""

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            """Peak memory counts from here (GPU)."""
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, _args, trl_state, *_: Any, **__: Any) -> None:
            """Record TRL's step, then run one of ours."""
            record = trl_step_record(run)
            if device.type == "cuda":
                result.peak_memory_gb["trl"] = max(
                    result.peak_memory_gb.get("trl", 0.0), torch.cuda.max_memory_allocated() / 2**30
                )
            if trl_state.global_step > args.warmup:
                result.trl.append(record)
            one_ours_step()

    try:
        run = build_trl(trl_bundle, questions, workload, args, steps, [Interleave()])
        result.trl_settings = describe_trl(run.trainer.args)
        inputs_seen: list[int] = []
        tokenize = run.trainer._tokenize_prompts

        def tokenize_prompts(prompts):
            """TRL's prompt tokenization, counting the prompt tokens."""
            out = tokenize(prompts)
            inputs_seen.extend(len(ids) for ids in out[0])
            return out

        run.trainer._tokenize_prompts = tokenize_prompts
        run.trainer.train()
        if inputs_seen:
            result.prompt_tokens["trl"] = float(np.mean(inputs_seen))
    except Exception as exc:  # report what was measured, and why the rest was not
        who = "ours" if state.get("in_ours") else "TRL"
        result.error = f"{who} ({workload}): {type(exc).__name__}: {exc}"
        log(traceback.format_exc(limit=6))
        if who == "TRL":  # ours alone, so its numbers are still reported
            while state["ours_done"] < steps:
                one_ours_step()
    return result


# -- report ------------------------------------------------------------------------------------------


def _median(records: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in records) if records else float("nan")


def summarise(result: WorkloadResult) -> dict[str, dict[str, float]]:
    """Median of every phase (and gen tokens/s) per framework."""
    out = {}
    for name, records in (("ours", result.ours), ("trl", result.trl)):
        if not records:
            continue
        med = {p: _median(records, p) for p in PHASES}
        med["decoded_tokens"] = _median(records, "decoded_tokens")
        med["gen_tok_s"] = med["decoded_tokens"] / med["gen"] if med["gen"] > 0 else float("nan")
        out[name] = med
    return out


def print_report(results: list[WorkloadResult]) -> float | None:
    """Print the tables and ratios; returns the worse ratio (None when nothing compared)."""
    print("\nper-step wall time (s), medians over the timed steps; steps alternate TRL, ours")
    header = f"{'workload':<8} {'framework':<9} " + " ".join(f"{p:>7}" for p in PHASES)
    header += f" {'tok/step':>8} {'gen tok/s':>9} {'prompt':>6}"
    print(header)
    ratios = {}
    for res in results:
        med = summarise(res)
        for name in ("ours", "trl"):
            if name not in med:
                continue
            m = med[name]
            print(
                f"{res.workload:<8} {name:<9} "
                + " ".join(f"{m[p]:>7.3f}" for p in PHASES)
                + f" {m['decoded_tokens']:>8.0f} {m['gen_tok_s']:>9.0f}"
                + f" {res.prompt_tokens.get(name, float('nan')):>6.0f}"
            )
        for name, records in (("ours", res.ours), ("trl", res.trl)):
            if records:
                last = records[-1]
                print(
                    f"{'':<8} {name:<9} steps: " + ", ".join(f"{r['step']:.3f}" for r in records)
                    + f"; per rollout: {last['loss_tokens']:.0f} loss tokens, {last['tool_calls']:.2f} tool calls"
                    f" ({last['tool_errors']:.0%} failed)"
                )  # fmt: skip
        if res.peak_memory_gb:
            print(
                f"{'':<8} peak GPU memory allocated during the steps (both models resident): "
                + ", ".join(f"{k} {v:.1f} GiB" for k, v in res.peak_memory_gb.items())
            )
        if res.trl_settings:
            print(f"{'':<8} TRL settings: {res.trl_settings}")
        if res.error:
            print(f"{res.workload}: FAILED: {res.error}")
        if "ours" in med and "trl" in med:
            o, t = med["ours"], med["trl"]
            ratio = o["step"] / t["step"]
            ratios[res.workload] = ratio
            parts = ", ".join(
                f"{p} {o[p] / t[p]:.2f}" for p in ("gen", "score", "update", "decode") if t[p] > 0
            )
            print(f"{res.workload}: ours/TRL step ratio {ratio:.3f} ({parts})")
    if not ratios:
        return None
    return max(ratios.values())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` fills the unset sizes with `QUICK` (else `FULL`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: both workloads in about a minute on a CPU"
    )
    parser.add_argument("--b", type=int, default=None, help="questions per step (B)")
    parser.add_argument("--n", type=int, default=None, help="rollouts per question (N)")
    parser.add_argument("--think-tokens", type=int, default=None, help="tokens sampled per turn (pinned)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward/backward")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per framework and workload")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--arch", default="tiny", choices=("tiny", "2b"), help="tiny, or Qwen3-VL-2B's sizes")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.b * args.n) % args.micro_batch_size:
        parser.error("B x N must be a multiple of --micro-batch-size (TRL's gradient accumulation)")
    return args


def run(argv: Sequence[str] | None = None) -> float | None:
    """Run the comparison (`parse_args` arguments); prints everything, the ratio line last."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory's notice
    try:
        import trl
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        print(f"TRL is not importable ({exc}); pip install trl=={TRL_VERSION} (the 'bench' extra)")
        print("GRPO step ours/TRL ratio unavailable (TRL not installed)")
        return None
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if trl.__version__ != TRL_VERSION:
        print(f"note: TRL {trl.__version__} is installed; this comparison was written for {TRL_VERSION}")
    import transformers

    print(
        f"bench_vs_trl: B={args.b} N={args.n} think_tokens={args.think_tokens} "
        f"micro_batch={args.micro_batch_size} steps={args.steps} (+{args.warmup} warm-up) lr={args.lr} "
        f"threads={args.threads} device={args.device} dtype={args.dtype} arch={args.arch} "
        f"trl={trl.__version__} transformers={transformers.__version__} torch={torch.__version__}"
    )
    results = []
    for workload in args.workloads:
        t0 = time.perf_counter()
        results.append(run_workload(workload, args))
        print(f"{workload}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    worst = print_report(results)
    failed = [r.workload for r in results if r.error]
    if worst is None:
        print(f"GRPO step ours/TRL ratio unavailable (failed: {', '.join(failed) or 'nothing measured'})")
    else:
        note = f" (not measured: {', '.join(failed)})" if failed else ""
        print(f"GRPO step ours/TRL ratio {worst:.3f}{note}")
    return worst


if __name__ == "__main__":
    run()

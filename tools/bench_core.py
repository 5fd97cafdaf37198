"""Time AXPO's selection + advantage assembly for one large step on CPU.

Default shape: B=512 questions, N=8 rollouts, K=4, r=0.25, 4,096 tokens per rollout, i.e.
4,096 originals plus up to 1,024 resampled rows. Prints the median and p90 over repeats for
`plan_resampling`, `assemble_advantages` and both together (target: under 50 ms), with fresh
outputs and with reused ``out=`` buffers. Fresh outputs are ~105 MB per call, so on CPU their
cost is mostly page faults: ``THP_MEM_ALLOC_ENABLE=1`` lets PyTorch back them with huge pages.

    python tools/bench_core.py [--questions 512] [--group-size 8] [--k 4] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from axpo_nemo import core


def synthetic_step(questions: int, group_size: int, tokens: int, seed: int = 0) -> core.RolloutBatch:
    """A step's original rollouts as packed tensors, shaped like real tool-use rollouts.

    About 30 % of rollouts call a tool (first call 20-400 tokens into the response, 20-100 tokens
    long), 65 % of those fail (enough triggered groups to use the whole budget), and a 300-token observation follows each call.
    """
    g = torch.Generator().manual_seed(seed)
    rows = questions * group_size
    prompt = torch.randint(256, 1024, (rows,), generator=g)
    length = torch.full((rows,), tokens)
    positions = torch.arange(tokens)[None, :]
    tool = torch.rand(rows, generator=g) < 0.3
    start = prompt + torch.randint(20, 400, (rows,), generator=g)
    end = start + torch.randint(20, 100, (rows,), generator=g)
    observation = (positions >= end[:, None]) & (positions < end[:, None] + 300) & tool[:, None]
    generated = (positions >= prompt[:, None]) & (positions < length[:, None]) & ~observation
    correct = torch.where(tool, torch.rand(rows, generator=g) < 0.35, torch.rand(rows, generator=g) < 0.5)
    return core.RolloutBatch(
        token_ids=torch.randint(0, 150_000, (rows, tokens), generator=g),
        generated=generated,
        logprobs=-torch.rand(rows, tokens, generator=g) * generated,
        lengths=length,
        prompt_lens=prompt,
        group=torch.arange(questions).repeat_interleave(group_size),
        reward=correct.float(),
        correct=correct,
        tool_using=tool,
        num_tool_calls=tool.long(),
        call_start=torch.where(tool, start, -1),
        call_end=torch.where(tool, end, -1),
        num_turns=1 + tool.long(),
        source=torch.full((rows,), -1),
        prefix_len=torch.zeros(rows, dtype=torch.long),
    )


def continuations(batch: core.RolloutBatch, plan: core.ResamplePlan, seed: int = 1) -> core.RolloutBatch:
    """K continuation rows per selected prefix: the source's tokens with a new random outcome."""
    g = torch.Generator().manual_seed(seed)
    src = plan.selected.repeat_interleave(plan.k)
    rows = src.numel()
    correct = torch.rand(rows, generator=g) < 0.3
    return core.RolloutBatch(
        token_ids=batch.token_ids[src],
        generated=batch.generated[src],
        logprobs=batch.logprobs[src],
        lengths=batch.lengths[src],
        prompt_lens=batch.prompt_lens[src],
        group=batch.group[src],
        reward=correct.float(),
        correct=correct,
        tool_using=batch.tool_using[src],
        num_tool_calls=batch.num_tool_calls[src],
        call_start=batch.call_start[src],
        call_end=batch.call_end[src],
        num_turns=batch.num_turns[src],
        source=src,
        prefix_len=plan.prefix_len.repeat_interleave(plan.k),
    )


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--r", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = core.AXPOConfig(r=args.r, k=args.k)
    originals = synthetic_step(args.questions, args.group_size, args.tokens)
    plan = core.plan_resampling(originals, cfg, seed=0)
    batch = originals.concat(continuations(originals, plan))

    rows, width = batch.token_ids.shape
    workspace = (torch.zeros(rows, width), torch.zeros(rows, width, dtype=torch.bool))

    def both(out=None):
        p = core.plan_resampling(originals, cfg, seed=0)
        return core.assemble_advantages(batch, p, cfg, out=out)

    for _ in range(2):  # warm-up
        both()
    plan_ms, _ = _timed(lambda: core.plan_resampling(originals, cfg, seed=0), args.repeats)
    adv_ms, _ = _timed(lambda: core.assemble_advantages(batch, plan, cfg), args.repeats)
    both_ms, _ = _timed(both, args.repeats)
    reuse_ms, _ = _timed(lambda: both(workspace), args.repeats)
    print(
        f"step: B={args.questions} N={args.group_size} K={args.k} r={args.r} tokens/rollout={args.tokens} "
        f"-> {rows} rows x {width} tokens; triggered groups {int(plan.triggered.sum())}, "
        f"candidates {plan.candidates.numel()}, selected {plan.num_selected}/{plan.budget}; "
        f"torch threads {torch.get_num_threads()}; "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
    )
    for name, ms in (
        ("plan_resampling", plan_ms),
        ("assemble_advantages", adv_ms),
        ("selection + advantages", both_ms),
        ("same, reused out buffers", reuse_ms),
    ):
        q = statistics.quantiles(ms, n=10)
        print(f"{name:>24}: median {statistics.median(ms):7.2f} ms   p90 {q[-1]:7.2f} ms")
    for label, ms in (("fresh outputs", both_ms), ("reused out buffers", reuse_ms)):
        verdict = "PASS" if statistics.median(ms) < 50 else "MISS"
        print(f"target < 50 ms for selection + advantages ({label}): {verdict}")


if __name__ == "__main__":
    main()

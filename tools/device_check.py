"""Device check: the local backend on Qwen3-VL-2B's architecture (random weights), then TRL.

What ``tools/device_check.sh`` runs on a GPU machine, in one command and well under 8 minutes,
with nothing to download or install (the model is built from a config; TRL is used when the
carried environment has it):

1. The environment: torch, transformers, TRL, the device.
2. A Qwen3-VL of the real 2B sizes (`axpo_nemo.nemo.cluster_layout.ARCHITECTURES`:
   28 x 2048 text layers, 151,936-token vocabulary, 24-block vision tower; 2,127,532,032
   parameters) with random weights, built directly on the device in ``--dtype`` (bf16 on a GPU),
   with the tiny tokenizer and image processor (images of at most 128x128 pixels, 16 tokens).
3. A few GRPO and then AXPO steps of `RLTrainer` with the demo's rollout shape and settings
   (``conf/demo.yaml``: B=8 questions x N=8 rollouts, 3 turns of up to 96 new tokens, 2,048
   tokens per rollout, AXPO r=0.25 K=4, KL 0.01, micro-batch 16) on the synthetic task with the
   demo's tools (zoom, sandboxed python, BM25 search). A random model never writes a tool call,
   so half of the tool questions' fresh rollouts open with the question's reference call
   (``tools/bench_step.py``'s `ReferenceCalls`); everything else is sampled. Per step: wall time
   and its parts, rows, decoded tokens, rollout tokens/s (decoded tokens over rollout and
   resample time) and peak GPU memory allocated; per algorithm, the medians and the logprob
   tokens/s of one no-grad pass of the policy over the last step's rows (timed on its own: AXPO
   scores part of its rows while the resample wave runs, inside the step's other phases).
4. ``tools/bench_vs_trl.py --quick`` on the device (TRL's ``GRPOTrainer`` against the local GRPO
   step; ``--arch 2b`` in bf16 on a GPU), unless ``--skip-trl`` or TRL is not installed.

``--tiny`` runs the same on the CPU with the demo's tiny model in float32 and a small shape
(B=2, N=8, 16 new tokens; the TRL comparison with B=1, N=2, 4 tokens a turn): the test suite runs it.

Usage: ``python tools/device_check.py [--tiny] [--steps 2] [--warmup 1] [--device auto]
[--dtype auto] [--b B] [--n N] [--max-new-tokens T] [--skip-trl] [--trl-steps 5]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Qwen3VLForConditionalGeneration

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.sample import read_samples
from axpo_nemo.config import load_config
from axpo_nemo.data.synth import synthesize
from axpo_nemo.local import LocalGenerator
from axpo_nemo.local.policy import sequence_logprobs
from axpo_nemo.local.rl import RLTrainer
from axpo_nemo.models import (
    PolicyBundle,
    build_policy,
    build_tiny_processor,
    build_tiny_tokenizer,
    resolve_device,
    resolve_dtype,
    special_token_ids,
    tiny_qwen3vl_config,
)
from axpo_nemo.nemo.cluster_layout import ARCHITECTURES
from axpo_nemo.run.toolset import build_command_tools

TIME_LIMIT_S = 480
#: Qwen3-VL-2B's vision tower feeds DeepStack from these blocks (its config.json).
DEEPSTACK_2B = [5, 11, 17]
COLUMNS = ("step_s", "rollout_s", "resample_s", "logprob_s", "train_s")


def build_qwen3vl_2b(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> PolicyBundle:
    """A randomly initialised Qwen3-VL with Qwen3-VL-2B's sizes, built directly on ``device``.

    Sizes from `ARCHITECTURES` (``qwen3-vl-2b``), DeepStack from vision blocks 5, 11 and 17, tied
    embeddings, rotary base 5e6; the tokenizer and image processor are the tiny offline ones
    (token ids beyond the tokenizer's 1,037 decode to nothing). Nothing is downloaded.
    """
    arch = ARCHITECTURES["qwen3-vl-2b"]
    device = torch.device(device)
    tokenizer = build_tiny_tokenizer()
    config = tiny_qwen3vl_config(
        arch.vocab_size,
        tokenizer=tokenizer,
        text_config={
            "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "max_position_embeddings": 32768,
            "rope_theta": 5_000_000.0,
        },
        vision_config={
            "depth": arch.vision_depth,
            "hidden_size": arch.vision_hidden_size,
            "intermediate_size": arch.vision_intermediate_size,
            "num_heads": arch.vision_num_heads,
            "out_hidden_size": arch.vision_out_hidden_size,
            "patch_size": arch.patch_size,
            "temporal_patch_size": arch.temporal_patch_size,
            "spatial_merge_size": arch.spatial_merge_size,
            "num_position_embeddings": arch.num_position_embeddings,
            "deepstack_visual_indexes": DEEPSTACK_2B,
        },
        tie_word_embeddings=arch.tied_embeddings,
    )
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    ids = special_token_ids(tokenizer)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    processor = build_tiny_processor(tokenizer)
    return PolicyBundle(model=model, processor=processor, tokenizer=tokenizer, config=model.config)


def _environment(device: torch.device) -> str:
    """One line: versions and the device."""
    import transformers

    trl = "not installed"
    if importlib.util.find_spec("trl") is not None:
        import trl as trl_module

        trl = trl_module.__version__
    where = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, cc {props.major}.{props.minor})"
    return (
        f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
        f"trl {trl}, python {sys.version.split()[0]}, device {where}"
    )


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def run_algorithm(
    algorithm: str,
    base: PolicyBundle,
    cfg,
    data_dir: Path,
    tools,
    args: argparse.Namespace,
    device: torch.device,
) -> list[dict[str, float]]:
    """Warm-up plus timed steps of one algorithm from a copy of ``base``; prints a line per step."""
    from bench_step import ReferenceCalls  # same folder: tools/

    bundle = copy.deepcopy(base)
    questions = list(read_samples(data_dir / "rl.jsonl"))
    reference = copy.deepcopy(base.model) if cfg.loss.kl_coef > 0 else None
    calls = ReferenceCalls(LocalGenerator.from_bundle(bundle), questions, bundle.tokenizer, 0.5)
    loop = AgentLoopConfig.from_rollout_config(
        cfg.rollout,
        max_new_tokens=args.max_new_tokens,
        tool_timeout_s=cfg.tools.timeout_s,
        tool_workers=cfg.tools.workers,
        seed=cfg.seed,
    )
    steps = args.warmup + args.steps
    trainer = RLTrainer(
        policy_bundle=bundle,
        reference_model=reference,
        questions=questions,
        data_root=data_dir,
        tools=tools,
        protocol=ChatProtocol(bundle.processor),
        generator=calls,
        axpo_cfg=cfg.axpo,
        adv_cfg=cfg.advantage,
        loss_cfg=cfg.loss,
        rl_cfg=replace(cfg.rl, steps=steps),
        loop_cfg=loop,
        reward_cfg=cfg.reward,
        questions_per_step=args.b,
        group_size=args.n,
        algorithm=algorithm,
    )
    records = []
    for i in range(steps):
        for counter in calls.phase_stats.values():
            counter.clear()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        m = trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        decoded = sum(c.get("sampled_tokens", 0) for c in calls.phase_stats.values())
        gen_s = m["rollout_s"] + m["resample_s"]
        rec = {k: m[k] for k in COLUMNS}
        rec.update(
            rows=m["rows"],
            decoded=float(decoded),
            rollout_tok_s=decoded / gen_s if gen_s > 0 else float("nan"),
            peak_gib=_peak_gib(device),
            tool_use_rate=m["tool_use_rate"],
            prefixes=m["prefixes_selected"],
        )
        warm = i < args.warmup
        print(
            f"{algorithm:<5} {i + 1:>4}{'*' if warm else ' '} "
            + " ".join(f"{rec[k]:>10.2f}" for k in COLUMNS)
            + f" {int(rec['rows']):>5} {int(rec['decoded']):>8} {rec['rollout_tok_s']:>10.0f}"
            f" {rec['peak_gib']:>8.1f} {rec['tool_use_rate']:>5.2f} {int(rec['prefixes']):>4}",
            flush=True,
        )
        if not warm:
            records.append(rec)
    # Logprob throughput on its own: AXPO scores part of its rows while the resample wave runs,
    # so the step's logprob_s does not cover them all.
    last = trainer.last
    tokens = sum(len(s) for s in last.states)
    t0 = time.perf_counter()
    with torch.no_grad():
        sequence_logprobs(
            trainer.model,
            last.states,
            micro_batch_size=cfg.rl.micro_batch_size,
            needed=last.advantages.loss_mask,
            pad_id=bundle.tokenizer.pad_token_id or 0,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logprob_tok_s = tokens / (time.perf_counter() - t0)
    for rec in records:
        rec["logprob_tok_s"] = logprob_tok_s
        rec["scored_rows"], rec["scored_tokens"] = float(len(last.states)), float(tokens)
    del trainer, bundle, reference, calls
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring); fills the shape from the mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="the demo's tiny model on the CPU, small shape (tests)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps per algorithm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per algorithm first")
    parser.add_argument("--device", default="auto", help="auto: cuda when there is one (--tiny: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--b", type=int, default=None, help="questions per step (default: the demo's)")
    parser.add_argument("--n", type=int, default=None, help="rollouts per question (default: the demo's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per turn (default: the demo's)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the TRL comparison")
    parser.add_argument("--trl-steps", type=int, default=5, help="timed steps of the TRL comparison")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit code (1 when something failed)."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":  # tiny matmuls: more threads only add OpenMP synchronisation
        torch.set_num_threads(1)
    print(f"device_check: {_environment(device)}")
    if device.type != "cuda" and not args.tiny:
        print("note: no CUDA device; the 2B model on the CPU is slow (use --tiny for a smoke test)")

    data_dir = Path(tempfile.mkdtemp(prefix="axpo-device-check-"))
    cfg = load_config("demo", [f"data.dir={data_dir}", f"output_dir={data_dir / 'run'}"])
    small = {"b": 2, "n": 8, "max_new_tokens": 16} if args.tiny else {}
    args.b = args.b or small.get("b", cfg.rollout.questions_per_step)
    args.n = args.n or small.get("n", cfg.rollout.group_size)
    args.max_new_tokens = args.max_new_tokens or small.get("max_new_tokens", cfg.rollout.max_new_tokens)

    t0 = time.perf_counter()
    if args.tiny:
        base = build_policy(replace(cfg.model, device=str(device), dtype="float32"))
        what = "the demo's tiny Qwen3-VL"
    else:
        base = build_qwen3vl_2b(device, dtype)
        what = "Qwen3-VL-2B architecture, random weights"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    params = sum(p.numel() for p in base.model.parameters())
    print(
        f"model: {what}, {next(base.model.parameters()).dtype} on {device}: {params:,} parameters, "
        f"built in {time.perf_counter() - t0:.1f} s"
    )

    synth = replace(cfg.data.synth, num_sft=0, num_rl=max(4 * args.b, 16), num_eval=0)
    synthesize(synth, data_dir)
    r = cfg.rollout
    print(
        f"rollout shape (conf/demo.yaml{', smaller for --tiny' if args.tiny else ''}): B={args.b} N={args.n} "
        f"max_turns={r.max_turns} max_new_tokens={args.max_new_tokens} max_total_tokens={r.max_total_tokens}; "
        f"AXPO r={cfg.axpo.r} K={cfg.axpo.k}; kl_coef={cfg.loss.kl_coef}; "
        f"micro_batch_size={cfg.rl.micro_batch_size}; tools {', '.join(cfg.tools.enabled)}"
    )
    print(
        f"{'alg':<5} {'step':>5} " + " ".join(f"{c:>10}" for c in COLUMNS)
        + f" {'rows':>5} {'decoded':>8} {'roll_tok/s':>10} {'peak_GiB':>8} {'tools':>5} {'pref':>4}"
    )  # fmt: skip
    failures = []
    results: dict[str, list[dict[str, float]]] = {}
    with build_command_tools(cfg) as tools:
        for algorithm in ("grpo", "axpo"):
            try:
                results[algorithm] = run_algorithm(algorithm, base, cfg, data_dir, tools, args, device)
            except Exception as exc:  # report it and go on: the other parts still say something
                failures.append(f"{algorithm}: {type(exc).__name__}: {exc}")
                print(f"{algorithm}: FAILED: {type(exc).__name__}: {exc}", flush=True)
    print(
        "(* = warm-up step, not in the medians; roll_tok/s: decoded tokens over rollout + resample time; "
        "tools: rollouts that called a tool; pref: prefixes AXPO resampled)"
    )
    for algorithm, records in results.items():
        if not records:
            continue
        med = {k: statistics.median(r[k] for r in records) for k in records[0]}
        peak = f"{med['peak_gib']:.1f} GiB" if device.type == "cuda" else "n/a (cpu)"
        print(
            f"{algorithm}: median step {med['step_s']:.2f} s, rollout {med['rollout_tok_s']:.0f} tok/s, "
            f"logprob {med['logprob_tok_s']:.0f} tok/s (one no-grad pass over the last step's "
            f"{med['scored_rows']:.0f} rows, {med['scored_tokens']:.0f} tokens), peak GPU memory {peak}"
        )
    if results.get("grpo") and results.get("axpo"):
        ratio = statistics.median(r["step_s"] for r in results["axpo"]) / statistics.median(
            r["step_s"] for r in results["grpo"]
        )
        print(f"AXPO/GRPO median step-time ratio: {ratio:.3f}")
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if args.skip_trl:
        print("TRL comparison: skipped (--skip-trl)")
    elif importlib.util.find_spec("trl") is None:
        print("TRL comparison: skipped (trl is not installed; the 'bench' extra has it)")
    else:
        import bench_vs_trl  # same folder: tools/

        if args.tiny:
            trl_args = ["--quick", "--b", "1", "--n", "2", "--think-tokens", "4", "--micro-batch-size", "2",
                        "--steps", str(args.steps), "--warmup", "0", "--device", str(device)]  # fmt: skip
        else:
            trl_args = ["--quick", "--steps", str(args.trl_steps), "--device", str(device),
                        "--dtype", str(dtype).removeprefix("torch.")]  # fmt: skip
            if device.type == "cuda":
                trl_args += ["--arch", "2b"]
        print(f"\nTRL comparison: tools/bench_vs_trl.py {' '.join(trl_args)}", flush=True)
        try:
            if bench_vs_trl.run(trl_args) is None:
                failures.append("TRL comparison: no ratio (see above)")
        except Exception as exc:
            failures.append(f"TRL comparison: {type(exc).__name__}: {exc}")
            print(f"TRL comparison: FAILED: {type(exc).__name__}: {exc}")

    elapsed = time.perf_counter() - t_start
    over = f" (over the {TIME_LIMIT_S} s budget)" if elapsed > TIME_LIMIT_S else ""
    print(
        f"device_check: done in {elapsed:.0f} s{over}; {'FAILED: ' + '; '.join(failures) if failures else 'ok'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

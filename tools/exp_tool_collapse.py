"""The experiment behind the claim: does AXPO keep tool use alive where GRPO lets it collapse?

Runs GRPO and AXPO (optionally also the budget-matched GRPO baseline, N·(1+r) rollouts per
question) on the synthetic tool task for several seeds, from the same SFT model per seed, and
reports over the RL steps, as mean ± sample std across seeds per algorithm:

* ``tool_use_rate``, ``tool_subgroup_all_wrong_rate`` (the collapse symptom AXPO treats),
  ``resample_recovery_rate`` (AXPO only) and ``accuracy``: one plot each (``plot_mean_band``),
  all of them in ``curves.png`` (GRPO, AXPO, budget-matched GRPO) and, with ``--ablations``, in
  ``ablations.png`` (AXPO and its ablations), and the per-step values in ``curves.csv``;
* ``results.md`` (and ``results.json``): per algorithm, the first-k and last-k step averages of
  those metrics, the eval Pass@k and eval tool-use rate of the final model, the wall time per
  run and the seconds per RL step; then one row per run.

Usage::

    python tools/exp_tool_collapse.py                       # demo config, seeds 0 1 2, GRPO + AXPO
    python tools/exp_tool_collapse.py --quick               # smoke run (2 seeds, 3 RL steps, tiny data)
    python tools/exp_tool_collapse.py --seeds 0 1 2 3 --steps 40 --budget-matched \\
        --out runs/exp_tool_collapse --config demo rollout.max_new_tokens=128
    python tools/exp_tool_collapse.py --seeds 0 1 2 3 4 --budget-matched --ablations   # the docs/results.md run
    python tools/exp_tool_collapse.py --aggregate-only      # rebuild tables/plots from what exists

Trailing ``key=value`` overrides go to every run (SFT and RL alike), after the ``--quick``
settings and before the experiment's own keys.

**How SFT is shared (no duplicated work).** Per seed S, one SFT run ``<out>/seed<S>/sft`` runs the
pipeline stages ``[data, sft]`` (the synthetic data of seed S goes to ``<out>/seed<S>/sft/data``,
the SFT model to ``<out>/seed<S>/sft/sft/final.pt``). Each algorithm then gets its own run folder
``<out>/seed<S>/<grpo|axpo|grpo_bm>`` with ``data.dir`` pointing at that data folder and the
stages ``[sft, rl, eval, plots]``: before it starts, the SFT model is hard-linked (copied where
links are not possible) to ``<run>/sft/final.pt``, and ``Pipeline.stage_sft`` loads an existing
``sft/final.pt`` and skips training; so RL (and its KL reference, a copy of the model after that
stage) starts from exactly the shared SFT weights, and the run folder has the usual layout
(``axpo eval --run``, ``axpo compare`` and ``bundle_from_run`` work on it). The ``data`` stage is
left out, so nothing is re-synthesised. All algorithms of a seed use the same ``seed`` (question
order, sampling seeds), so their first step samples the same original rollouts.

**Resumable.** An SFT run whose ``sft/final.pt`` exists, and an algorithm run whose newest RL
checkpoint has reached ``rl.steps`` and which has ``eval/report.json``, are reused as they are
(a note is printed when the config differs from the one the folder was made with). Any other run
is (re)started; with ``checkpoint.resume: auto`` (the default) an interrupted run continues from
its newest checkpoint, and its eval from its ``results.jsonl``. A run folder whose ``sft/final.pt`` is not
the seed's SFT model is refused (delete the folder). The wall time of a run is the sum of its
pipeline invocations (kept in ``<run>/exp_timing.json``).

Exit status: 0 when every run finished; 1 when some run failed (the others still run, and the
tables cover the runs that finished) or, with ``--aggregate-only``, when some run is missing or
unfinished (an unfinished one is tabled as far as it got); 75 when a run was stopped by
SIGTERM/SIGUSR1 (it wrote a checkpoint: run the same command again); 2 for bad arguments or
config.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the aggregation half lives beside this script
from exp_aggregate import (
    CURVE_METRICS,
    TIMING_FILE,
    RunInfo,
    aggregate,
    default_window,
    mean_ci95,
    mean_std,
    run_seconds,
)

#: What tests and callers use from here (the aggregation names are re-exported).
__all__ = [
    "ABLATIONS",
    "ALGORITHMS",
    "CURVE_METRICS",
    "QUICK_STEPS",
    "SFT_IRRELEVANT",
    "TIMING_FILE",
    "RunInfo",
    "aggregate",
    "budget_matched_group_size",
    "config_changes",
    "default_window",
    "link_sft_model",
    "main",
    "mean_ci95",
    "mean_std",
    "plan",
    "rl_done",
]

#: The DESIGN ablations (AXPO with one mechanism removed): key -> (table label, overrides).
ABLATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "no_prefix_fixing": ("AXPO w/o prefix fixing", ("axpo.prefix_fixing=false",)),
    "no_prefix_credit": ("AXPO w/o prefix credit", ("axpo.prefix_credit=false",)),
    "joint_groups": ("AXPO joint groups", ("axpo.separate_groups=false",)),
    "random_selection": ("AXPO random selection", ("axpo.selection=random",)),
}
#: Algorithm keys, in table order, and their display labels.
ALGORITHMS = ("grpo", "axpo")
BUDGET_MATCHED = "grpo_bm"
#: Tiny settings of ``--quick`` (a smoke run of the whole experiment, a few minutes on 2 CPU cores).
QUICK_OVERRIDES = (
    "data.synth.num_sft=24",
    "data.synth.num_rl=16",
    "data.synth.num_eval=8",
    "sft.epochs=1",
    "sft.warmup_steps=1",
    "rollout.questions_per_step=4",
    "rollout.max_new_tokens=48",
    "eval.samples_per_question=4",
    "checkpoint.every=2",
)
QUICK_SEEDS = (0, 1)
QUICK_STEPS = 3
#: Keys the experiment sets itself (one per run); giving them as overrides is refused.
RESERVED_KEYS = ("algorithm", "seed", "output_dir", "train.stages", "data.dir", "checkpoint.dir")
#: Exit status after a stop signal (as `axpo train`: a checkpoint was written, run again).
EXIT_STOPPED = 75


# --------------------------------------------------------------------------- running


@dataclass
class RunSpec:
    """One pipeline run of the experiment."""

    key: str  # "sft", or the algorithm key (grpo, axpo, grpo_bm)
    label: str  # display name (table column)
    seed: int
    run_dir: Path
    overrides: list[str]


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # "done" (ran now), "reused", "failed", "stopped", "skipped"
    seconds: float = math.nan
    message: str = ""


def _yaml_str(text: str) -> str:
    """A string as a YAML single-quoted scalar (an override value that stays a string)."""
    return "'" + text.replace("'", "''") + "'"


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].lstrip("+~").strip()


def labels_for(budget_matched_n: int | None) -> dict[str, str]:
    labels = {"grpo": "GRPO", "axpo": "AXPO"}
    if budget_matched_n is not None:
        labels[BUDGET_MATCHED] = f"GRPO-BM (N={budget_matched_n})"
    return labels


def budget_matched_group_size(group_size: int, r: float) -> int:
    """N·(1+r) rounded to the nearest integer (the budget-matched GRPO baseline)."""
    return max(group_size, math.floor(group_size * (1.0 + r) + 0.5))


def plan(args: argparse.Namespace, base_overrides: list[str], bm_n: int | None) -> list[RunSpec]:
    """The runs in execution order: per seed, its SFT run then each algorithm."""
    out = Path(args.out).resolve()
    labels = labels_for(bm_n)
    keys = list(ALGORITHMS) + ([BUDGET_MATCHED] if bm_n is not None else [])
    specs = []
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        sft_dir = seed_dir / "sft"
        common = [*base_overrides, f"seed={seed}"]
        specs.append(
            RunSpec("sft", "SFT", seed, sft_dir,
                    [*common, f"output_dir={_yaml_str(str(sft_dir))}", "train.stages=[data,sft]"])
        )  # fmt: skip
        for key in keys:
            run_dir = seed_dir / key
            extra = [
                f"algorithm={'axpo' if key == 'axpo' else 'grpo'}",
                f"output_dir={_yaml_str(str(run_dir))}",
                f"data.dir={_yaml_str(str(sft_dir / 'data'))}",
                "train.stages=[sft,rl,eval,plots]",
            ]
            if key == BUDGET_MATCHED:
                extra.append(f"rollout.group_size={bm_n}")
            specs.append(RunSpec(key, labels[key], seed, run_dir, [*common, *extra]))
        if seed in (getattr(args, "ablation_seeds", None) or ()):
            for key, (label, ablation) in ABLATIONS.items():
                run_dir = seed_dir / key
                extra = [
                    "algorithm=axpo",
                    f"output_dir={_yaml_str(str(run_dir))}",
                    f"data.dir={_yaml_str(str(sft_dir / 'data'))}",
                    "train.stages=[sft,rl,eval,plots]",
                    *ablation,
                ]
                specs.append(RunSpec(key, label, seed, run_dir, [*common, *extra]))
    return specs


def figures(runs: Sequence[RunInfo]) -> dict[str, list[str]]:
    """The combined plots to draw: ``curves.png`` with GRPO, AXPO and the budget-matched baseline,
    and, when ablations ran, ``ablations.png`` with AXPO and its ablations (seven curves in one
    panel cannot be told apart)."""
    ablation_labels = {label for label, _ in ABLATIONS.values()}
    labels = list(dict.fromkeys(r.label for r in runs))
    drawn = {"curves.png": [lab for lab in labels if lab not in ablation_labels]}
    ablated = [lab for lab in labels if lab in ablation_labels]
    if ablated:
        drawn["ablations.png"] = [labels_for(None)["axpo"], *ablated]
    return drawn


def sft_done(run_dir: Path) -> bool:
    return (run_dir / "sft" / "final.pt").is_file() and (run_dir / "data" / "manifest.json").is_file()


def rl_done(run_dir: Path, steps: int) -> bool:
    """The run's newest RL checkpoint has reached ``steps`` and its eval report exists."""
    from axpo_nemo.run.checkpoint import CheckpointManager

    ckpts = CheckpointManager(run_dir / "rl" / "checkpoints").checkpoints()
    return bool(ckpts) and ckpts[-1][0] >= steps and (run_dir / "eval" / "report.json").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    if os.path.samefile(a, b):
        return True
    return a.stat().st_size == b.stat().st_size and _sha256(a) == _sha256(b)


def link_sft_model(sft_model: Path, run_dir: Path) -> str:
    """Put the seed's SFT model at ``<run_dir>/sft/final.pt`` (hard link, else copy).

    Returns "linked", "copied" or "present"; raises RuntimeError when the run already holds a
    different SFT model (its RL started from other weights: delete the run folder).
    """
    dest = run_dir / "sft" / "final.pt"
    if dest.exists():
        if _same_file(sft_model, dest):
            return "present"
        raise RuntimeError(
            f"{dest} is not the seed's SFT model {sft_model} (the SFT run was redone?); "
            f"delete {run_dir} to rerun it from the current SFT model"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(sft_model, tmp)
        how = "linked"
    except OSError:
        shutil.copyfile(sft_model, tmp)
        how = "copied"
    tmp.replace(dest)
    return how


#: Config sections an SFT run does not use (a change there does not make its model stale).
SFT_IRRELEVANT = ("algorithm", "rl.", "eval.", "axpo.", "advantage.", "loss.", "checkpoint.", "logging.")


def config_changes(run_dir: Path, tree, ignore: Sequence[str] = ()) -> list[str]:
    """Keys whose value differs from the ``config.yaml`` the run folder was made with.

    ``ignore``: key prefixes left out (``"rl."``: the ``rl`` section; ``"algorithm"``: that key).
    """
    from omegaconf import OmegaConf

    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return []
    try:
        old = OmegaConf.to_container(OmegaConf.load(old_path), resolve=True)
    except Exception:  # an unreadable file: report it as a change
        return ["<config.yaml unreadable>"]
    new = OmegaConf.to_container(tree, resolve=True)

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    a, b = flat(old), flat(new)
    changed = (k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return sorted(
        k for k in changed if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in ignore)
    )


def _add_timing(run_dir: Path, seconds: float) -> float:
    path = run_dir / TIMING_FILE
    data = {"seconds": 0.0, "invocations": 0}
    if path.is_file():
        with contextlib.suppress(ValueError):
            data.update(json.loads(path.read_text()))
    data["seconds"] = float(data["seconds"]) + seconds
    data["invocations"] = int(data["invocations"]) + 1
    path.write_text(json.dumps(data, indent=2))
    return data["seconds"]


def _read_timing(run_dir: Path) -> float:
    return run_seconds(RunInfo("", 0, run_dir))


def _release_memory() -> None:
    """Free the finished run's model before the next one (matters for real models on a GPU)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def say(msg: str) -> None:
    print(f"[exp] {msg}", flush=True)


def execute(spec: RunSpec, args: argparse.Namespace, sft_models: dict[int, Path]) -> Outcome:
    """Run (or reuse) one run; never raises for a failing run (KeyboardInterrupt aside)."""
    from omegaconf import OmegaConf

    from axpo_nemo.config import load_config_tree
    from axpo_nemo.local.pipeline import run_train

    try:
        tree = load_config_tree(args.config, spec.overrides)
        cfg = OmegaConf.to_object(tree)
        if spec.key == "sft":
            done = sft_done(spec.run_dir)
        else:
            sft_model = sft_models.get(spec.seed)
            if sft_model is None:
                return Outcome(spec, "skipped", message="the seed's SFT run did not finish")
            how = link_sft_model(sft_model, spec.run_dir)
            if how != "present":
                say(f"  SFT model {how} from {sft_model}")
            done = rl_done(spec.run_dir, cfg.rl.steps)
        changed = config_changes(spec.run_dir, tree, SFT_IRRELEVANT if spec.key == "sft" else ())
        if changed:
            shown = ", ".join(changed[:8]) + (" …" if len(changed) > 8 else "")
            say(f"  note: {spec.run_dir} was made with a different config ({shown})"
                + ("; reusing it as is (delete the folder to redo it)" if done else "; resuming it"))  # fmt: skip
        if done:
            return Outcome(spec, "reused", seconds=_read_timing(spec.run_dir))
        try:
            result = run_train(cfg, tree, plain=True)
        finally:
            _release_memory()
        total = _add_timing(spec.run_dir, result.seconds)
        if result.stopped:
            return Outcome(spec, "stopped", seconds=total, message="stopped by a signal (checkpoint written)")
        msg = ""
        if result.eval_summary:
            keys = [
                k
                for k in result.eval_summary
                if "/" not in k and (k.startswith("pass@") or k == "tool_use_rate")
            ]
            msg = "eval " + " ".join(f"{k}={result.eval_summary[k]:.3f}" for k in keys)
        return Outcome(spec, "done", seconds=total, message=msg)
    except Exception as exc:
        traceback.print_exc()
        return Outcome(spec, "failed", message=f"{type(exc).__name__}: {exc}")


def existing_outcome(spec: RunSpec, steps: int) -> Outcome:
    """``--aggregate-only``: what the run folder holds, without running anything.

    An algorithm run with RL metrics that has not reached ``steps`` (or has no eval report) is
    "partial": it goes into the tables as it is (its step count shows), and the exit status is 1.
    """
    seconds = _read_timing(spec.run_dir)
    if spec.key == "sft":
        ok = sft_done(spec.run_dir)
        return Outcome(spec, "reused" if ok else "skipped", seconds, "" if ok else "no SFT model")
    if rl_done(spec.run_dir, steps):
        return Outcome(spec, "reused", seconds)
    from axpo_nemo.run.metrics_log import read_metrics

    n = len({r["step"] for r in read_metrics(spec.run_dir / "metrics.jsonl", phase="rl")})
    if not n:
        return Outcome(spec, "skipped", seconds, "no RL metrics")
    report = "" if (spec.run_dir / "eval" / "report.json").is_file() else ", no eval report"
    return Outcome(spec, "partial", seconds, f"unfinished: {n}/{steps} RL steps logged{report}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exp_tool_collapse.py",
        description="GRPO vs AXPO over seeds from a shared SFT model per seed: tool-use, all-wrong "
        "tool-subgroup, resample-recovery and accuracy curves (mean ± std), eval Pass@k and wall time.",
        epilog="Runs are reused when finished and resumed when interrupted: rerun the same command.",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="RL steps (default: the config's rl.steps; --quick: 3)"
    )
    parser.add_argument(
        "--out", default="runs/exp_tool_collapse", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--config", "-c", default="demo", help="config name or file (default: %(default)s)")
    parser.add_argument(
        "--budget-matched", action="store_true", help="also run GRPO with group_size N·(1+r) (label GRPO-BM)"
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run the DESIGN ablations (AXPO without prefix fixing, without prefix credit, with "
        "joint groups, with random selection) on --ablation-seeds",
    )
    parser.add_argument(
        "--ablation-seeds", type=int, nargs="+", default=None, help="seeds of the ablations (default: the first two)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 2 seeds, 3 RL steps")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="k of the first/last-k step averages (default: steps//4, 1..10)",
    )
    parser.add_argument(
        "--aggregate-only", action="store_true", help="only rebuild the tables and plots from finished runs"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for every run (key=value, ++key=value)",
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = list(QUICK_SEEDS if args.quick else (0, 1, 2))
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    if args.ablation_seeds is not None and not args.ablations:
        parser.error("--ablation-seeds needs --ablations")
    if args.ablations:
        args.ablation_seeds = args.ablation_seeds or args.seeds[:2]
        if not set(args.ablation_seeds) <= set(args.seeds):
            parser.error("--ablation-seeds must be among --seeds (they share its SFT model)")
    if args.steps is None and args.quick:
        args.steps = QUICK_STEPS
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    bad = [o for o in args.overrides if _override_key(o) in RESERVED_KEYS]
    if bad:
        parser.error(
            f"{', '.join(bad)}: set by the experiment per run (use --seeds / --out); "
            f"reserved keys: {', '.join(RESERVED_KEYS)}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from axpo_nemo.config import ConfigError, load_config_tree

    base = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    if args.steps is not None:
        base.append(f"rl.steps={args.steps}")
    try:
        tree = load_config_tree(args.config, base)
    except ConfigError as exc:
        print(f"exp_tool_collapse: config error: {exc}", file=sys.stderr)
        return 2
    if tree.backend != "local":
        print("exp_tool_collapse: only backend=local runs here", file=sys.stderr)
        return 2
    steps = int(tree.rl.steps)
    bm_n = (
        budget_matched_group_size(int(tree.rollout.group_size), float(tree.axpo.r))
        if args.budget_matched
        else None
    )
    specs = plan(args, base, bm_n)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"config {args.config}, seeds {' '.join(map(str, args.seeds))}, {steps} RL steps, "
        f"B={tree.rollout.questions_per_step} N={tree.rollout.group_size}"
        + (f", budget-matched N={bm_n}" if bm_n is not None else "")
        + f"; {len(specs)} runs under {out}"
    )

    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    sft_models: dict[int, Path] = {}
    stopped = False
    for i, spec in enumerate(specs, 1):
        name = f"seed {spec.seed} {spec.label}"
        if args.aggregate_only:
            oc = existing_outcome(spec, steps)
        else:
            say(f"({i}/{len(specs)}) {name} -> {spec.run_dir}")
            oc = execute(spec, args, sft_models)
        outcomes.append(oc)
        if spec.key == "sft" and oc.status in ("done", "reused"):
            sft_models[spec.seed] = spec.run_dir / "sft" / "final.pt"
        if not args.aggregate_only:
            took = "" if math.isnan(oc.seconds) else f" ({oc.seconds:.0f} s)"
            say(f"({i}/{len(specs)}) {name}: {oc.status}{took}" + (f" — {oc.message}" if oc.message else ""))
        if oc.status == "stopped":
            stopped = True
            break

    finished = [
        RunInfo(oc.spec.label, oc.spec.seed, oc.spec.run_dir, oc.seconds)
        for oc in outcomes
        if oc.spec.key != "sft" and oc.status in ("done", "reused", "partial")
    ]
    sft_seconds = {
        oc.spec.seed: oc.seconds
        for oc in outcomes
        if oc.spec.key == "sft" and oc.status in ("done", "reused") and not math.isnan(oc.seconds)
    }
    if finished:
        agg = aggregate(finished, out, window=args.window, sft_seconds=sft_seconds, figures=figures(finished))
        print()
        print(agg.markdown)
        say(
            f"wrote {agg.results_md}, {agg.results_json.name}, {agg.curves_csv.name}, plots/ ({len(agg.plots)} PNGs)"
        )
    else:
        say("no finished algorithm run to aggregate")
    bad = [oc for oc in outcomes if oc.status in ("failed", "skipped", "partial")]
    say(
        f"total {time.monotonic() - t0:.0f} s; {len(finished)} algorithm run(s) aggregated, {len(bad)} failed/skipped/partial"
    )
    for oc in bad:
        say(f"  {oc.status}: seed {oc.spec.seed} {oc.spec.label} ({oc.spec.run_dir}): {oc.message}")
    if stopped:
        say(f"stopped by a signal; run the same command again to continue (exit {EXIT_STOPPED})")
        return EXIT_STOPPED
    return 1 if bad or len(finished) < len([s for s in specs if s.key != "sft"]) else 0


if __name__ == "__main__":
    sys.exit(main())

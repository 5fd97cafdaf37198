"""``python -m axpo_nemo.nemo.train --config CONFIG [overrides]``: AXPO / GRPO on NeMo-RL.

Loads our config tree (`axpo_nemo.config`; ``backend`` is forced to ``nemo``), checks the cluster
layout with `axpo_nemo.nemo.cluster_plan` (a layout that cannot run stops here, before any GPU work),
starts or joins Ray through NeMo-RL's ``init_ray`` and runs `trainer.run_training`. Rerunning the
same command resumes from the newest checkpoint.

Exit codes: 0 done; 2 bad config, failed plan or NeMo-RL missing; 75 stopped by a signal after
checkpointing (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["check_plan", "main", "run"]


def check_plan(cfg, config_name: str) -> list[str]:
    """Errors of `axpo_nemo.nemo.cluster_plan` for this config (empty when the layout can run)."""
    from axpo_nemo.nemo.cluster_layout import PlanError
    from axpo_nemo.nemo.cluster_plan import plan

    try:
        report = plan(cfg, config_name)
    except PlanError as exc:
        return [str(exc)]
    for line in report.warnings:
        logging.getLogger(__name__).warning("plan: %s", line)
    return list(report.errors)


def run(config: str | None, overrides: Sequence[str], *, skip_plan: bool = False, stage: str | None = None) -> int:
    """Check NeMo-RL imports, load the config, check the plan, init Ray and train.

    ``stage`` is ``rl`` or ``sft``; None takes it from ``train.stages``: rl when it is listed, else
    sft (a NeMo-RL job runs one of the two; SFT exports a model that an RL config then names).

    Returns the exit code; a missing NeMo-RL, a bad config or a failed plan print one line and give 2.
    """
    from omegaconf import OmegaConf

    from axpo_nemo.config import ConfigError, load_config_tree
    from axpo_nemo.nemo.adapter import NemoRLUnavailable

    try:
        tree = load_config_tree(config, [*overrides, "backend=nemo"])
    except ConfigError as exc:
        print(f"axpo: config error: {exc}", file=sys.stderr)
        return 2
    cfg = OmegaConf.to_object(tree)
    if stage is None:
        stage = "rl" if "rl" in cfg.train.stages or "sft" not in cfg.train.stages else "sft"
        if stage == "rl" and "sft" in cfg.train.stages:
            logging.getLogger(__name__).warning(
                "train.stages has sft and rl: a NeMo-RL job runs one; this one runs rl from model.name "
                "(run SFT as its own job: axpo sft, or a cluster/sft_* config)"
            )
    if cfg.nemo.megatron.freeze_vision_model:
        # `axpo plan` sizes a frozen tower, but v0.7.0's Megatron policy has no switch to freeze it.
        print("axpo: config error: nemo.megatron.freeze_vision_model=true is not supported by NeMo-RL "
              "v0.7.0's Megatron policy (no freeze switch there); set it to false", file=sys.stderr)  # fmt: skip
        return 2
    from axpo_nemo.nemo import adapter

    try:  # fail fast, before any other work, where NeMo-RL is not importable
        adapter.grpo_module() if stage == "rl" else adapter.sft_module()
    except NemoRLUnavailable as exc:
        print(f"axpo: {exc}", file=sys.stderr)
        return 2
    if not skip_plan:
        errors = check_plan(cfg, str(config or "config"))
        if errors:
            for error in errors:
                print(f"axpo: plan: {error}", file=sys.stderr)
            print("axpo: the cluster layout cannot run (see `axpo plan`); fix the config or pass --skip-plan",
                  file=sys.stderr)  # fmt: skip
            return 2
    adapter.init_ray()
    if stage == "rl":
        from axpo_nemo.nemo.trainer import run_training

        return run_training(cfg, tree)
    from axpo_nemo.nemo.sft import run_sft

    return run_sft(cfg, tree)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m axpo_nemo.nemo.train", description="AXPO / GRPO training on NeMo-RL (v0.7.0)."
    )
    parser.add_argument(
        "--config", "-c", default=None, help="config file or name under conf/ (e.g. cluster/axpo_8b)"
    )
    parser.add_argument("--skip-plan", action="store_true", help="do not stop on `axpo plan` errors")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.config, args.overrides, skip_plan=args.skip_plan)


if __name__ == "__main__":
    sys.exit(main())

"""A run folder's shared parts: the resolved config beside the outputs, and the policy it ended with."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from axpo_nemo.config.schema import Config
from axpo_nemo.models import PolicyBundle, build_policy
from axpo_nemo.run.checkpoint import CheckpointManager

__all__ = ["bundle_from_run", "save_config"]


def save_config(cfg_tree, output_dir: Path) -> Path:
    """Write the resolved config next to the run's outputs."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg_tree))
    return path


def bundle_from_run(run_dir: str | Path, cfg: Config) -> PolicyBundle:
    """The policy of a finished run: the model of its newest RL checkpoint, else its SFT model."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    bundle = build_policy(cfg.model, seed=cfg.seed)
    folder = Path(cfg.checkpoint.dir) / "rl" if cfg.checkpoint.dir else run_dir / "rl" / "checkpoints"
    loaded = CheckpointManager(folder, cfg.checkpoint.keep_last).load_latest(require_one=True)
    if loaded is not None:
        bundle.model.load_state_dict(loaded[1]["model"])
    elif (run_dir / "sft" / "final.pt").exists():
        bundle.model.load_state_dict(
            torch.load(run_dir / "sft" / "final.pt", map_location="cpu", weights_only=True)
        )
    else:
        raise FileNotFoundError(f"{run_dir}: no RL checkpoint and no sft/final.pt")
    return bundle

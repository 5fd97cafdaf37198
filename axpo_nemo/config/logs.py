"""Where a run's metrics go (`LoggingConfig`), apart from the logger so the schema needs no I/O code."""

from __future__ import annotations

from dataclasses import dataclass

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["LoggingConfig"]


@dataclass
class LoggingConfig(ValidatedConfig):
    """Where metrics go besides ``<output_dir>/metrics.jsonl`` (always written)."""

    tensorboard: bool = setting(
        False, "Also write TensorBoard events to <output_dir>/tensorboard (needs: pip install tensorboard)."
    )
    wandb: bool = setting(False, "Also log to Weights & Biases (needs: pip install wandb).")
    wandb_project: str = setting("axpo", "W&B project name.")
    wandb_mode: str = setting(
        "offline",
        "W&B mode: 'offline' (files under <output_dir>/wandb; upload later with `wandb sync`), "
        "'online' or 'disabled'.",
        choices=("offline", "online", "disabled"),
    )
    console_every: int = setting(1, "Print a metrics line to the console every this many steps.", ge=1)

"""What a checkpoint remembers of the run's settings, and the check a resume makes against them.

A checkpoint stores the run's config flattened to dotted keys (``rollout.group_size`` ...). On
resume each stage compares it with the config it is about to run:

* a **shape** setting changed (what a step *is*: the model, the seed, the algorithm, the batch of
  questions and rollouts) -> `ConfigError` naming the key, the old and the new value: the resumed
  steps would not continue the same experiment, and its metrics could not be compared;
* any other setting of the stage changed (a learning rate, a coefficient) -> a WARNING naming
  each key, then the run goes on: changing those mid-run is a legitimate experiment;
* settings that never change a step's computation (paths, logging, checkpointing, evaluation,
  worker counts, the number of steps) are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from axpo_nemo.config.loader import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["SETTINGS_KEY", "check_resumed_settings", "flat_settings"]

#: The checkpoint state key holding the flattened settings (a JSON string).
SETTINGS_KEY = "run_settings"

#: Per stage: prefixes of the settings whose change makes a resume refuse.
SHAPE = {
    "sft": ("model.", "seed", "sft.batch_size", "sft.micro_batch_size"),
    "rl": ("model.", "seed", "algorithm", "rl.algorithm", "rollout.group_size", "rollout.questions_per_step"),
}
#: Per stage: prefixes of the settings compared at all (a change outside these is not the stage's).
COMPARED = {
    "sft": ("model.", "seed", "sft.", "data.", "reward.", "rollout.", "tools."),
    "rl": (
        "model.",
        "seed",
        "algorithm",
        "rl.",
        "axpo.",
        "advantage.",
        "loss.",
        "reward.",
        "rollout.",
        "data.",
        "tools.",
    ),
}
#: Prefixes never compared: they change no step's computation.
IGNORED = ("model.cpu_threads", "rl.steps", "sft.epochs", "tools.workers", "tools.timeout_s", "data.dir")


def flat_settings(cfg: Any) -> str:
    """The settings of ``cfg`` (a dataclass tree) a resume compares, as a JSON object of dotted keys
    to plain values (paths, logging, checkpointing and evaluation settings left out)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = list(value) if isinstance(value, tuple) else value

    walk("", dataclasses.asdict(cfg))
    # Only what a resume compares: no paths, so a run's checkpoints do not depend on its folder.
    compared = tuple(p for prefixes in COMPARED.values() for p in prefixes)
    kept = {k: v for k, v in flat.items() if _matches(k, compared) and not _matches(k, IGNORED)}
    return json.dumps(kept, sort_keys=True, default=str)


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def check_resumed_settings(saved: str | None, current: str, stage: str, where: str) -> list[str]:
    """Compare a checkpoint's `flat_settings` with the current ones for ``stage`` ('sft' or 'rl').

    Raises ConfigError when a shape setting differs (message: the key, both values and
    ``where``, the checkpoint); logs a WARNING per other changed key of the stage and returns
    them. A checkpoint without saved settings (``saved`` None) is not checked.
    """
    if saved is None:
        return []
    old, new = json.loads(saved), json.loads(current)
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and _matches(k, COMPARED[stage]) and not _matches(k, IGNORED)
    )
    shape = [k for k in changed if _matches(k, SHAPE[stage])]
    if shape:
        k = shape[0]
        more = f" (and {', '.join(shape[1:])})" if len(shape) > 1 else ""
        raise ConfigError(
            f"{k} is {new.get(k)!r} but the {stage} checkpoint {where} was made with {old.get(k)!r}{more}: "
            "a resumed run must keep it; set it back, or start a new run in another output_dir"
        )
    for k in changed:
        logger.warning(
            "%s: %s changed since the checkpoint %s (%r -> %r); resuming with the new value",
            stage,
            k,
            where,
            old.get(k),
            new.get(k),
        )
    return changed

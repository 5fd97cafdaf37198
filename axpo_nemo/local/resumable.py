"""The part of a trainer's state every local trainer saves and restores the same way."""

from __future__ import annotations

import logging
from typing import Any

from axpo_nemo.local.optim import clone_state
from axpo_nemo.run.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)


class ResumableTrainer:
    """Mixin for trainers with ``model``, ``optimizer``, ``scheduler``, a data cursor
    (``epoch``, ``position``), the data's ``fingerprint`` and ``step_count``.

    `training_state` snapshots them (tensors cloned, global RNG states included) and
    `restore_training_state` puts them back, so a resumed run continues exactly. If the data
    changed since the snapshot (another fingerprint), the stored position means nothing and the
    epoch restarts from its beginning, with a warning.
    """

    #: What the data is called in the warning (e.g. "examples", "questions").
    data_name = "data"

    def training_state(self) -> dict[str, Any]:
        """Weights, optimizer, schedule, RNG states, data cursor and step."""
        return {
            "model": clone_state(self.model.state_dict()),
            "optimizer": clone_state(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data": {"epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint},
            "step": self.step_count,
        }

    def restore_training_state(self, state: dict[str, Any]) -> None:
        """Put back what `training_state` saved."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epoch = int(state["data"]["epoch"])
        self.position = int(state["data"]["position"])
        if state["data"]["fingerprint"] != self.fingerprint:
            logger.warning(
                "%s: the %s changed since the checkpoint; epoch %d restarts",
                type(self).__name__, self.data_name, self.epoch,
            )  # fmt: skip
            self.position = 0
        self.step_count = int(state["step"])

"""Capture and restore every global RNG state (and named private generators) for checkpoints.

States come out in types a ``torch.load(weights_only=True)`` can read back (numpy arrays as lists),
so they go into a checkpoint like any other state.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)


def capture_rng_state(generators: dict[str, Any] | None = None) -> dict[str, Any]:
    """The global Python, numpy and torch (CPU and CUDA) RNG states, in checkpointable types.

    ``generators`` adds named private generators (``random.Random``, ``numpy.random.Generator``
    or ``torch.Generator``). :func:`restore_rng_state` puts everything back exactly.
    """
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            **np_state,
            "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]},
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    extra = {}
    for name, gen in (generators or {}).items():
        if isinstance(gen, random.Random):
            extra[name] = gen.getstate()
        elif isinstance(gen, np.random.Generator):
            extra[name] = gen.bit_generator.state
        elif isinstance(gen, torch.Generator):
            extra[name] = gen.get_state()
        else:
            raise TypeError(
                f"capture_rng_state: generator {name!r} has unsupported type {type(gen).__name__}"
            )
    if extra:
        out["generators"] = extra
    return out


def restore_rng_state(state: dict[str, Any], generators: dict[str, Any] | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured (``generators``: the same named objects)."""
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": int(np_state["state"]["pos"]),
    }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning(
                "not restoring CUDA RNG states: saved for %d devices, %d visible",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"restore_rng_state: no saved state for generator {name!r}")
        if isinstance(gen, random.Random):
            gen.setstate(_as_tuple(saved[name]))
        elif isinstance(gen, np.random.Generator):
            gen.bit_generator.state = saved[name]
        elif isinstance(gen, torch.Generator):
            gen.set_state(saved[name])
        else:
            raise TypeError(
                f"restore_rng_state: generator {name!r} has unsupported type {type(gen).__name__}"
            )


def _as_tuple(obj: Any) -> Any:
    # random.setstate needs tuples; a state that went through JSON or a list-based path has lists.
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, list | tuple) else obj

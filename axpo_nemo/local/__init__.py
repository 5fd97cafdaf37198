"""Single-process backend: the HF transformers Qwen3-VL policy and its KV-cached sampler.

Exports resolve lazily (on first use): importing a light module of this package, such as
`axpo_nemo.local.rl_config` for the config schema, imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axpo_nemo.local.generator import GeneratorStats, LocalGenerator, mrope_positions, sample_tokens

__all__ = ["GeneratorStats", "LocalGenerator", "mrope_positions", "sample_tokens"]

#: Exported name -> the submodule that defines it.
_HOME = {name: "generator" for name in __all__}


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first use (PEP 562)."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Evaluation and export: Pass@k with tool metrics over question files, Hugging Face export.

Exports resolve lazily (on first use): importing `axpo_nemo.eval.passk_config` alone, as the
config schema does, imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axpo_nemo.eval.export import export_checkpoint, export_from_state_dict, export_hf
    from axpo_nemo.eval.passk import (
        EvalConfig,
        EvalReport,
        GroupMetrics,
        ResultsMismatchError,
        evaluate,
        final_assistant_text,
    )

__all__ = [
    "EvalConfig",
    "EvalReport",
    "GroupMetrics",
    "ResultsMismatchError",
    "evaluate",
    "export_checkpoint",
    "export_from_state_dict",
    "export_hf",
    "final_assistant_text",
]

#: Exported name -> the submodule it is taken from.
_HOME = {
    "EvalConfig": "passk",
    "EvalReport": "passk",
    "GroupMetrics": "passk",
    "ResultsMismatchError": "passk",
    "evaluate": "passk",
    "final_assistant_text": "passk",
    "export_checkpoint": "export",
    "export_from_state_dict": "export",
    "export_hf": "export",
}


def __getattr__(name: str) -> Any:
    """Import the submodule holding ``name`` on first use (PEP 562)."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

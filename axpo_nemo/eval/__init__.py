"""Evaluation and export: Pass@k with tool metrics over question files, Hugging Face export.

Exports resolve lazily (on first use): importing `axpo_nemo.eval.passk_config` alone, as the
config schema does, imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axpo_nemo.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _HOME)

"""Evaluation: Pass@k with tool metrics over question files, and the benchmark suite (`suite`).

Exports resolve lazily (on first use): importing the package imports neither torch nor
transformers. Its config section (`EvalConfig`) lives in `axpo_nemo.config.evaluation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axpo_nemo.lazy import lazy_exports

if TYPE_CHECKING:
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
}

__getattr__, __dir__ = lazy_exports(__name__, _HOME)

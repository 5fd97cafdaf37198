"""Evaluation and export: Pass@k with tool metrics over question files, Hugging Face export."""

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

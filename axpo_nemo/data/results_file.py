"""Reading a rollout results file (``results.jsonl``): a header line, then one record per question.

`axpo_nemo.eval.passk.evaluate` writes these files (and reads them back to resume);
`axpo_nemo.data.prune` reads them as the evidence for pruning a question pool.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["read_results_file"]

logger = logging.getLogger(__name__)


def read_results_file(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, question records) of a ``results.jsonl``; unreadable lines (a torn tail) are skipped."""
    header, records = None, []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipped an unreadable line (interrupted write?)", path, number)
                continue
            if obj.get("type") == "header" and header is None:
                header = obj
            elif obj.get("type") == "question" and isinstance(obj.get("id"), str):
                records.append(obj)
    return header, records

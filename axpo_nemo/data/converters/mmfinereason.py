"""MMFineReason (OpenDataArena/MMFineReason-*: the 1.8M set, its SFT-123K hard subset, …):
parquet files with the image embedded, one row per question with the teacher's reasoning.

==================================  ====================================================
MMFineReason column                 Sample field
==================================  ====================================================
``id``                              ``id`` (``mmfinereason-<source>-<id>``)
``question``                        ``question`` (``<image>`` placeholders removed)
``answer``                          ``answer``: the content of a ``\\boxed{}`` if any; a
                                    lone letter makes it ``multiple_choice``, else ``math``
``image``                           ``images``: an image struct ``{"bytes", "path"}`` (or
                                    a list of them)
``source``                          ``category`` (the original dataset, e.g. ``MMK12``)
``pass_rate``                       ``metadata.pass_rate``; ``max_pass_rate: 0`` keeps the
                                    hard questions (the SFT-123K selection rule)
``qwen3vl_235b_thinking_response``  ``messages`` (one assistant turn) with
                                    ``keep_responses``; else dropped
``is_consistent``                   ``metadata.is_consistent``
==================================  ====================================================
"""

from __future__ import annotations

from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.converters.common import (
    BadRow,
    RowContext,
    answer_from,
    converted_sample,
    image_bytes,
    infer_answer_type,
    pass_rate_ok,
    strip_image_tags,
)

SOURCE = "mmfinereason"
RESPONSE_KEY = "qwen3vl_235b_thinking_response"


def convert_row(row: dict[str, Any], ctx: RowContext) -> Sample | None:
    """One MMFineReason row as a Sample (None: filtered out by ``max_pass_rate``)."""
    if not pass_rate_ok(row.get("pass_rate"), ctx.cfg):
        return None
    raw_question = row.get("question")
    if not isinstance(raw_question, str) or not raw_question.strip():
        raise BadRow("no question")
    question = strip_image_tags(raw_question)
    answer_type, answer, options = infer_answer_type(answer_from(row.get("answer")), question, "math")
    ident = row.get("id")
    if ident is None or str(ident) == "":
        raise BadRow("no id")
    origin = str(row.get("source") or "")
    images = row.get("image", row.get("images")) or []
    if not isinstance(images, list) or (images and all(isinstance(x, int) for x in images)):
        images = [images]
    data = [image_bytes(x, ctx.image_root) for x in images]
    messages = []
    if ctx.cfg.keep_responses and isinstance(row.get(RESPONSE_KEY), str) and row[RESPONSE_KEY].strip():
        messages = [{"role": "assistant", "content": row[RESPONSE_KEY]}]
    return converted_sample(
        ctx,
        SOURCE,
        f"{origin + '-' if origin else ''}{ident}",
        data,
        question=question,
        answer=answer,
        answer_type=answer_type,
        options=options,
        category=origin,
        messages=messages,
        metadata={"pass_rate": row.get("pass_rate"), "is_consistent": row.get("is_consistent")},
    )

"""ViRL39K (TIGER-Lab/ViRL39K, the VL-Rethinker RL set): ``39Krelease.parquet`` with the images
in ``images.zip`` (unzip it next to the parquet, or point ``image_root`` at it).

========================  ===============================================================
ViRL39K column            Sample field
========================  ===============================================================
``qid``                   ``id`` (``virl39k-<qid>``)
``question``              ``question`` (``<image>`` placeholders removed)
``answer``                ``answer``: the content of its ``\\boxed{}``; a lone letter makes
                          the question ``multiple_choice`` (options parsed from the
                          question), anything else ``math`` (math-verify)
``image``                 ``images``: a list of paths such as ``images/Processed-….jpg``,
                          relative to ``image_root``
``category``              ``category``
``source``                ``metadata.origin`` (the dataset ViRL39K took it from)
``PassRate_32BTrained``   ``metadata.pass_rate_32b`` (``max_pass_rate`` filters on it)
``PassRate_7BBase``       ``metadata.pass_rate_7b``
========================  ===============================================================

Re-uploads in the Hugging Face image layout (``problem``, ``images`` as image structs, ``id``)
read the same way.
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

SOURCE = "virl39k"


def convert_row(row: dict[str, Any], ctx: RowContext) -> Sample | None:
    """One ViRL39K row as a Sample (None: filtered out by ``max_pass_rate``)."""
    if not pass_rate_ok(row.get("PassRate_32BTrained"), ctx.cfg):
        return None
    qid = row.get("qid", row.get("id"))
    if qid is None or str(qid) == "":
        raise BadRow("no qid")
    raw_question = row.get("question") or row.get("problem")
    if not isinstance(raw_question, str) or not raw_question.strip():
        raise BadRow("no question")
    question = strip_image_tags(raw_question)
    answer_type, answer, options = infer_answer_type(answer_from(row.get("answer")), question, "math")
    images = row.get("image", row.get("images")) or []
    if isinstance(images, str | dict):
        images = [images]
    data = [image_bytes(x, ctx.image_root) for x in images]
    return converted_sample(
        ctx,
        SOURCE,
        qid,
        data,
        question=question,
        answer=answer,
        answer_type=answer_type,
        options=options,
        category=str(row.get("category") or ""),
        metadata={
            "origin": row.get("source"),
            "pass_rate_32b": row.get("PassRate_32BTrained"),
            "pass_rate_7b": row.get("PassRate_7BBase"),
        },
    )

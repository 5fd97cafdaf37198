"""PyVision-RL's image RL data (Agents-X/PyVision-Image-RL-Data): ``pyvision_image_rl_data.json``,
a JSON array (JSONL also read) whose rows name image files.

Two row layouts are read. The dataset card's plain rows:

===================  ===========================================================
PyVision-RL key      Sample field
===================  ===========================================================
``id``               ``id`` (``pyvision_rl-<id>``)
``question``         ``question`` (options such as ``(A) rubber`` stay in the text)
``answer``           ``answer``: a lone letter makes it ``multiple_choice`` (options
                     parsed from the question), a number ``math``, else
                     ``short_answer``
``image_path``       ``images`` (absolute, or relative to ``image_root``)
``ability``          ``category``
``data_source``      ``metadata.data_source``
===================  ===========================================================

and veRL rows as PyVision-RL's loader builds them: ``extra_info.question`` /
``extra_info.answer`` (else ``reward_model.ground_truth``), ``extra_info.index`` as the id,
``mm_hint.hint_path`` as the image, ``ability``, ``data_source``.
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
    strip_image_tags,
)

SOURCE = "pyvision_rl"


def convert_row(row: dict[str, Any], ctx: RowContext) -> Sample | None:
    """One PyVision-RL row as a Sample."""
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    hint = row.get("mm_hint") if isinstance(row.get("mm_hint"), dict) else {}
    reward = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    question = row.get("question", extra.get("question"))
    if not isinstance(question, str) or not question.strip():
        raise BadRow("no question")
    answer = row.get("answer", extra.get("answer", reward.get("ground_truth")))
    answer_type, answer, options = infer_answer_type(answer_from(answer), question, "short_answer")
    ident = row.get("id", extra.get("index"))
    if ident is None or str(ident) == "":
        raise BadRow("no id")
    path = row.get("image_path", hint.get("hint_path"))
    paths = path if isinstance(path, list) else ([path] if path else [])
    data = [image_bytes(str(p), ctx.image_root) for p in paths]
    return converted_sample(
        ctx,
        SOURCE,
        ident,
        data,
        question=strip_image_tags(question),
        answer=answer,
        answer_type=answer_type,
        options=options,
        category=str(row.get("ability") or ""),
        metadata={"data_source": row.get("data_source")},
    )

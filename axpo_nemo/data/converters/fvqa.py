"""FVQA (lmms-lab/FVQA, MMSearch-R1's search VQA): ``fvqa_train.parquet`` / ``fvqa_test.parquet``
in veRL's RL layout, the images embedded.

=================================  =====================================================
FVQA column                        Sample field
=================================  =====================================================
``data_id``                        ``id`` (``fvqa-<data_id>``)
``prompt``                         ``question``: the last ``user`` message's ``content``
                                   (``<image>`` placeholders removed)
``images``                         ``images``: image structs ``{"bytes": …}`` (JPEG/PNG)
``reward_model.ground_truth``      ``answer`` (``short_answer``)
``reward_model.candidate_answers`` ``candidates``: a JSON-encoded list of aliases
``category``                       ``category`` (``search_free`` / ``search_required``)
``data_source``, ``image_urls``    ``metadata``
=================================  =====================================================
"""

from __future__ import annotations

import json
from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.converters.common import (
    BadRow,
    RowContext,
    converted_sample,
    image_bytes,
    strip_image_tags,
)

SOURCE = "fvqa"


def _question(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise BadRow("prompt must be a non-empty list of messages")
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise BadRow("prompt has no user message with text content")
    return users[-1]["content"]


def _candidates(value: Any, answer: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("reward_model.candidate_answers is not a JSON list") from None
    if not isinstance(value, list):
        raise BadRow("reward_model.candidate_answers must be a list")
    out: list[str] = []
    for c in value:
        text = str(c).strip()
        if text and text != answer and text not in out:
            out.append(text)
    return out


def convert_row(row: dict[str, Any], ctx: RowContext) -> Sample | None:
    """One FVQA row as a Sample."""
    reward = row.get("reward_model")
    if isinstance(reward, str):
        try:
            reward = json.loads(reward)
        except json.JSONDecodeError:
            raise BadRow("reward_model is not a JSON object") from None
    if not isinstance(reward, dict):
        raise BadRow("no reward_model")
    answer = str(reward.get("ground_truth") or "").strip()
    if not answer:
        raise BadRow("reward_model.ground_truth is empty")
    question = strip_image_tags(_question(row.get("prompt")))
    if not question:
        raise BadRow("empty question")
    data_id = row.get("data_id") or f"row{ctx.row}"
    images = row.get("images") or []
    if isinstance(images, dict | str | bytes):
        images = [images]
    data = [image_bytes(x, ctx.image_root) for x in images]
    return converted_sample(
        ctx,
        SOURCE,
        data_id,
        data,
        question=question,
        answer=answer,
        answer_type="short_answer",
        candidates=_candidates(reward.get("candidate_answers"), answer),
        category=str(row.get("category") or ""),
        metadata={"data_source": row.get("data_source"), "image_urls": row.get("image_urls")},
    )

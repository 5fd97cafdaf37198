"""Tool schemas as the model sees them: full, or brief (``tools.schema_detail``)."""

from __future__ import annotations

import json

from image_helpers import random_image

from axpo_nemo.agent.tools.base import ToolContext
from axpo_nemo.agent.tools.config import ToolsConfig
from axpo_nemo.agent.tools.registry import build_tools
from axpo_nemo.models import build_tiny_tokenizer


def _tokens(schemas: list[dict]) -> int:
    tok = build_tiny_tokenizer()
    return sum(len(tok(json.dumps(s))["input_ids"]) for s in schemas)


def test_brief_schemas_keep_names_and_required_parameters_in_far_fewer_tokens():
    full = build_tools(ToolsConfig(enabled=["image_zoom_in", "python"]))
    brief = build_tools(ToolsConfig(enabled=["image_zoom_in", "python"], schema_detail="brief"))
    with full, brief:
        for name in full:
            f, b = full[name].schema()["function"], brief[name].schema()["function"]
            assert b["name"] == f["name"]
            assert b["parameters"]["required"] == f["parameters"]["required"]
            assert set(b["parameters"]["properties"]) == set(f["parameters"]["required"])
            assert f["description"].startswith(b["description"].rstrip("."))
            assert all("description" not in p for p in b["parameters"]["properties"].values())
        assert _tokens(brief.schemas()) < 0.5 * _tokens(full.schemas())


def test_a_briefly_declared_tool_runs_like_the_tool():
    with build_tools(ToolsConfig(enabled=["image_zoom_in"], schema_detail="brief")) as tools:
        ctx = ToolContext(images=[random_image(64, 48)])
        result = tools["image_zoom_in"]({"bbox_2d": [0, 0, 500, 500]}, ctx)
        assert result.ok and result.images[0].size[0] > 0
        bad = tools["image_zoom_in"]({"bbox_2d": "x"}, ctx)
        assert bad.error == "bad_arguments"

"""Tool schemas as the model sees them: full, or brief (``tools.schema_detail``); and the tool
table every tool is built from (``agent.tools.catalog``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from image_helpers import random_image

from axpo_nemo.agent.tools import registry
from axpo_nemo.agent.tools.base import Tool, ToolContext
from axpo_nemo.agent.tools.catalog import TOOL_NAMES, TOOLS, tool_spec
from axpo_nemo.agent.tools.config import ToolsConfig
from axpo_nemo.agent.tools.registry import build_tools
from axpo_nemo.agent.tools.search_config import SearchConfig
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


def test_every_table_entry_builds_its_own_tool_from_its_own_section(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "contents": "Paris\nthe capital of France"}) + "\n")
    cfg = ToolsConfig(enabled=list(TOOL_NAMES), search=SearchConfig(corpus_path=str(corpus)))
    assert TOOL_NAMES == tuple(TOOLS) == ("image_zoom_in", "python", "search")
    sections = {f.name for f in dataclasses.fields(ToolsConfig)}
    with build_tools(cfg) as tools:
        assert list(tools) == list(TOOL_NAMES)
        for name, spec in TOOLS.items():
            assert spec.section in sections, name
            assert isinstance(tools[name], Tool) and tools[name].name == name
            assert tools[name].schema()["function"]["name"] == name


def test_a_name_without_a_table_entry_is_an_error_not_another_tool(monkeypatch):
    # A name the config accepts but the table lacks (as if added to TOOL_NAMES alone) must not be
    # built as some other tool (search used to be the fallback): the error names it and the table.
    monkeypatch.setattr(registry, "TOOL_NAMES", (*TOOL_NAMES, "calculator"))
    cfg = ToolsConfig(enabled=["image_zoom_in"])
    cfg.enabled.append("calculator")
    known = "image_zoom_in, python, search"
    with pytest.raises(ValueError, match=f"^tools.enabled: unknown tool 'calculator'; choose from {known}$"):
        build_tools(cfg)
    with pytest.raises(ValueError, match=f"unknown tool 'calculator'; choose from {known}$"):
        tool_spec("calculator")
    assert tool_spec("search").needs == "tools.search.corpus_path or tools.search.url"


def test_a_tool_that_needs_settings_names_the_keys_to_set():
    with pytest.raises(
        ValueError, match=r"^tools\.search: .*\(set tools\.search\.corpus_path or tools\.search\.url\)$"
    ):
        build_tools(ToolsConfig(enabled=["search"]))

"""Which tools an agent gets, built from the config's ``tools:`` section."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from axpo_nemo.agent.tools.base import Tool, ToolContext, ToolResult, brief_schema
from axpo_nemo.agent.tools.config import TOOL_NAMES, ToolsConfig
from axpo_nemo.agent.tools.python_tool import PythonTool
from axpo_nemo.agent.tools.search import SearchTool
from axpo_nemo.agent.tools.zoom import ImageZoomTool


class Toolbox(Mapping[str, Tool]):
    """The enabled tools by name; closing it stops the python sandbox's worker pool."""

    def __init__(self, tools: Mapping[str, Tool]) -> None:
        self._tools = dict(tools)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def schemas(self) -> list[dict]:
        """The enabled tools' function schemas, for the system prompt."""
        return [tool.schema() for tool in self._tools.values()]

    def close(self) -> None:
        """Release what the tools hold (the sandbox pool)."""
        for tool in self._tools.values():
            close = getattr(tool, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Toolbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BriefTool:
    """A tool declared with its `brief_schema`; calls and ``close`` go to the tool itself."""

    def __init__(self, tool: Tool) -> None:
        self.tool, self.name = tool, tool.name

    def schema(self) -> dict[str, Any]:
        """The tool's schema, cut short."""
        return brief_schema(self.tool.schema())

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Run the tool."""
        return self.tool(arguments, context)

    def close(self) -> None:
        """Release what the tool holds."""
        close = getattr(self.tool, "close", None)
        if close is not None:
            close()


def build_tools(cfg: ToolsConfig) -> Toolbox:
    """The tools ``cfg.enabled`` names, configured from their sections.

    The python tool's sandbox pool starts on its first call; close the toolbox when done.
    """
    unknown = [name for name in cfg.enabled if name not in TOOL_NAMES]
    if unknown:
        raise ValueError(f"tools.enabled: unknown tool {unknown[0]!r}; choose from {', '.join(TOOL_NAMES)}")
    tools: dict[str, Tool] = {}
    for name in cfg.enabled:
        if name == "image_zoom_in":
            tools[name] = ImageZoomTool(cfg.zoom)
        elif name == "python":
            tools[name] = PythonTool(config=cfg.python)
        else:
            try:
                tools[name] = SearchTool(cfg=cfg.search)
            except ValueError as exc:  # e.g. no corpus_path for bm25: name the config keys
                raise ValueError(f"tools.search: {exc} (set tools.search.corpus_path or tools.search.url)") from exc
    if cfg.schema_detail == "brief":
        tools = {name: BriefTool(tool) for name, tool in tools.items()}
    return Toolbox(tools)

"""Which tools an agent gets, built from the config's ``tools:`` section.

Each tool is built from its entry in the tool table (`axpo_nemo.agent.tools.catalog.TOOLS`):
its builder, the config section it reads and what it needs. Adding a tool is adding an entry
there (see docs/extending.md); nothing here names a tool.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from axpo_nemo.agent.tools.base import Tool, ToolContext, ToolResult, brief_schema
from axpo_nemo.agent.tools.catalog import TOOLS, ToolSpec, tool_spec
from axpo_nemo.agent.tools.config import TOOL_NAMES, ToolsConfig

__all__ = [
    "TOOLS",
    "TOOL_NAMES",
    "BriefTool",
    "ToolSpec",
    "Toolbox",
    "ToolsConfig",
    "build_tool",
    "build_tools",
]


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


def build_tool(spec: ToolSpec, cfg: ToolsConfig) -> Tool:
    """The tool of table entry ``spec``, configured from its section of ``cfg``.

    A ``ValueError`` from the builder of a tool that ``needs`` settings is re-raised naming the
    section and the keys to set.
    """
    try:
        return spec.build(getattr(cfg, spec.section))
    except ValueError as exc:  # e.g. no corpus_path for bm25: name the config keys
        if not spec.needs:
            raise
        raise ValueError(f"tools.{spec.section}: {exc} (set {spec.needs})") from exc


def build_tools(cfg: ToolsConfig) -> Toolbox:
    """The tools ``cfg.enabled`` names, configured from their sections.

    Every name is looked up in the tool table before any tool is built; a name without an entry
    raises ``ValueError`` naming it and the known tools. The python tool's sandbox pool starts
    on its first call; close the toolbox when done.
    """
    specs = [tool_spec(name) for name in cfg.enabled]
    tools: dict[str, Tool] = {spec.name: build_tool(spec, cfg) for spec in specs}
    if cfg.schema_detail == "brief":
        tools = {name: BriefTool(tool) for name, tool in tools.items()}
    return Toolbox(tools)

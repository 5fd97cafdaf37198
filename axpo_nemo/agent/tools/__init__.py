"""Agent tools: image zoom, sandboxed python, and search."""

from axpo_nemo.agent.tools.base import Tool, ToolContext, ToolResult

__all__ = ["Tool", "ToolContext", "ToolResult"]

"""The table of agent tools: each tool's name, config section, builder and what it needs.

`TOOLS` is the one place a tool is registered. `TOOL_NAMES` (the valid values of
``tools.enabled``) is derived from it, and `axpo_nemo.agent.tools.registry.build_tools` builds
every enabled tool from its entry; a name without an entry is an error that names it and the
known tools, never a silent fallback to another tool.

Nothing here imports a tool's implementation: each builder imports its own module when it runs,
so the config schema reads `TOOL_NAMES` from here and loading a config stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axpo_nemo.agent.tools.base import Tool

__all__ = ["TOOLS", "TOOL_NAMES", "ToolSpec", "tool_spec"]


@dataclass(frozen=True)
class ToolSpec:
    """One agent tool.

    Attributes:
        name: what the model calls and ``tools.enabled`` lists; the built tool's ``name``.
        section: the `ToolsConfig` field holding the tool's settings (``tools.<section>``).
        build: ``build(settings) -> Tool``, called with that section's value.
        needs: the config keys the tool needs beyond its defaults (``tools.search.corpus_path or
            tools.search.url``), added to a ``ValueError`` its builder raises; empty when the
            defaults suffice.
    """

    name: str
    section: str
    build: Callable[[Any], Tool]
    needs: str = ""


def _zoom(settings: Any) -> Tool:
    """The ``image_zoom_in`` tool from ``tools.zoom``."""
    from axpo_nemo.agent.tools.zoom import ImageZoomTool

    return ImageZoomTool(settings)


def _python(settings: Any) -> Tool:
    """The ``python`` tool from ``tools.python`` (its sandbox pool starts on the first call)."""
    from axpo_nemo.agent.tools.python_tool import PythonTool

    return PythonTool(config=settings)


def _search(settings: Any) -> Tool:
    """The ``search`` tool from ``tools.search`` (loads the BM25 corpus or points at the server)."""
    from axpo_nemo.agent.tools.search import SearchTool

    return SearchTool(cfg=settings)


_ALL = [
    ToolSpec("image_zoom_in", "zoom", _zoom),
    ToolSpec("python", "python", _python),
    ToolSpec("search", "search", _search, needs="tools.search.corpus_path or tools.search.url"),
]

#: Every tool by name, in the order `axpo config keys tools` and error messages list them.
TOOLS: dict[str, ToolSpec] = {spec.name: spec for spec in _ALL}
#: The valid values of ``tools.enabled``.
TOOL_NAMES: tuple[str, ...] = tuple(TOOLS)


def tool_spec(name: str) -> ToolSpec:
    """The table entry of tool ``name``.

    Raises:
        ValueError: ``name`` has no entry; the message names it and every known tool.
    """
    spec = TOOLS.get(name)
    if spec is None:
        raise ValueError(f"tools.enabled: unknown tool {name!r}; choose from {', '.join(TOOLS)}")
    return spec

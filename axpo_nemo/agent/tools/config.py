"""The config's ``tools:`` section (`ToolsConfig`), apart from the tools themselves (built by
`axpo_nemo.agent.tools.registry.build_tools`) so that loading a config stays light. The valid tool
names come from the tool table (`axpo_nemo.agent.tools.catalog.TOOLS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from axpo_nemo.agent.sandbox.config import SandboxConfig
from axpo_nemo.agent.tools.catalog import TOOL_NAMES
from axpo_nemo.agent.tools.search_config import SearchConfig
from axpo_nemo.agent.tools.zoom import ZoomConfig
from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["TOOL_NAMES", "ToolsConfig"]


@dataclass
class ToolsConfig(ValidatedConfig):
    """The agent's tools and how their calls run."""

    enabled: list[str] = setting(
        ["image_zoom_in", "python"],
        "Tools declared to the model and executable. 'search' also needs tools.search.corpus_path "
        "(BM25) or tools.search.url (HTTP retriever).",
        choices=TOOL_NAMES,
    )
    timeout_s: float = setting(
        30.0, "Wall-clock limit of one tool call in the agent loop (the sandbox has its own).", gt=0.0
    )
    workers: int = setting(16, "Tool calls run at the same time at most.", ge=1)
    schema_detail: str = setting(
        "full",
        "How the tools are declared in the system prompt: 'full' (descriptions of the tool and every "
        "parameter) or 'brief' (the description's first sentence, required parameters and their types: "
        "about a quarter of the tokens, for small models trained from scratch).",
        choices=("full", "brief"),
    )
    zoom: ZoomConfig = field(default_factory=ZoomConfig)
    python: SandboxConfig = field(default_factory=SandboxConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

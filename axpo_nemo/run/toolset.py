"""The tools a command needs, built from a `Config` the way training builds them.

A command builds only the tools it runs: ``axpo tools list`` builds no search backend (the schema
does not depend on it), ``axpo tools run NAME`` builds NAME alone, and a benchmark suite builds
the tools its benchmarks allow. When ``tools.search.corpus_path`` is unset, the BM25 search
tool reads the data folder's ``corpus.jsonl`` (``data.dir``, else ``<output_dir>/data``), which
the synthetic task writes, as `axpo train` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from axpo_nemo.config.loader import ConfigError

if TYPE_CHECKING:
    from axpo_nemo.agent.tools.config import ToolsConfig
    from axpo_nemo.agent.tools.registry import Toolbox
    from axpo_nemo.config.schema import Config

#: The search corpus the synthetic task writes into the data folder.
CORPUS_FILE = "corpus.jsonl"


def data_dir(cfg: Config) -> Path:
    """The run's data folder: ``data.dir``, else ``<output_dir>/data``."""
    return Path(cfg.data.dir) if cfg.data.dir else Path(cfg.output_dir) / "data"


def resolve_tools_config(
    cfg: Config, names: Collection[str] | None = None, *, data_corpus: bool = True
) -> ToolsConfig:
    """``cfg.tools`` cut to the enabled tools among ``names`` (all when None), in configured
    order, with the search backend's settings checked and its corpus resolved.

    Args:
        cfg: the loaded config.
        names: the tools the command needs.
        data_corpus: an unset ``tools.search.corpus_path`` means the data folder's
            ``corpus.jsonl`` (the synthetic task's); False for commands on other data.

    Raises:
        ConfigError: search is needed but has no corpus (or no server URL), or its corpus file
            does not exist; the message names the key to set.
    """
    tools = cfg.tools
    enabled = [name for name in tools.enabled if names is None or name in names]
    search = tools.search
    if "search" in enabled:
        if search.backend == "http" and not search.url:
            raise ConfigError("tools.search.backend is 'http' but tools.search.url is unset")
        if search.backend == "bm25" and not search.corpus_path:
            corpus = data_dir(cfg) / CORPUS_FILE
            if not data_corpus:
                raise ConfigError(
                    "search has no corpus: set tools.search.corpus_path (a JSONL corpus) "
                    "or tools.search.backend=http tools.search.url=URL"
                )
            if not corpus.is_file():
                raise ConfigError(
                    f"search has no corpus: set tools.search.corpus_path (a JSONL corpus); the default, "
                    f"{corpus} (the synthetic task's), does not exist yet: axpo train writes it"
                )
            search = dataclasses.replace(search, corpus_path=str(corpus))
        elif search.backend == "bm25" and not Path(search.corpus_path).is_file():
            raise ConfigError(f"tools.search.corpus_path: {search.corpus_path} does not exist")
    return dataclasses.replace(tools, enabled=enabled, search=search)


def build_command_tools(
    cfg: Config, names: Collection[str] | None = None, *, data_corpus: bool = True
) -> Toolbox:
    """Build the enabled tools among ``names`` (all when None); see `resolve_tools_config`.

    Close the toolbox when done (it may hold the python sandbox's worker pool).
    """
    from axpo_nemo.agent.tools.registry import build_tools

    return build_tools(resolve_tools_config(cfg, names, data_corpus=data_corpus))


class _NoBackend:
    """A search backend for reading the tool's schema only."""

    def search(self, query: str, k: int) -> list[Any]:
        """Never called: the schema does not search."""
        raise RuntimeError("this search tool was built for its schema only")


def tool_schemas(cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """Every enabled tool's schema as the model sees it, and notes on tools that could not run
    as configured (e.g. search without a corpus yet). Builds no search backend."""
    from axpo_nemo.agent.tools.registry import BriefTool, build_tools
    from axpo_nemo.agent.tools.search import SearchTool

    notes = []
    others = [name for name in cfg.tools.enabled if name != "search"]
    with build_tools(dataclasses.replace(cfg.tools, enabled=others)) as built:
        tools = dict(built)
        if "search" in cfg.tools.enabled:
            try:
                resolve_tools_config(cfg, ["search"])
            except ConfigError as exc:
                notes.append(str(exc))
            search = SearchTool(backend=_NoBackend(), cfg=cfg.tools.search)
            tools["search"] = BriefTool(search) if cfg.tools.schema_detail == "brief" else search
        return [tools[name].schema() for name in cfg.tools.enabled], notes

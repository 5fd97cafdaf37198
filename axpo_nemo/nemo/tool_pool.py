"""The agent's tools at cluster scale: the same tools, run in a pool of Ray actors.

`RayToolPool` starts ``workers`` actors; each builds the configured tools itself (`build_tools`:
the same zoom / python / search tools, the python sandbox with its own limits inside the actor's
node). `RayToolPool.tools` returns a name → tool mapping of proxies that implement the `Tool`
protocol, so the agent loop runs unchanged: its `ToolRunner` threads call a proxy, the proxy runs
the call on a free actor and returns the actor's `ToolResult`, and the loop processes images,
renders observations and applies its own per-call timeout exactly as it does with local tools.

A call holds one actor for its duration (at most ``workers`` calls run at once). A call that does
not finish within the timeout becomes a ``timeout`` error result — the same one the loop produces —
and its actor is killed and replaced, so a hung tool never shrinks the pool. An actor that dies
(e.g. a crash of the process) gives a ``crashed`` result and is replaced too.

Ray is imported lazily: ``import axpo_nemo`` does not need it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from axpo_nemo.agent.tools.base import Tool, ToolContext, ToolResult
from axpo_nemo.agent.tools.registry import Toolbox, ToolsConfig, build_tools

__all__ = ["RayToolPool", "RemoteTool", "ToolHost"]

logger = logging.getLogger(__name__)

#: ``factory(tools_cfg) -> Mapping[str, Tool]``: what each actor runs (default `build_tools`).
ToolFactory = Callable[[ToolsConfig], Mapping[str, Tool]]


class ToolHost:
    """What one actor holds: the tools, built once in the actor's process.

    Args:
        cfg: the ``tools`` config section.
        factory: builds the tools from ``cfg`` (default `build_tools`).
    """

    def __init__(self, cfg: ToolsConfig, factory: ToolFactory | None = None) -> None:
        self.tools = (factory or build_tools)(cfg)
        self.schemas = {name: tool.schema() for name, tool in self.tools.items()}
        for tool in self.tools.values():  # start the python sandbox now, not inside a call's timeout
            getattr(tool, "pool", None)

    def tool_schemas(self) -> dict[str, dict]:
        """The tools' schemas by name."""
        return self.schemas

    def call(self, name: str, arguments: Any, context: ToolContext) -> ToolResult:
        """Run one call; a raising tool becomes a ``crashed`` result (as in the loop)."""
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult.failure("unknown_tool", f"unknown tool {name!r}")
        try:
            result = tool(arguments, context)
        except Exception as exc:  # the loop does the same for local tools
            return ToolResult.failure("crashed", f"the tool {name!r} crashed ({type(exc).__name__}: {exc})")
        if not isinstance(result, ToolResult):
            return ToolResult.failure("crashed", f"the tool returned {type(result).__name__}, not a result")
        return result

    def close(self) -> None:
        """Release what the tools hold (the sandbox pool)."""
        close = getattr(self.tools, "close", None)
        if close is not None:
            close()


class RemoteTool:
    """A `Tool` whose calls run on the pool's actors (what the agent loop gets)."""

    def __init__(self, pool: RayToolPool, name: str, schema: dict) -> None:
        self.pool, self.name, self._schema = pool, name, schema

    def schema(self) -> dict:
        """The tool's schema, as the actors' tool reports it."""
        return self._schema

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Run the call on a free actor (blocks while all are busy)."""
        return self.pool.call(self.name, arguments, context)


class RayToolPool(Toolbox):
    """A pool of ``workers`` Ray actors running the configured tools (module docstring).

    Use it as the agent loop's tool mapping (``run_rollouts(states, gen, pool, ...)``) and close it
    when done (or use it as a context manager). Ray must be initialised first (``ray.init`` or
    NeMo-RL's ``init_ray``).

    Args:
        cfg: the ``tools`` config section (same sandbox and limits as the local backend).
        workers: actors in the pool (``nemo.tool_workers``).
        timeout_s: wall-clock limit of one call (default ``cfg.timeout_s``, like the loop's).
        num_cpus: CPUs Ray reserves per actor.
        factory: what each actor builds (default `build_tools`); must be importable or picklable.
        start_timeout_s: how long to wait for the first actor to start (it cannot when the cluster
            has no free CPU for it).
    """

    def __init__(
        self,
        cfg: ToolsConfig,
        workers: int,
        *,
        timeout_s: float | None = None,
        num_cpus: float = 1.0,
        factory: ToolFactory | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        if workers < 1:
            raise ValueError(f"RayToolPool: workers must be >= 1 (got {workers})")
        if not ray.is_initialized():
            raise RuntimeError(
                "RayToolPool: Ray is not initialised (call ray.init or NeMo-RL's init_ray first)"
            )
        self._ray = ray
        self.cfg = cfg
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._actor_cls = ray.remote(num_cpus=num_cpus)(ToolHost)
        self._factory = factory
        self._free: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._actors: list = []
        self.replaced = 0
        self._closed = False
        actors = [self._spawn() for _ in range(workers)]
        try:
            schemas = ray.get([a.tool_schemas.remote() for a in actors], timeout=start_timeout_s)[0]
        except GetTimeoutError as exc:
            self.close()
            raise RuntimeError(
                f"RayToolPool: the tool workers did not start within {start_timeout_s:g} s (the cluster may "
                f"lack {num_cpus:g} free CPU per worker; lower nemo.tool_workers)"
            ) from exc
        for actor in actors:
            self._free.put(actor)
        super().__init__({name: RemoteTool(self, name, schema) for name, schema in schemas.items()})

    def _spawn(self):
        actor = self._actor_cls.remote(self.cfg, self._factory)
        with self._lock:
            self._actors.append(actor)
        return actor

    def _retire(self, actor) -> None:
        with self._lock:
            if actor in self._actors:
                self._actors.remove(actor)
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(actor, no_restart=True)
        self.replaced += 1

    @property
    def size(self) -> int:
        """Actors in the pool."""
        with self._lock:
            return len(self._actors)

    def call(self, name: str, arguments: Any, context: ToolContext) -> ToolResult:
        """Run one tool call on a free actor; never raises (timeouts and dead actors become results)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        actor = self._free.get()
        keep = True
        try:
            ref = actor.call.remote(name, arguments, context)
            return self._ray.get(ref, timeout=self.timeout_s)
        except GetTimeoutError:
            keep = False
            return ToolResult.failure(
                "timeout", f"the tool {name!r} did not finish within {self.timeout_s:g} s"
            )
        except RayActorError as exc:
            keep = False
            return ToolResult.failure(
                "crashed", f"the tool {name!r} crashed (its worker died: {type(exc).__name__})"
            )
        except Exception as exc:
            return ToolResult.failure("crashed", f"the tool {name!r} crashed ({type(exc).__name__}: {exc})")
        finally:
            if keep or self._closed:
                self._free.put(actor)
            else:
                logger.warning("tool pool: replacing the worker of a %r call that timed out or died", name)
                self._retire(actor)
                threading.Thread(target=self._add_when_ready, args=(self._spawn(),), daemon=True).start()

    def _add_when_ready(self, actor) -> None:
        """Free a new actor once it has built its tools (its start-up is not charged to a call)."""
        try:
            self._ray.get(actor.tool_schemas.remote(), timeout=self.start_timeout_s)
        except Exception:
            logger.warning("tool pool: a replacement worker did not start; the pool is one smaller")
            self._retire(actor)
            return
        self._free.put(actor)

    def close(self) -> None:
        """Close every actor's tools and kill the actors."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            actors, self._actors = list(self._actors), []
        for actor in actors:
            with contextlib.suppress(Exception):
                self._ray.get(actor.close.remote(), timeout=10)
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)

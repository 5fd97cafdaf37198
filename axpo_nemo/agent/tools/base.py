"""The tool interface every agent tool implements, and the result it returns.

A tool declares a JSON schema (rendered into the system prompt), validates its arguments and
runs. It never raises for bad input: anything wrong becomes a `ToolResult` with ``error`` set,
whose text the model sees as the observation, so a malformed call costs the rollout nothing but
a turn (DESIGN.md §2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

#: Characters of one tool response at most (the agent loop's default `max_observation_chars`).
MAX_OBSERVATION_CHARS = 65_536


def cap_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters: its head and tail, with a marker saying how
    many characters were omitted in between."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(f"\n... [{len(text)} characters omitted] ...\n"), 0)
    head, tail = keep - keep // 2, keep // 2
    marker = f"\n... [{len(text) - keep} characters omitted] ...\n"
    return text[:head] + marker + text[len(text) - tail :]


@dataclass
class ToolContext:
    """What a tool call may use besides its arguments.

    Attributes:
        images: the trajectory's images so far, in order (the question's first, then tool outputs).
        question_id: an identifier of the question, for logging.
        timeout_s: wall-clock budget for this call.
    """

    images: list[Image.Image] = field(default_factory=list)
    question_id: str | None = None
    timeout_s: float = 30.0


@dataclass
class ToolResult:
    """A tool call's observation: text, any images it produced, and whether it failed.

    ``error`` is None on success; otherwise a short machine-readable kind (``bad_arguments``,
    ``timeout``, ``crashed``, ``unknown_tool``, …) while ``text`` explains it to the model.
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the call succeeded."""
        return self.error is None

    @classmethod
    def failure(cls, kind: str, text: str, **metadata: Any) -> ToolResult:
        """An error observation of the given kind."""
        return cls(text=f"Error: {text}", error=kind, metadata=metadata)


@runtime_checkable
class Tool(Protocol):
    """An agent tool: a name, a JSON schema for its arguments, and a call that never raises."""

    name: str

    def schema(self) -> dict[str, Any]:
        """The OpenAI/Qwen function schema: ``{"type": "function", "function": {name, description, parameters}}``."""
        ...

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Run the tool; bad arguments or failures come back as an error `ToolResult`."""
        ...


def argument_object(arguments: Any, example: str) -> dict[str, Any] | ToolResult:
    """A call's arguments as a dict (JSON text is parsed), or a ``bad_arguments`` error showing ``example``."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return ToolResult.failure("bad_arguments", f"arguments must be a JSON object like {example}.")
    if not isinstance(arguments, dict):
        return ToolResult.failure(
            "bad_arguments", f"arguments must be an object like {example}, not {type(arguments).__name__}."
        )
    return arguments


def unexpected_arguments(arguments: dict[str, Any], tool: str, allowed: Sequence[str]) -> ToolResult | None:
    """A ``bad_arguments`` error naming the arguments ``tool`` does not take, or None.

    Every tool rejects them alike rather than ignoring them: a model must learn the schema, and a
    silently ignored argument (``{"query": ..., "site": ...}``) looks like it worked.
    """
    extra = sorted(str(k) for k in arguments if k not in allowed)
    if not extra:
        return None
    takes = ", ".join(f"'{name}'" for name in allowed)
    return ToolResult.failure(
        "bad_arguments", f"unexpected argument(s) {', '.join(extra)}; the {tool} tool takes only {takes}."
    )


def brief_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` cut to what a model trained on it needs: the description's first sentence and
    the required parameters with their types, no parameter descriptions.

    For small models trained from scratch (the demo), where the full schemas would be most of every
    prompt's tokens; a pretrained checkpoint reads the full ones (``tools.schema_detail``).
    """
    function = schema["function"]
    description = function.get("description", "")
    first = description.split(". ", 1)[0].rstrip(".")
    params = function.get("parameters", {})
    required = list(params.get("required", []))
    properties = {
        name: {key: value for key, value in spec.items() if key in ("type", "items")}
        for name, spec in params.get("properties", {}).items()
        if name in required
    }
    brief = {"name": function["name"], "description": f"{first}." if first else ""}
    brief["parameters"] = {"type": params.get("type", "object"), "properties": properties, "required": required}
    return {"type": schema.get("type", "function"), "function": brief}

"""The ``python`` tool: model-written code run in the sandbox, its output and images observed.

Every call runs in a fresh, confined process from a shared warm `SandboxPool` (see
`axpo_nemo.agent.sandbox`), with the trajectory's images preloaded. Whatever the code does, the
tool returns a `ToolResult`: its printed output and images, or an error observation whose kind
(``bad_arguments``, ``timeout``, ``memory``, ``output_limit``, ``exception``, ``crashed``,
``busy``, ``sandbox_error``) the trainer can count.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from axpo_nemo.agent.sandbox import SandboxConfig, SandboxPool, SandboxResult
from axpo_nemo.agent.tools.base import ToolContext, ToolResult, argument_object, unexpected_arguments

# SandboxResult.failure -> ToolResult.error
ERROR_KINDS = {
    "timeout": "timeout",
    "cpu": "timeout",
    "memory": "memory",
    "output_limit": "output_limit",
    "exception": "exception",
    "exit": "crashed",
    "crash": "crashed",
    "signal": "crashed",
    "busy": "busy",
    "sandbox_error": "sandbox_error",
}


def _signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number).name if number is not None else "a signal"
    except ValueError:
        return f"signal {number}"


class PythonTool:
    """Runs python code in the sandbox. Arguments: ``{"code": "<python source>"}``.

    Args:
        pool: the shared sandbox pool to run calls on (not closed by the tool).
        config: settings for a pool the tool creates on its first call (and closes in `close`)
            when no ``pool`` is given.
    """

    name = "python"

    def __init__(self, pool: SandboxPool | None = None, config: SandboxConfig | None = None) -> None:
        if pool is not None and config is not None and pool.config is not config:
            raise ValueError("pass a pool or a config, not both")
        self._pool = pool
        self._owns_pool = pool is None
        self.config = pool.config if pool is not None else (config or SandboxConfig())
        self._lock = threading.Lock()

    @property
    def pool(self) -> SandboxPool:
        """The sandbox pool (created on first use when the tool owns it)."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = SandboxPool(self.config)
        return self._pool

    def description(self) -> str:
        """The tool's description for the system prompt (limits from the config)."""
        c = self.config
        return (
            "Run Python 3 code in a fresh sandbox and see what it prints and the images it returns. "
            "The question's images are preloaded as PIL images: `image` (the first), `images` (all, "
            "in order) and `image_1`, `image_2`, ...; numpy (`np`), PIL (`Image`) and matplotlib "
            "(`plt`) are available. To return an image, call `show(x)` with a PIL image, a numpy array "
            "or a matplotlib figure; `plt.show()` returns the open figures, and image files saved in "
            f"the working directory are returned too (at most {c.max_images} images, downscaled to "
            f"{c.max_image_pixels:,} pixels). Use print() to see values. Each call starts from "
            "scratch: variables and files do not carry over. Limits: "
            f"{c.timeout_s:g} s, {c.memory_mb} MiB of memory, no network, files only in the working "
            "directory."
        )

    def schema(self) -> dict[str, Any]:
        """The function schema: one required string argument, ``code``."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description(),
                "parameters": {
                    "type": "object",
                    "properties": {"code": {"type": "string", "description": "Python source code to run."}},
                    "required": ["code"],
                },
            },
        }

    def validate(self, arguments: Any) -> str | ToolResult:
        """The code to run, or a ``bad_arguments`` error result explaining what is wrong."""
        arguments = argument_object(arguments, '{"code": "print(1)"}')
        if isinstance(arguments, ToolResult):
            return arguments
        unexpected = unexpected_arguments(arguments, self.name, ("code",))
        if unexpected is not None:
            return unexpected
        if "code" not in arguments:
            return ToolResult.failure(
                "bad_arguments", "missing required argument 'code' (the Python source to run)."
            )
        code = arguments["code"]
        if not isinstance(code, str):
            return ToolResult.failure("bad_arguments", f"'code' must be a string, not {type(code).__name__}.")
        if not code.strip():
            return ToolResult.failure("bad_arguments", "'code' is empty; write the Python source to run.")
        if len(code) > self.config.max_code_chars:
            return ToolResult.failure(
                "bad_arguments",
                f"'code' is {len(code):,} characters long; the limit is {self.config.max_code_chars:,}.",
            )
        return code

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Validate, run in the sandbox and turn the outcome into an observation; never raises."""
        code = self.validate(arguments)
        if isinstance(code, ToolResult):
            return code
        try:
            result = self.pool.run(code, images=context.images, timeout_s=context.timeout_s)
        except Exception as e:
            return ToolResult.failure(
                "sandbox_error", f"the sandbox could not run the code ({type(e).__name__}: {e})."
            )
        return self.observation(result, min(context.timeout_s, self.config.timeout_s))

    def observation(self, result: SandboxResult, timeout_s: float) -> ToolResult:
        """The `ToolResult` the model sees for a sandbox result."""
        parts = []
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.stderr:
            parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
        if result.images:
            parts.append(f"[{len(result.images)} image(s) returned]")
        if result.images_dropped:
            parts.append(
                f"[{result.images_dropped} image(s) not returned: at most {self.config.max_images} "
                "readable images per call]"
            )
        metadata = {
            "failure": result.failure,
            "exit_code": result.exit_code,
            "signal": result.signal,
            "duration_s": result.duration_s,
            "stdout_omitted": result.stdout_omitted,
            "stderr_omitted": result.stderr_omitted,
            "images_dropped": result.images_dropped,
        }
        if result.ok:
            text = "\n".join(parts) if parts else "(no output; use print() to see values)"
            return ToolResult(text=text, images=list(result.images), metadata=metadata)
        text = "Error: " + self._explain(result, timeout_s)
        if parts:
            text += "\n" + "\n".join(parts)
        kind = ERROR_KINDS.get(result.failure or "", "sandbox_error")
        return ToolResult(text=text, images=list(result.images), error=kind, metadata=metadata)

    def _explain(self, r: SandboxResult, timeout_s: float) -> str:
        c = self.config
        match r.failure:
            case "timeout":
                return f"the code did not finish within {timeout_s:g} s and was stopped."
            case "cpu":
                return f"the code used more than {c.cpu_time_s} s of CPU time and was stopped."
            case "memory":
                return f"the code ran out of memory (limit: {c.memory_mb} MiB)."
            case "output_limit":
                return f"the code printed more than {c.output_kill_bytes:,} bytes and was stopped."
            case "exception":
                return f"the code raised {r.error_type or 'an exception'} (traceback below)."
            case "exit":
                return f"the code exited with status {r.exit_code}."
            case "crash":
                return f"the python process crashed ({_signal_name(r.signal)})."
            case "signal":
                return f"the python process was killed ({_signal_name(r.signal)})."
            case "busy":
                return "the sandbox is busy; try again."
            case _:
                note = f" ({r.notes[0]})" if r.notes else ""
                return f"the sandbox failed to run the code; this is not the code's fault{note}."

    def close(self) -> None:
        """Close the pool if the tool created it."""
        if self._owns_pool and self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> PythonTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

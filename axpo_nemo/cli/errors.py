"""How the ``axpo`` command reports errors: user errors as one line, bugs with their traceback."""

from __future__ import annotations

#: Environment variable that, set to anything but "" or "0", shows tracebacks (as ``--debug``).
DEBUG_ENV = "AXPO_DEBUG"
#: Errors a user causes and can fix (a missing file or folder, a bad value, a corrupt shard, an
#: optional package not installed): their message names what is wrong, so the command prints that
#: one line. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ModuleNotFoundError)


def one_line(exc: BaseException) -> str:
    """An exception's message as one line (an OSError with a file name: ``path: reason``)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(lines) <= 1 else f"{text} …"

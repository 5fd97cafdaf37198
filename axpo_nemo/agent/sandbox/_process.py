"""Process-tree helpers shared by the zygote and the workers (Linux /proc based)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from typing import Any


def wait_killed(pid: int) -> tuple[int, Any]:
    """wait4 a child that was just SIGKILLed (never blocks long)."""
    end = time.monotonic() + 5.0
    while True:
        try:
            done, status, rusage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return signal.SIGKILL, None  # already reaped
        if done:
            return status, rusage
        if time.monotonic() > end:
            return signal.SIGKILL, None
        time.sleep(0.002)


def children(pid: int | str) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    return kids


def descendants() -> list[int]:
    """Pids of every descendant of this process (numbers as the mounted /proc shows them)."""
    found: list[int] = []
    todo = children("self")
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo += children(pid)
    return found


def rss_anon(pid: int | str) -> int:
    """Resident anonymous memory of a process, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_memory(base: int) -> int:
    """Memory the call's processes added: resident anonymous memory beyond the worker's own."""
    return sum(max(rss_anon(pid) - base, 0) for pid in descendants())


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (a subreaper, so orphans are ours too)."""
    for _ in range(50):
        todo, seen = children("self"), set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            todo += children(pid)
        if not seen:
            return
        reap_all(timeout=0.2)


def reap_exited() -> tuple[list[int], bool]:
    """Reap every child that has exited, without waiting: ``(their pids, whether children remain)``."""
    reaped = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped, False
        if pid == 0:
            return reaped, True
        reaped.append(pid)


def reap_all(timeout: float) -> None:
    """Reap exited children until none is left (or ``timeout``)."""
    end = time.monotonic() + timeout
    while reap_exited()[1] and time.monotonic() <= end:
        time.sleep(0.001)


def close_fds_except(keep: set[int]) -> None:
    """Close every file descriptor but ``keep``."""
    low = 0
    for fd in sorted(keep):
        if fd > low:  # closerange(a, b) with b <= a closes everything on Python 3.11
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def read_all(fd: int, timeout: float) -> bytes:
    """Read ``fd`` to EOF (or ``timeout``), then close it."""
    end = time.monotonic() + timeout
    chunks = []
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], max(end - time.monotonic(), 0))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)

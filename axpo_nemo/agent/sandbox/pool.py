"""The trainer-side handle of the python sandbox: a thread-safe pool of warm workers.

`SandboxPool` starts a zygote interpreter (which preloads numpy, PIL and matplotlib and probes
the host's isolation mechanisms), forks ``pool_size`` workers from it, and hands each `run`
call to a free worker; calls beyond ``pool_size`` queue. A worker that dies is replaced from the
zygote on its next use, and a dead zygote is restarted. `close` (or leaving the ``with`` block,
or interpreter exit) kills every sandbox process and removes the working directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from axpo_nemo.agent.sandbox._protocol import ProtocolError, exception_name, recv_msg, send_msg, short_text
from axpo_nemo.agent.sandbox.config import SandboxConfig
from axpo_nemo.agent.sandbox.confinement import Confinement

logger = logging.getLogger(__name__)

FAILURES = (
    "timeout",
    "cpu",
    "memory",
    "output_limit",
    "exception",
    "exit",
    "crash",
    "signal",
    "busy",
    "sandbox_error",
)
_REPLY_GRACE_S = 10.0  # the worker enforces the limit; this only guards against a wedged worker
_ZYGOTE_START_TIMEOUT_S = 120.0
_ACK_TIMEOUT_S = 10.0
_BOOTSTRAP = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[2]); "
    "from axpo_nemo.agent.sandbox._zygote import zygote_main; zygote_main(int(sys.argv[1]))"
)


class SandboxError(RuntimeError):
    """The sandbox itself could not start or run (not the code's fault)."""


@dataclass
class SandboxResult:
    """What one sandboxed call produced.

    Attributes:
        stdout, stderr: the streams' text (UTF-8, invalid bytes replaced), each cut to
            ``max_output_bytes`` by eliding the middle.
        images: images the code showed, plotted or saved (at most ``max_images``, downscaled to
            ``max_image_pixels``).
        failure: None on success, else why the call failed: ``timeout`` (wall clock), ``cpu``
            (CPU time), ``memory`` (MemoryError), ``output_limit`` (killed for too much output),
            ``exception`` (uncaught exception; traceback in stderr), ``exit`` (non-zero exit
            status), ``crash`` (fatal signal such as SIGSEGV), ``signal`` (killed by another
            signal), ``busy`` (no free worker in time) or ``sandbox_error`` (infrastructure).
        exit_code: the process's exit status, None when a signal ended it.
        signal: the signal that ended it, if any.
        error_type: the uncaught exception's class name, if any.
        duration_s: wall-clock time of the call's process.
        stdout_omitted, stderr_omitted: bytes elided from each stream.
        images_dropped: produced images that were not returned (over the cap or unreadable).
        notes: remarks from the sandbox itself, for logs.
    """

    stdout: str = ""
    stderr: str = ""
    images: list[Image.Image] = field(default_factory=list)
    failure: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    error_type: str | None = None
    duration_s: float = 0.0
    stdout_omitted: int = 0
    stderr_omitted: int = 0
    images_dropped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the code ran to completion with exit status 0."""
        return self.failure is None


class _Worker:
    """The trainer's end of one worker: its socket and pid, replaced when it dies."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.pid: int | None = None
        self.pidfd: int | None = None  # kills the right process even after its pid is reused
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()

    def attach(self, pid: int, sock: socket.socket) -> None:
        """Adopt a freshly spawned worker process."""
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)
        with self.lock:
            self.pid, self.sock, self.pidfd = pid, sock, pidfd

    def usable(self) -> bool:
        """Whether the worker is connected and has not hung up (an idle socket is never readable)."""
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def discard(self) -> None:
        """Kill the worker (its pid namespace, if any, dies with it) and drop the connection.

        Safe to call from several threads at once (a call's thread and `SandboxPool.close`).
        """
        with self.lock:
            sock, pid, pidfd = self.sock, self.pid, self.pidfd
            self.sock = self.pid = self.pidfd = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        elif pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class _Zygote:
    """The zygote process and its control socket."""

    def __init__(self, config: SandboxConfig, root: str) -> None:
        mine, theirs = socket.socketpair()
        paths = [p for p in sys.path if p and os.path.isabs(p) and os.path.exists(p)]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-E", "-s", "-c", _BOOTSTRAP, str(theirs.fileno()), json.dumps(paths)],
                pass_fds=[theirs.fileno()],
                env=_zygote_env(),
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.ctl = mine
        try:
            header = {"config": dataclasses.asdict(config), "workdir_root": root, "private_dirs": _launch_dirs()}
            send_msg(mine, header)
            reply, _, _ = recv_msg(mine, deadline=time.monotonic() + _ZYGOTE_START_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError, ProtocolError) as e:
            self.kill()
            raise SandboxError(f"the sandbox zygote did not start: {e}") from e
        if not reply.get("ready"):
            self.kill()
            raise SandboxError(f"the sandbox zygote failed: {reply.get('error')}\n{reply.get('trace', '')}")
        self.confinement = Confinement.from_dict(reply["confinement"])

    @property
    def pid(self) -> int:
        """The zygote's pid."""
        return self.proc.pid

    def spawn(self, slot: int) -> tuple[int, socket.socket]:
        """A new worker for ``slot``: (pid, connected socket)."""
        mine, theirs = socket.socketpair()
        try:
            send_msg(self.ctl, {"op": "spawn", "slot": slot}, fds=[theirs.fileno()])
            theirs.close()
            reply, _, _ = recv_msg(self.ctl, deadline=time.monotonic() + 30.0)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        if "pid" not in reply:
            mine.close()
            raise SandboxError(f"could not start a sandbox worker: {reply.get('error')}")
        return int(reply["pid"]), mine

    def kill(self, wait_s: float = 5.0) -> None:
        """Close the control socket (the zygote then kills its workers and exits); force if slow."""
        with contextlib.suppress(OSError):
            self.ctl.shutdown(socket.SHUT_RDWR)
        self.ctl.close()
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


def _launch_dirs() -> list[str]:
    """Where the trainer was started from (working directory, script directory): calls must never
    read these, whatever ``sys.path`` holds (``.env`` files, runs and checkpoints live there)."""
    dirs = [os.getcwd()]
    if sys.path and sys.path[0] and os.path.isabs(sys.path[0]):
        dirs.append(sys.path[0])  # the script's directory, or the cwd under ``python -m``
    if sys.argv and sys.argv[0] and os.path.exists(sys.argv[0]):
        dirs.append(os.path.dirname(os.path.abspath(sys.argv[0])))
    return list(dict.fromkeys(dirs))


def _zygote_env() -> dict[str, str]:
    """A scrubbed environment: model-written code must not see the trainer's secrets."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MALLOC_ARENA_MAX": "2",  # each glibc arena reserves 64 MiB of the RLIMIT_AS budget
    }
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[name] = "1"
    if "MPLCONFIGDIR" in os.environ:
        env["MPLCONFIGDIR"] = os.environ["MPLCONFIGDIR"]
    return env


class _State:
    """Everything `close` must release; kept apart from the pool so a finalizer can own it."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.zygote: _Zygote | None = None
        self.workers: list[_Worker] = []
        self.root: str | None = None

    def cleanup(self) -> None:
        """Kill the workers and the zygote and remove the working directories."""
        if os.getpid() != self.owner_pid:
            return  # a forked copy of the trainer: the sandbox belongs to the parent
        for w in self.workers:  # each step runs even if an earlier one failed
            with contextlib.suppress(Exception):
                w.discard()
        if self.zygote is not None:
            with contextlib.suppress(Exception):
                self.zygote.kill()
            self.zygote = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _encode_image(img: Image.Image) -> tuple[dict[str, Any], bytes]:
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    return {"mode": img.mode, "width": img.width, "height": img.height}, img.tobytes()


def _decode_images(blobs: list[bytes], max_pixels: int) -> tuple[list[Image.Image], int]:
    images, bad = [], 0
    for blob in blobs:
        try:
            img = Image.open(io.BytesIO(blob))
            if img.width * img.height > max_pixels:
                raise ValueError("too large")
            img.load()
            images.append(img)
        except Exception:
            bad += 1
    return images, bad


class SandboxPool:
    """A pool of warm, confined python workers; safe to share between threads.

    Example::

        with SandboxPool(SandboxConfig(pool_size=4)) as pool:
            result = pool.run("print(image.size)", images=[img])
            print(result.stdout, result.failure, pool.confinement.describe())
    """

    def __init__(self, config: SandboxConfig | None = None, *, start: bool = True) -> None:
        self.config = config or SandboxConfig()
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._state = _State()
        self._finalizer = weakref.finalize(self, self._state.cleanup)
        self._closed = False
        self._confinement: Confinement | None = None
        c = self.config
        # A reply carries two capped streams (JSON-escaped: at most 6 characters a byte) and a few
        # short fields, then PNGs as the worker bounds them; anything larger is a broken worker.
        self._max_reply_header = 12 * c.max_output_bytes + (1 << 20)
        self._max_reply_images = c.max_images * (c.max_image_pixels * 5 + (1 << 20)) + (1 << 20)
        if start:
            self.start()

    @property
    def confinement(self) -> Confinement:
        """The isolation mechanisms active for calls (probed when the pool started)."""
        self.start()
        assert self._confinement is not None
        return self._confinement

    @property
    def zygote_pid(self) -> int | None:
        """The zygote's pid (None before start or after close)."""
        zygote = self._state.zygote
        return zygote.pid if zygote is not None else None

    @property
    def workdir(self) -> str | None:
        """The directory under which calls get their working directories (None when closed)."""
        return self._state.root

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (a worker being replaced is missing)."""
        return [w.pid for w in self._state.workers if w.pid is not None]

    def start(self) -> None:
        """Start the zygote and the workers (done by the constructor unless ``start=False``)."""
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if self._state.zygote is not None:
                return
            root = tempfile.mkdtemp(prefix="axpo-sandbox-", dir=self.config.workdir_root)
            os.chmod(root, 0o711)  # per-call uids must traverse it
            self._state.root = root
            try:
                self._start_zygote()
                workers = [_Worker(slot) for slot in range(self.config.pool_size)]
                self._state.workers = workers
                for worker in workers:
                    self._spawn(worker)
            except BaseException:
                self._state.cleanup()  # all or nothing: a later start() tries again
                self._state.workers = []
                raise
            for worker in workers:
                self._idle.put(worker)

    def _start_zygote(self) -> None:
        assert self._state.root is not None
        zygote = _Zygote(self.config, self._state.root)
        self._state.zygote = zygote
        conf = zygote.confinement
        if self._confinement is None or conf != self._confinement:
            level = logging.INFO if conf.level == "strong" else logging.WARNING
            logger.log(level, "python sandbox confinement %s", conf.describe())
        self._confinement = conf

    def _spawn(self, worker: _Worker) -> None:
        """Connect ``worker`` to a fresh worker process (caller holds the lock)."""
        worker.discard()
        for attempt in range(2):
            zygote = self._state.zygote
            try:
                if zygote is None or zygote.proc.poll() is not None:
                    raise EOFError("zygote is gone")
                worker.attach(*zygote.spawn(worker.slot))
                return
            except (OSError, EOFError, TimeoutError, ProtocolError) as e:
                if attempt:
                    raise SandboxError(f"could not start a sandbox worker: {e}") from e
                logger.warning("restarting the python sandbox zygote (%s)", e)
                if zygote is not None:
                    zygote.kill(wait_s=2.0)
                self._start_zygote()

    def run(
        self, code: str, images: Sequence[Image.Image] = (), *, timeout_s: float | None = None
    ) -> SandboxResult:
        """Run ``code`` in a fresh confined process with ``images`` preloaded; never raises for
        anything the code does.

        ``timeout_s`` (capped at the configured ``timeout_s``) limits the wall-clock time once a
        worker is free; waiting for one is limited by ``queue_timeout_s``.
        Raises `SandboxError` only if the pool is closed or cannot start at all.
        """
        self.start()
        timeout = min(timeout_s or self.config.timeout_s, self.config.timeout_s)
        specs, blobs = [], []
        for img in images:
            spec, data = _encode_image(img)
            specs.append(spec)
            blobs.append(data)
        request = {"op": "run", "code": code, "timeout_s": timeout, "images": specs}
        worker = self._acquire()
        if worker is None:
            return SandboxResult(failure="busy", notes=["no sandbox worker became free in time"])
        try:
            return self._call(worker, request, blobs, timeout)
        finally:
            if self._closed:
                worker.discard()
            self._idle.put(worker)

    def _acquire(self) -> _Worker | None:
        """A free worker, waiting up to ``queue_timeout_s``; raises if the pool closes meanwhile."""
        deadline = time.monotonic() + self.config.queue_timeout_s
        while True:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                return self._idle.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue

    def _call(
        self, worker: _Worker, request: dict[str, Any], blobs: list[bytes], timeout: float
    ) -> SandboxResult:
        for attempt in range(2):
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if not worker.usable():
                try:
                    with self._lock:
                        self._spawn(worker)
                except SandboxError as e:
                    return SandboxResult(failure="sandbox_error", notes=[str(e)])
            sock = worker.sock
            try:
                if sock is None:
                    raise EOFError("the worker was discarded")
                send_msg(sock, request, blobs)
                # The worker acknowledges before running anything: a worker that died while idle
                # fails here, and the call is retried once on a fresh one.
                recv_msg(sock, deadline=time.monotonic() + _ACK_TIMEOUT_S)
            except (EOFError, OSError, TimeoutError, ProtocolError) as e:
                worker.discard()
                if self._closed:
                    raise SandboxError("the sandbox pool was closed during the call") from e
                if attempt:
                    return SandboxResult(failure="sandbox_error", notes=[f"the sandbox worker died: {e}"])
                continue
            try:
                reply, images, _ = recv_msg(
                    sock,
                    deadline=time.monotonic() + timeout + _REPLY_GRACE_S,
                    max_header=self._max_reply_header,
                    max_bytes=self._max_reply_images,
                )
            except TimeoutError:
                worker.discard()
                return SandboxResult(failure="timeout", notes=["the sandbox worker stopped answering"])
            except (EOFError, OSError, ProtocolError) as e:
                worker.discard()
                if self._closed:
                    raise SandboxError("the sandbox pool was closed during the call") from e
                return SandboxResult(
                    failure="sandbox_error", notes=[f"the sandbox worker died during the call: {e}"]
                )
            return self._result(reply, images)
        raise AssertionError("unreachable")

    def _result(self, reply: dict[str, Any], blobs: list[bytes]) -> SandboxResult:
        images, bad = _decode_images(blobs, self.config.max_image_pixels)
        notes = []
        child = reply.get("child") or {}
        if isinstance(child, dict) and child.get("error"):
            notes.append(f"sandbox setup failed: {short_text(child['error'])}")
        failure = reply.get("failure")
        if failure is not None and failure not in FAILURES:
            failure = "sandbox_error"
        return SandboxResult(
            stdout=str(reply.get("stdout", "")),
            stderr=str(reply.get("stderr", "")),
            images=images,
            failure=failure,
            exit_code=reply.get("exit_code"),
            signal=reply.get("signal"),
            error_type=exception_name(reply.get("error_type")),
            duration_s=float(reply.get("duration_s", 0.0)),
            stdout_omitted=int(reply.get("stdout_omitted", 0)),
            stderr_omitted=int(reply.get("stderr_omitted", 0)),
            images_dropped=int(reply.get("images_dropped", 0)) + bad,
            notes=notes,
        )

    def close(self) -> None:
        """Kill every sandbox process and remove the working directories (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

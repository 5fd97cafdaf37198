"""A warm worker: serves calls from the trainer, each in a fresh, confined child process.

The worker never runs untrusted code itself: for each call it forks a child that sets up its
file descriptors, limits and confinement and runs the code (`_runner`), so no state leaks
between calls. The worker enforces the wall-clock and memory limits, reads stdout/stderr with a
hard cap, kills every leftover process of the call, and answers the trainer. Nothing here may
import torch (``axpo_nemo.core``) or the pool: it runs in the small sandbox processes.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

from axpo_nemo.agent.sandbox import _linux, _process, _runner
from axpo_nemo.agent.sandbox._protocol import ProtocolError, exception_name, recv_msg, send_msg, short_text
from axpo_nemo.agent.sandbox.confinement import (
    apply_call_confinement,
    expose_to_other_users,
    unreadable_paths,
)

if TYPE_CHECKING:
    from axpo_nemo.agent.sandbox._zygote import Zygote

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SETUP_FAILED_EXIT = 125
ESCAPED_EXIT = 126  # an exception unwound to the bottom of a forked process
_MEMORY_POLL_S = 0.05
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS}


def _uid_for(slot: int, uid_base: int, zygote_pid: int) -> int:
    """A uid no other pool on this host uses for this slot (setuid mode)."""
    return uid_base + (zygote_pid % 2_000_000) * 257 + slot


class _Capped:
    """Keeps the head and tail of a byte stream, counting what it drops."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Account for a chunk of output."""
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data[-self.tail_limit :]
            del self.tail[: max(len(self.tail) - self.tail_limit, 0)]

    @property
    def omitted(self) -> int:
        """Bytes dropped from the middle."""
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        """The kept output as text, with a marker where bytes were dropped."""
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if self.omitted:
            return f"{head}\n... [{self.omitted} bytes of output omitted] ...\n{tail}"
        return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")


def _png_size(blob: bytes) -> tuple[int, int] | None:
    if len(blob) < 24 or not blob.startswith(_PNG_SIGNATURE) or blob[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", blob[16:24])


# --- the per-call child ----------------------------------------------------------------------


def _child(
    worker: Worker, header: dict[str, Any], blobs: list[bytes], workdir: str, fds: tuple[int, int, int]
) -> NoReturn:
    """Set up the call's process (fds, limits, confinement) and run the code; never returns."""
    strict = header["op"] == "run"
    try:
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDONLY)
        for target, fd in zip((0, 1, 2, 3), (devnull, *fds), strict=True):
            os.dup2(fd, target)
        os.closerange(4, 1 << 20)
        for name in ("HOME", "TMPDIR", "PWD"):
            os.environ[name] = workdir
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
        )
        sys.dont_write_bytecode = True
        faulthandler.enable(sys.stderr)
        images = []
        if strict:
            from PIL import Image

            for spec, data in zip(header["images"], blobs, strict=True):
                images.append(Image.frombytes(spec["mode"], (spec["width"], spec["height"]), data))
        applied, failed = apply_call_confinement(
            worker.conf, worker.opts, workdir=workdir, uid=worker.uid, readable=worker.readable, strict=strict
        )
    except BaseException as e:
        with contextlib.suppress(BaseException):
            message = {"status": "setup_failed", "error": f"{type(e).__name__}: {e}"}
            _runner.write_frame(3, b"S", json.dumps(message).encode())
        os._exit(_SETUP_FAILED_EXIT)
    if not strict:
        if "setuid" in applied:
            unreadable = unreadable_paths(worker.required)
            if unreadable:
                applied.remove("setuid")
                failed["setuid"] = (
                    f"a call running as its own uid cannot read {unreadable[0]} (a directory above it "
                    "is private and no mount namespace can expose it)"
                )
        _runner.write_frame(
            3, b"S", json.dumps({"status": "probe", "applied": applied, "failed": failed}).encode()
        )
        os._exit(0)
    try:
        _runner.run(header["code"], images, worker.opts, workdir, 3)
    finally:
        os._exit(ESCAPED_EXIT)  # never unwind into the worker's code


# --- the worker ------------------------------------------------------------------------------


class _TrainerGone(Exception):
    """The trainer closed the connection during a call."""


class Worker:
    """A warm process serving calls from the trainer over one socket, one at a time."""

    def __init__(self, sock_fd: int, slot: int, zygote: Zygote) -> None:
        self.sock = socket.socket(fileno=sock_fd)
        self.slot = slot
        self.conf = zygote.conf
        self.opts = zygote.opts
        self.readable = zygote.readable
        self.required = zygote.required
        self.root = zygote.root
        self.uid = _uid_for(slot, self.opts.uid_base, zygote.pid)
        self.pid_ns = "pid_namespace" in self.conf and os.getpid() == 1
        self.mount_ns = "mount_namespace" in self.conf
        self.calls = 0
        self.dir = ""

    def serve(self) -> NoReturn:
        """Answer requests until the trainer closes the socket, then clean up and exit."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if not self.pid_ns:
            _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
        _linux.prctl(_linux.PR_SET_DUMPABLE, 0)
        if self.mount_ns:
            _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
        self.dir = tempfile.mkdtemp(prefix=f"w{self.slot}-", dir=self.root)
        os.chmod(self.dir, 0o711)
        if self.mount_ns and "setuid" in self.conf:
            # The calls' own uid must read the interpreter, e.g. one installed in root's 0700 home.
            package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            try:
                expose_to_other_users([*self.readable, os.path.realpath(self.root), package])
            except OSError as e:  # the probe then finds the interpreter unreadable
                print(f"[sandbox] could not expose the interpreter to the calls' uid: {e}", file=sys.stderr)
        try:
            while True:
                try:
                    header, blobs, _ = recv_msg(self.sock)
                except (EOFError, ProtocolError, OSError):
                    break
                send_msg(self.sock, {"ack": True})
                reply, out = self.call(header, blobs)
                send_msg(self.sock, reply, out)
        except (_TrainerGone, BrokenPipeError, ConnectionError):
            pass
        except BaseException:
            traceback.print_exc()
        finally:
            self.kill_all()
            shutil.rmtree(self.dir, ignore_errors=True)
            os._exit(0)

    def call(self, header: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        """Run one request (``op`` "run" or "probe") in a fresh child; returns (reply, images)."""
        self.calls += 1
        workdir = os.path.join(self.dir, f"c{self.calls}")
        try:
            self._make_workdir(workdir)
            return self._run(header, blobs, workdir)
        finally:
            self.kill_all()
            self._remove_workdir(workdir)

    def _make_workdir(self, path: str) -> None:
        os.mkdir(path, 0o700)
        owner = self.uid if "setuid" in self.conf else os.getuid()
        if self.mount_ns:
            inodes = max(1024, self.opts.max_disk_mb * 16)
            options = f"size={self.opts.max_disk_mb}m,nr_inodes={inodes},mode=0700,uid={owner},gid={owner}"
            _linux.mount("tmpfs", path, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, options)
        elif owner != os.getuid():
            os.chown(path, owner, owner)

    def _remove_workdir(self, path: str) -> None:
        if self.mount_ns:
            with contextlib.suppress(OSError):
                _linux.umount(path)

        def make_writable(func: Any, p: str, exc: Any) -> None:
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o700)
                os.chmod(p, 0o700)
                func(p)

        shutil.rmtree(path, onerror=make_writable)
        with contextlib.suppress(OSError):
            os.rmdir(path)

    def kill_all(self) -> None:
        """SIGKILL every process this worker started, and reap them all."""
        if self.pid_ns:
            assert os.getpid() == 1  # kill(-1) outside a pid namespace would hit the whole user
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
        else:
            _process.kill_descendants()
        _process.reap_all(timeout=2.0)

    def _run(
        self, header: dict[str, Any], blobs: list[bytes], workdir: str
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Fork the call's child and supervise it (time, memory, output); returns (reply, images)."""
        opts = self.opts
        pipes = [os.pipe() for _ in range(3)]
        base_rss = _process.rss_anon("self")  # shared copy-on-write with each child until written
        memory_limit = opts.memory_mb * (1 << 20)
        start = time.monotonic()
        next_memory_check = start
        pid = os.fork()
        if pid == 0:
            try:
                for r, _ in pipes:
                    os.close(r)
                self.sock.close()
                _child(self, header, blobs, workdir, tuple(w for _, w in pipes))  # type: ignore[arg-type]
            finally:
                os._exit(ESCAPED_EXIT)
        for _, w in pipes:
            os.close(w)
        streams = {pipes[0][0]: _Capped(opts.max_output_bytes), pipes[1][0]: _Capped(opts.max_output_bytes)}
        max_result = opts.max_images * (opts.max_image_pixels * 5 + (1 << 20)) + (1 << 20)
        result = bytearray()
        timeout = min(float(header.get("timeout_s") or opts.timeout_s), opts.timeout_s)
        deadline = start + timeout
        failure = None
        status: int | None = None
        rusage = None

        sel = selectors.DefaultSelector()
        for fd, _ in pipes:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(self.sock, selectors.EVENT_READ)
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)
            sel.register(pidfd, selectors.EVENT_READ)
        open_pipes = {fd for fd, _ in pipes}
        try:
            while open_pipes or status is None:
                if status is None:
                    done, st, ru = os.wait4(pid, os.WNOHANG)
                    if done:
                        status, rusage = st, ru
                        self.kill_all()  # leftovers (background processes) end with the call
                        deadline = min(deadline, time.monotonic() + 1.0)  # drain what is buffered
                        continue
                now = time.monotonic()
                if now >= deadline:
                    if status is None:
                        failure = "timeout"
                        self.kill_all()
                        status, rusage = _process.wait_killed(pid)
                    break
                if status is None and now >= next_memory_check:
                    # RLIMIT_AS bounds each process; this bounds all of them together.
                    next_memory_check = now + _MEMORY_POLL_S
                    if _process.tree_memory(base_rss) > memory_limit:
                        failure = "memory"
                        self.kill_all()
                        status, rusage = _process.wait_killed(pid)
                        deadline = min(deadline, time.monotonic() + 0.5)
                        continue
                wait = min(deadline - now, _MEMORY_POLL_S if pidfd is not None else 0.02)
                for key, _ in sel.select(wait):
                    fd = key.fd
                    if key.fileobj is self.sock:
                        raise _TrainerGone()
                    if fd == pidfd:
                        sel.unregister(pidfd)
                        continue
                    data = os.read(fd, 1 << 16)
                    if not data:
                        sel.unregister(fd)
                        open_pipes.discard(fd)
                    elif fd in streams:
                        streams[fd].feed(data)
                        if sum(s.total for s in streams.values()) > opts.output_kill_bytes and status is None:
                            failure = "output_limit"
                            self.kill_all()
                            status, rusage = _process.wait_killed(pid)
                            deadline = min(deadline, time.monotonic() + 0.5)
                    elif len(result) < max_result:
                        result += data
        finally:
            sel.close()
            for fd, _ in pipes:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if pidfd is not None:
                os.close(pidfd)
            if status is None:  # an exception above: never leave the child running
                self.kill_all()
                status, rusage = _process.wait_killed(pid)
        elapsed = time.monotonic() - start
        return self._reply(status, rusage, failure, streams, pipes, bytes(result), elapsed)

    def _reply(
        self,
        status: int,
        rusage: Any,
        failure: str | None,
        streams: dict[int, _Capped],
        pipes: list[tuple[int, int]],
        result: bytes,
        elapsed: float,
    ) -> tuple[dict[str, Any], list[bytes]]:
        opts = self.opts
        child: dict[str, Any] = {}
        images: list[bytes] = []
        dropped = 0
        for kind, payload in _runner.read_frames(result):
            if kind == b"S":
                with contextlib.suppress(ValueError):
                    parsed = json.loads(payload)
                    child = parsed if isinstance(parsed, dict) else {}
            elif kind == b"I":
                size = _png_size(payload)
                if size and size[0] * size[1] <= opts.max_image_pixels and len(images) < opts.max_images:
                    images.append(payload)
                else:
                    dropped += 1
        with contextlib.suppress(TypeError, ValueError):
            dropped += int(child.get("images_dropped", 0))
        exit_code = os.waitstatus_to_exitcode(status)
        sig = -exit_code if exit_code < 0 else None
        cpu_s = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else 0.0
        if failure is None:
            failure = _classify(child, exit_code, sig, cpu_s, opts.cpu_time_s)
        out, err = streams[pipes[0][0]], streams[pipes[1][0]]
        reply = {
            "stdout": out.text(),
            "stderr": err.text(),
            "stdout_omitted": out.omitted,
            "stderr_omitted": err.omitted,
            "exit_code": None if sig else exit_code,
            "signal": sig,
            "failure": failure,
            "error_type": exception_name(child.get("type")),
            "duration_s": elapsed,
            "cpu_s": cpu_s,
            "images_dropped": dropped,
            "child": _setup_report(child),
        }
        return reply, images


def _setup_report(child: dict[str, Any]) -> dict[str, Any]:
    """What the pool needs of a probe's or failed setup's status frame, every field bounded: the
    frame may be forged by the code (fd 3 is open to it)."""
    status = child.get("status")
    if status not in ("probe", "setup_failed"):
        return {}
    report: dict[str, Any] = {"status": status}
    if "error" in child:
        report["error"] = short_text(child["error"])
    applied, failed = child.get("applied"), child.get("failed")
    if isinstance(applied, list):
        report["applied"] = [short_text(m, 100) for m in applied[:32]]
    if isinstance(failed, dict):
        report["failed"] = {short_text(k, 100): short_text(v) for k, v in list(failed.items())[:32]}
    return report


def _classify(
    child: dict[str, Any], exit_code: int, sig: int | None, cpu_s: float, cpu_limit: int
) -> str | None:
    """The failure reason of a call that was not killed by the worker (None: success)."""
    state = child.get("status")
    if state == "setup_failed":
        return "sandbox_error"
    if sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_limit):
            return "cpu"
        return "crash" if sig in _FAULT_SIGNALS else "signal"
    if exit_code == 0:
        return None
    if state == "exception":
        return "memory" if child.get("type") == "MemoryError" else "exception"
    return "exit"

"""The zygote: a clean interpreter that preloads the heavy modules and forks workers.

Process tree (the trainer never forks; it starts the zygote as a fresh interpreter)::

    trainer ── zygote (preloaded numpy/PIL/matplotlib, subreaper)
                 └─ worker k (init of its own pid/net/mount namespaces when available)
                      └─ call child (setsid, rlimits, setuid, Landlock, seccomp) ─ runs the code

At start the zygote probes which confinement mechanisms work here (`probe`), reports them to
the trainer, then forks a worker for each request. When the trainer goes away it kills every
process it started and exits.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import select
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, NoReturn

from axpo_nemo.agent.sandbox import _linux, _process
from axpo_nemo.agent.sandbox._protocol import ProtocolError, recv_msg, send_msg
from axpo_nemo.agent.sandbox._worker import ESCAPED_EXIT, Worker
from axpo_nemo.agent.sandbox.confinement import (
    CALL_MECHANISMS,
    MECHANISMS,
    Confinement,
    default_readable_paths,
    enter_namespaces,
    guard_concerns,
    interpreter_paths,
    namespace_flags,
)


def _preload(modules: list[str]) -> None:
    """Import and warm the modules calls use, so each fork starts with them loaded."""
    for name in modules:
        try:
            if name.startswith("matplotlib"):
                import matplotlib

                matplotlib.use("Agg")
            importlib.import_module(name)
        except Exception as e:
            print(f"[sandbox] could not preload {name}: {e}", file=sys.stderr)
    with contextlib.suppress(Exception):
        from PIL import Image

        Image.init()
        img = Image.new("RGB", (8, 8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        buf.seek(0)
        Image.open(buf).load()
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        with contextlib.suppress(Exception):
            fig = plt.figure()
            fig.gca().plot([0, 1], [0, 1])
            fig.gca().set_title("warm")
            fig.savefig(io.BytesIO(), format="png")
            plt.close("all")


class Zygote:
    """Forks workers on request from the trainer; owns the probed confinement."""

    def __init__(self, ctl: socket.socket, opts: Any, root: str, private: Sequence[str] = ()) -> None:
        self.ctl = ctl
        self.opts = opts
        self.root = root
        self.pid = os.getpid()
        self.readable = default_readable_paths(opts.extra_readable_paths, private, opts.preload_modules)
        # What calls must be able to read for the sandbox to work (checked by the probe).
        required = (os.path.realpath(p) for p in interpreter_paths(opts.preload_modules))
        self.required = [p for p in dict.fromkeys(required) if p in self.readable]
        self.conf = Confinement(("rlimits",))
        self.workers: dict[int, int] = {}  # pid -> slot

    def spawn(self, slot: int, sock_fd: int, conf: Confinement | None = None) -> int:
        """Fork a worker (inside fresh namespaces) serving ``sock_fd``; returns its pid."""
        conf = conf or self.conf
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                self.ctl.close()
                _process.close_fds_except({0, 1, 2, w, sock_fd})
                enter_namespaces(namespace_flags(conf.mechanisms))
                worker_pid = os.fork()
                if worker_pid == 0:
                    try:
                        os.close(w)
                        self.conf = conf
                        Worker(sock_fd, slot, self).serve()
                    finally:
                        os._exit(ESCAPED_EXIT)
                reply = {"pid": worker_pid}
            except BaseException as e:
                reply = {"error": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(BaseException):
                os.write(w, json.dumps(reply).encode())
            os._exit(0)
        os.close(w)
        data = _process.read_all(r, timeout=10.0)
        os.waitpid(pid, 0)
        try:
            reply = json.loads(data)
        except ValueError:
            reply = {"error": "worker spawn failed silently"}
        if "pid" not in reply:
            raise OSError(reply.get("error", "worker spawn failed"))
        self.workers[reply["pid"]] = slot
        return reply["pid"]

    def reap(self) -> None:
        """Reap exited workers and orphans."""
        for pid in _process.reap_exited()[0]:
            self.workers.pop(pid, None)

    def kill_orphans(self) -> None:
        """Kill processes reparented to the zygote whose worker died (they are no worker)."""
        for pid in _process.children("self"):
            if pid not in self.workers:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.reap()

    def serve(self) -> NoReturn:
        """Handle spawn requests until the trainer goes away; then kill everything and exit."""
        try:
            while True:
                ready, _, _ = select.select([self.ctl], [], [], 1.0)
                self.reap()
                if not ready:
                    continue
                try:
                    header, _, fds = recv_msg(self.ctl, with_fds=True)
                except (EOFError, ProtocolError, OSError):
                    break
                try:
                    if header.get("op") != "spawn" or len(fds) != 1:
                        raise ValueError(f"bad request {header.get('op')!r}")
                    self.kill_orphans()
                    reply = {"pid": self.spawn(int(header["slot"]), fds[0])}
                except Exception as e:
                    reply = {"error": f"{type(e).__name__}: {e}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                send_msg(self.ctl, reply)
        finally:
            for pid in [*self.workers, *_process.children("self")]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.workers.clear()
            self.kill_orphans()
            _process.reap_all(timeout=2.0)
            os._exit(0)


def _try_in_fork(fn: Any, timeout: float = 10.0) -> str | None:
    """Run ``fn`` in a throw-away child; returns None on success, else the error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            os._exit(0)
        except BaseException as e:
            with contextlib.suppress(BaseException):
                os.write(w, f"{type(e).__name__}: {e}".encode()[:2000])
            os._exit(1)
    os.close(w)
    text = _process.read_all(r, timeout).decode(errors="replace")
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if status == 0:
        return None
    return text or f"failed (wait status {status})"


def _namespace_test(names: list[str], root: str) -> None:
    """Enter the namespaces ``names`` and check they work (pid 1, a tmpfs mount)."""
    enter_namespaces(namespace_flags(names))
    if "mount_namespace" in names:
        _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
        path = tempfile.mkdtemp(dir=root)
        try:
            _linux.mount("tmpfs", path, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "size=1m")
            _linux.umount(path)
        finally:
            os.rmdir(path)
    if "pid_namespace" in names:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise OSError("the first child is not pid 1 in the new pid namespace")


def probe(zygote: Zygote) -> Confinement:
    """Find which mechanisms work on this host, in order, and return the pool's confinement."""
    opts, root = zygote.opts, zygote.root
    disabled = set(opts.disable)
    unavailable: dict[str, str] = {}
    is_root = os.geteuid() == 0
    active: list[str] = []

    wanted = ["pid_namespace", "mount_namespace"] + ([] if opts.allow_network else ["net_namespace"])
    if not is_root:
        if "user_namespace" in disabled:
            unavailable["user_namespace"] = "disabled"
        else:
            err = _try_in_fork(lambda: _namespace_test(["user_namespace"], root))
            if err is None:
                active.append("user_namespace")
            else:
                unavailable["user_namespace"] = err
    for name in wanted:
        if name in disabled:
            unavailable[name] = "disabled"
        elif not is_root and "user_namespace" not in active:
            unavailable[name] = "needs root or a user namespace"
        else:
            err = _try_in_fork(lambda name=name: _namespace_test([*active, name], root))
            if err is None:
                active.append(name)
            else:
                unavailable[name] = err

    abi = _linux.landlock_abi()
    candidates = {
        "setuid": None if is_root else "needs root",
        "landlock": None if abi else "not supported by this kernel (needs >= 5.13 with Landlock enabled)",
        "seccomp": None if _linux.seccomp_supported() else f"no syscall table for {os.uname().machine}",
    }
    for name, why in candidates.items():
        if name in disabled:
            unavailable[name] = "disabled"
        elif why:
            unavailable[name] = why
        else:
            active.append(name)
    details: dict[str, Any] = {"allow_network": bool(opts.allow_network)}
    if "landlock" in active:
        details.update(
            landlock_abi=abi, landlock_tcp=abi >= 4 and not opts.allow_network, landlock_scope=abi >= 6
        )

    # Check the per-call mechanisms for real, in a throw-away worker like the pool's.
    trial = Confinement(tuple(active), details)
    applied, failed = _probe_call(zygote, trial)
    for name, why in failed.items():
        unavailable[name] = why
    active = [m for m in active if m not in failed and (m not in CALL_MECHANISMS or m in applied)]
    if "landlock" not in active:
        for key in ("landlock_abi", "landlock_tcp", "landlock_scope"):
            details.pop(key, None)
    active.append("rlimits")
    if "setuid" in active:
        details["nproc"] = "per-worker uid"
    elif "user_namespace" in active:
        details["nproc"] = "per-worker user namespace"
    elif is_root:
        details["nproc"] = "not enforced (root without setuid)"
    else:
        details["nproc"] = "approximate (shared with the user's other processes)"
    conf = Confinement(tuple(active), details)
    concerns = guard_concerns(conf, opts)
    if concerns:
        active.append("audit_guard")
        details["guarded"] = concerns
    ordered = tuple(m for m in MECHANISMS if m in active)
    return Confinement(ordered, details, unavailable)


def _probe_call(zygote: Zygote, trial: Confinement) -> tuple[list[str], dict[str, str]]:
    """Apply ``trial``'s per-call mechanisms best-effort in a real worker's child."""
    mine, theirs = socket.socketpair()
    try:
        try:
            pid = zygote.spawn(zygote.opts.pool_size, theirs.fileno(), trial)
        finally:
            theirs.close()
        try:
            send_msg(mine, {"op": "probe", "timeout_s": 10.0})
            recv_msg(mine, deadline=time.monotonic() + 15.0)  # the acknowledgement
            reply, _, _ = recv_msg(mine, deadline=time.monotonic() + 15.0)
        finally:
            mine.close()
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            zygote.workers.pop(pid, None)
            zygote.reap()
    except Exception as e:
        reason = f"probe worker failed: {type(e).__name__}: {e}"
        return [], dict.fromkeys(CALL_MECHANISMS, reason)
    child = reply.get("child", {})
    if child.get("status") != "probe":
        reason = f"probe failed: {child.get('error') or reply.get('stderr') or reply.get('failure')}"
        return [], dict.fromkeys(CALL_MECHANISMS, reason)
    return list(child.get("applied", [])), dict(child.get("failed", {}))


def zygote_main(ctl_fd: int) -> NoReturn:
    """Entry point of the zygote process (started by `SandboxPool` as a fresh interpreter)."""
    ctl = socket.socket(fileno=ctl_fd)
    try:
        header, _, _ = recv_msg(ctl)
        opts = SimpleNamespace(**header["config"])
        _preload(opts.preload_modules)
        _linux.prctl(_linux.PR_SET_CHILD_SUBREAPER, 1)
        zygote = Zygote(ctl, opts, header["workdir_root"], header.get("private_dirs", []))
        zygote.conf = probe(zygote)
        send_msg(ctl, {"ready": True, "confinement": zygote.conf.to_dict(), "pid": os.getpid()})
    except BaseException as e:
        with contextlib.suppress(BaseException):
            send_msg(
                ctl, {"ready": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            )
        os._exit(1)
    zygote.serve()

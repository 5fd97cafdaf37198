"""Which isolation mechanisms a sandboxed call gets, and how each is applied.

The zygote probes the host once at pool start (`axpo_nemo.agent.sandbox._worker.probe`) and
degrades in order, using whatever actually works:

=================  =====================================================  =======================
mechanism          what it gives                                          needs
=================  =====================================================  =======================
user_namespace     the namespaces below without root                      unprivileged userns
pid_namespace      code sees/signals no outside process; one SIGKILL      root or user_namespace
                   ends a call's whole process tree
net_namespace      no network interfaces at all                           root or user_namespace
mount_namespace    a private tmpfs working directory with a size quota    root or user_namespace
setuid             runs as an unprivileged per-worker uid without         root
                   capabilities: RLIMIT_NPROC counts only the call's own
                   processes, file modes apply
landlock           writes only in the working directory, reads only the   kernel >= 5.13 (ABI 4:
                   interpreter's stdlib and packages and system           TCP, ABI 6: signals)
                   libraries (never the trainer's cwd or script dir); no
                   TCP (ABI 4); no signals out of the sandbox (ABI 6)
seccomp            no sockets (unix ones included; socket pairs stay),    x86_64/aarch64, any user
                   exec, ptrace, mount, namespaces, io_uring, setsid;
                   signals only to itself without pidns
rlimits            CPU time, address space, file size, open files,        always
                   processes
audit_guard        in-interpreter audit hook (bypassable: ctypes is off,  last resort, only for
                   but a determined attacker can defeat it)               concerns nothing else
                                                                          covers
=================  =====================================================  =======================
"""

from __future__ import annotations

import contextlib
import os
import resource
import site
import socket
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from axpo_nemo.agent.sandbox import _linux
from axpo_nemo.agent.sandbox.config import DISABLEABLE

#: Every isolation mechanism, in the order they are reported: the switchable ones
#: (`SandboxConfig.disable`), then the resource limits and the audit guard, which are always on.
MECHANISMS = (*DISABLEABLE, "rlimits", "audit_guard")
CALL_MECHANISMS = ("setuid", "landlock", "seccomp")
_NS_FLAG = {
    "user_namespace": _linux.CLONE_NEWUSER,
    "pid_namespace": _linux.CLONE_NEWPID,
    "net_namespace": _linux.CLONE_NEWNET,
    "mount_namespace": _linux.CLONE_NEWNS,
}


@dataclass(frozen=True)
class Confinement:
    """The isolation active for sandboxed calls, as probed at pool start.

    Attributes:
        mechanisms: active mechanisms, strongest first (names from `MECHANISMS`).
        details: facts about them, e.g. ``landlock_abi``, ``landlock_tcp``, ``nproc``
            (how the process limit is enforced), ``guarded`` (what the audit guard covers).
        unavailable: mechanism -> why it is not active (missing, failed, or disabled).
    """

    mechanisms: tuple[str, ...]
    details: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.mechanisms

    @property
    def filesystem(self) -> str:
        """What confines file writes: 'landlock', 'setuid' (permissions only) or 'audit_guard'."""
        return "landlock" if "landlock" in self else "setuid" if "setuid" in self else "audit_guard"

    @property
    def network(self) -> str:
        """What blocks the network: 'net_namespace', 'seccomp', 'audit_guard' or 'allowed'."""
        if self.details.get("allow_network"):
            return "allowed"
        for name in ("net_namespace", "seccomp"):
            if name in self:
                return name
        return "audit_guard"

    @property
    def level(self) -> str:
        """'strong' (kernel-enforced isolation everywhere), 'partial' or 'weak' (audit guard in use)."""
        if "audit_guard" in self:
            return "weak"
        isolated = "pid_namespace" in self or "setuid" in self or self.details.get("landlock_scope")
        if "landlock" in self and isolated and self.network != "audit_guard":
            return "strong"
        return "partial"

    def describe(self) -> str:
        """One line for logs: level, mechanisms and what is missing."""
        text = f"{self.level}: {', '.join(self.mechanisms)}"
        if self.details:
            text += " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.details.items())) + ")"
        if self.unavailable:
            text += "; unavailable: " + "; ".join(f"{k}: {v}" for k, v in self.unavailable.items())
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (sent from the zygote to the pool)."""
        return {"mechanisms": list(self.mechanisms), "details": self.details, "unavailable": self.unavailable}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Confinement:
        """Inverse of `to_dict`."""
        return cls(tuple(data["mechanisms"]), dict(data["details"]), dict(data["unavailable"]))


def namespace_flags(mechanisms: tuple[str, ...] | list[str]) -> int:
    """The unshare(2) flags for the namespace mechanisms in ``mechanisms`` (plus IPC and UTS)."""
    flags = 0
    for name in mechanisms:
        flags |= _NS_FLAG.get(name, 0)
    if flags & ~_linux.CLONE_NEWUSER:
        flags |= _linux.CLONE_NEWIPC | _linux.CLONE_NEWUTS
    return flags


def enter_namespaces(flags: int) -> None:
    """unshare into new namespaces; a user namespace first, mapping our uid/gid to root inside it."""
    if flags & _linux.CLONE_NEWUSER:
        uid, gid = os.getuid(), os.getgid()
        _linux.unshare(_linux.CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    rest = flags & ~_linux.CLONE_NEWUSER
    if rest:
        _linux.unshare(rest)


# System directories calls may read: shared libraries, data files, programs (for allow_subprocess).
# Not /usr as a whole: a launch directory such as /usr/src/app must stay unreadable.
_SYSTEM_DIRS = (
    "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/share", "/usr/bin", "/usr/sbin",
    "/usr/local/lib", "/usr/local/lib64", "/usr/local/share", "/usr/local/bin",
    "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/sys/devices/system/cpu",
)  # fmt: skip
_SYSTEM_FILES = tuple(
    ["/etc/" + f for f in ("ld.so.cache", "localtime", "passwd", "group", "nsswitch.conf", "mime.types")]
    + ["/dev/" + f for f in ("null", "zero", "full", "random", "urandom")]
)


def interpreter_paths(modules: Sequence[str] = ()) -> list[str]:
    """Where this interpreter's code lives: the standard library and site-packages (of the virtual
    environment and of the base installation), and the packages of ``modules``, wherever installed."""
    paths = []
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix}
    for scheme_vars in (None, base):
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            with contextlib.suppress(KeyError):
                paths.append(sysconfig.get_path(key, vars=scheme_vars))
    with contextlib.suppress(AttributeError):
        paths += site.getsitepackages()
    for name in modules:
        module = sys.modules.get(name.partition(".")[0])
        origin = getattr(module, "__file__", None)
        if origin:
            package = os.path.dirname(origin) if os.path.basename(origin).startswith("__init__.") else origin
            paths += [package, package + ".libs"]  # wheels put bundled shared libraries beside it
    # What running the interpreter again needs (allow_subprocess): the directories of the symlinks
    # leading to the binary and of the binary, libpython, pyvenv.cfg.
    paths += [os.path.dirname(p) for p in _symlink_chain(sys.executable)]
    paths += [sysconfig.get_config_var("LIBDIR") or "", os.path.join(sys.prefix, "pyvenv.cfg")]
    return paths


def _symlink_chain(path: str) -> list[str]:
    """``path``, each symlink it leads through, and the file it ends at (absolute paths)."""
    chain = [os.path.abspath(path)]
    for _ in range(40):  # the kernel's own limit on nested links
        try:
            target = os.readlink(chain[-1])
        except OSError:
            break
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target)))
    return [*chain, os.path.realpath(path)]


def default_readable_paths(
    extra: Sequence[str], private: Sequence[str] = (), modules: Sequence[str] = ()
) -> list[str]:
    """Paths a call may read under Landlock: the interpreter's standard library and packages, the
    packages of ``modules``, system libraries and data files, and ``extra``.

    Never the directories in ``private`` (the trainer's working directory and script directory,
    where ``.env`` files, runs and checkpoints live), ``/`` or the home directory: a path that
    contains one of them is left out (``extra`` excepted, which the user chose).
    """
    paths = [*_SYSTEM_DIRS, *_SYSTEM_FILES, *interpreter_paths(modules)]
    try:
        import matplotlib

        paths.append(matplotlib.get_data_path())
    except ImportError:
        pass
    hidden = {os.path.realpath(p) for p in [*private, "/", os.path.expanduser("~")] if p}

    def exposes_hidden(path: str) -> bool:
        return any(h == path or h.startswith(path.rstrip("/") + "/") for h in hidden)

    kept = [p for p in (os.path.realpath(p) for p in paths) if not exposes_hidden(p)]
    kept += [os.path.realpath(p) for p in extra]
    return list(dict.fromkeys(p for p in kept if os.path.exists(p)))


def _blocking_ancestor(path: str) -> str | None:
    """The topmost directory above ``path`` that other users may not enter (no o+x), if any."""
    current = "/"
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if not mode & 0o001:
            return current
    return None


def expose_to_other_users(paths: list[str]) -> list[str]:
    """Let other users (the calls' uids) reach ``paths`` although a directory above them is
    private, e.g. an interpreter installed in root's 0700 home. Only in a private mount namespace.

    Each such directory is covered with a small tmpfs that holds only the way to ``paths``,
    bind-mounted from the originals: the rest of the private directory disappears from this
    namespace instead of becoming readable. File modes are not changed. Returns the covered
    directories.
    """
    covered: list[str] = []
    for _ in range(8):  # a private directory inside an exposed one is covered in the next round
        blocked: dict[str, list[str]] = {}
        for path in paths:
            top = _blocking_ancestor(path)
            if top is not None and top != "/" and os.path.exists(path):
                blocked.setdefault(top, []).append(path)
        if not blocked:
            break
        for top, inside in blocked.items():
            keep = sorted(set(inside))
            keep = [p for i, p in enumerate(keep) if not any(p.startswith(q + "/") for q in keep[:i])]
            fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in keep}
            try:
                _linux.mount("tmpfs", top, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "size=1m,mode=755")
                for path, fd in fds.items():
                    target = os.path.join(top, os.path.relpath(path, top))
                    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                    if os.path.isdir(f"/proc/self/fd/{fd}"):
                        os.mkdir(target, 0o755)
                    else:
                        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                    _linux.mount(f"/proc/self/fd/{fd}", target, None, _linux.MS_BIND | _linux.MS_REC)
            finally:
                for fd in fds.values():
                    os.close(fd)
            covered.append(top)
    return covered


def unreadable_paths(paths: list[str]) -> list[str]:
    """Those of ``paths`` this process cannot read (a directory: list), for the probe."""
    bad = []
    for path in paths:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                os.close(os.open(path, os.O_RDONLY))
        except OSError:
            bad.append(path)
    return bad


def count_user_tasks(uid: int) -> int:
    """Tasks (threads included) the user ``uid`` runs now: what RLIMIT_NPROC compares against."""
    total = 0
    with os.scandir("/proc") as it:
        for entry in it:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid == uid:
                    total += max(os.stat(f"/proc/{entry.name}/task").st_nlink - 2, 1)
            except OSError:
                continue
    return total


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def set_rlimits(opts: Any, nproc: int) -> None:
    """Apply the call's resource limits to this process (inherited by its children)."""
    mib = 1024 * 1024
    limits = {
        resource.RLIMIT_CPU: (opts.cpu_time_s, opts.cpu_time_s + 1),
        resource.RLIMIT_AS: (_vm_size() + opts.memory_mb * mib,) * 2,
        resource.RLIMIT_FSIZE: (opts.max_file_mb * mib,) * 2,
        resource.RLIMIT_NOFILE: (opts.max_open_files,) * 2,
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))


def drop_privileges(conf_mechanisms: tuple[str, ...] | list[str], uid: int) -> str:
    """Give up root: switch to ``uid`` (setuid) or drop every capability (user namespace).

    No capability survives either way; in particular not CAP_DAC_READ_SEARCH, which would let the
    call read any file regardless of its mode. Returns what was done.
    """
    if os.geteuid() != 0:
        return "unprivileged"
    _linux.drop_bounding_set(0)
    with contextlib.suppress(OSError):
        _linux.prctl(_linux.PR_SET_SECUREBITS, _linux.SECUREBITS_LOCKED_DOWN)
    if "setuid" in conf_mechanisms:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    # Root inside a user namespace (or root with setuid disabled): no capabilities, and none
    # regained by exec'ing as uid 0 (the locked securebits).
    _linux.set_capabilities(0)
    return "setuid" if "setuid" in conf_mechanisms else "no_capabilities"


def guard_concerns(conf: Confinement, opts: Any) -> list[str]:
    """What the audit guard must cover: the concerns no stronger mechanism handles."""
    concerns = []
    if "landlock" not in conf:
        concerns.append("files")
    if not opts.allow_network and "seccomp" not in conf:
        concerns.append("network")  # a network namespace leaves the host's unix sockets reachable
    if not opts.allow_subprocess and "seccomp" not in conf:
        concerns.append("exec")
    isolated = "pid_namespace" in conf or "setuid" in conf or conf.details.get("landlock_scope")
    if not isolated and "seccomp" not in conf:
        concerns.append("signals")
    return concerns


_FS_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.rename": 2,
    "os.replace": 2,
    "os.mkdir": 1,
    "os.symlink": 2,
    "os.link": 2,
    "os.chmod": 1,
    "os.chown": 1,
    "os.truncate": 1,
    "os.utime": 1,
    "shutil.rmtree": 1,
    "os.chflags": 1,
    "os.lchflags": 1,
    "os.setxattr": 1,
    "os.removexattr": 1,
    "os.mkfifo": 1,
    "os.mknod": 1,
}  # event -> how many leading arguments are paths
_EXEC_EVENTS = {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "subprocess.Popen",
    "os.forkpty",
    "pty.spawn",
}
_NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install_audit_guard(workdir: str, concerns: list[str]) -> None:
    """Last resort: an audit hook refusing writes outside ``workdir``, sockets, exec, signals and
    ctypes. It runs inside the untrusted interpreter, so it raises the bar; it is no boundary."""
    root = os.path.realpath(workdir)
    own = os.getpid()
    files, network, execs, signals = (c in concerns for c in ("files", "network", "exec", "signals"))

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + os.sep) or real == "/dev/null"

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event.startswith("ctypes."):
            raise PermissionError("ctypes is disabled in this sandbox")
        if files and event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and not inside(path):
                raise PermissionError(f"writing outside the working directory is not allowed: {path!r}")
        elif files and event in _FS_EVENTS:
            for path in args[: _FS_EVENTS[event]]:
                if path is not None and not inside(path):
                    raise PermissionError(
                        f"changing files outside the working directory is not allowed: {path!r}"
                    )
        elif network and (event in _NET_EVENTS or (event == "socket.__new__" and args[1] != socket.AF_UNIX)):
            raise PermissionError("network access is disabled in this sandbox")
        elif execs and event in _EXEC_EVENTS:
            raise PermissionError("running other programs is disabled in this sandbox")
        elif signals and event in ("os.kill", "os.killpg") and args[0] not in (0, own, -own):
            raise PermissionError("signalling other processes is not allowed")

    sys.addaudithook(hook)
    # pidfd signalling has no audit event: take it away instead.
    import _signal
    import posix
    import signal as signal_module

    for module, name in (
        (os, "pidfd_open"),
        (posix, "pidfd_open"),
        (signal_module, "pidfd_send_signal"),
        (_signal, "pidfd_send_signal"),
    ):
        with contextlib.suppress(AttributeError):
            delattr(module, name)


def apply_call_confinement(
    conf: Confinement, opts: Any, *, workdir: str, uid: int, readable: list[str], strict: bool
) -> tuple[list[str], dict[str, str]]:
    """Confine the current (per-call child) process; the last step before running code.

    ``conf`` lists what to apply. With ``strict`` any failure raises (the call must not run less
    confined than the pool reports); otherwise failures are collected, for probing.
    Returns (applied mechanisms, failures).
    """
    applied: list[str] = []
    failed: dict[str, str] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            fn()
            applied.append(name)
        except Exception as e:
            if strict:
                raise RuntimeError(f"{name}: {e}") from e
            failed[name] = f"{type(e).__name__}: {e}"

    isolated_uid = "setuid" in conf or "user_namespace" in conf
    if isolated_uid or os.geteuid() == 0:
        nproc = opts.max_processes
    else:
        nproc = count_user_tasks(os.getuid()) + opts.max_processes
    set_rlimits(opts, nproc)
    if "setuid" in conf:
        attempt("setuid", lambda: drop_privileges(conf.mechanisms, uid))
    else:
        drop_privileges(conf.mechanisms, uid)
    os.chdir(workdir)
    if "landlock" in conf:
        abi = conf.details.get("landlock_abi", 0)

        def landlock() -> None:
            _linux.landlock_restrict(
                abi, writable=[workdir], readable=readable, block_tcp=not opts.allow_network, scope=True
            )

        attempt("landlock", landlock)
    if "seccomp" in conf:
        signals_isolated = "pid_namespace" in conf or "setuid" in conf or conf.details.get("landlock_scope")
        program = _linux.seccomp_program(
            block_network=not opts.allow_network,
            block_exec=not opts.allow_subprocess,
            block_chmod="setuid" not in conf,
            own_pid=None if signals_isolated else os.getpid(),
        )
        attempt("seccomp", lambda: _linux.seccomp_install(program))
    applied.append("rlimits")
    if "audit_guard" in conf:
        install_audit_guard(workdir, conf.details.get("guarded", []))
        applied.append("audit_guard")
    return applied, failed

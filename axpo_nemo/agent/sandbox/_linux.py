"""Thin ctypes wrappers for the Linux isolation primitives the stdlib lacks (Python 3.11).

Namespaces (``unshare``), mounts, ``prctl``, capabilities, Landlock and seccomp-BPF. Every
function raises `OSError` on failure; none is called in the trainer's process, only in the
sandbox's zygote, workers and per-call children.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# --- namespaces and mounts -------------------------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWTIME = 0x00000080
NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWCGROUP
    | CLONE_NEWTIME
)

MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# --- prctl / capabilities --------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECUREBITS = 28
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# NOROOT, NO_SETUID_FIXUP, KEEP_CAPS (off) and NO_CAP_AMBIENT_RAISE, each with its lock bit.
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    """unshare(2): move this process into new namespaces (PID: its next child)."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """mount(2)."""

    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {target}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    """umount2(2), lazily detaching by default."""
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with integer arguments."""
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(ctypes.c_int(option), *args), f"prctl({option})")


def set_no_new_privs() -> None:
    """Forbid gaining privileges through execve (required by Landlock and seccomp)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def set_capabilities(keep: int = 0) -> None:
    """Set this thread's effective and permitted capabilities to the bit mask ``keep`` (caps 0-31)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)(_CapData(keep, keep, 0), _CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def drop_bounding_set(keep: int = 0) -> None:
    """Drop every capability but ``keep`` from the bounding set and clear the ambient set."""
    for cap in range(64):
        if keep & (1 << cap):
            continue
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:  # past the kernel's last capability
                break
            raise
    with contextlib.suppress(OSError):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def syscall(number: int, *args: int | ctypes._SimpleCData | ctypes._Pointer | ctypes.c_void_p | None) -> int:
    """A raw syscall; integer arguments are passed as C longs."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(_libc.syscall(ctypes.c_long(number), *cargs), f"syscall {number}")


# --- Landlock --------------------------------------------------------------------------------
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446  # same number on every architecture
_LL_VERSION = 1
_LL_RULE_PATH_BENEATH = 1

LL_EXECUTE = 1 << 0
LL_WRITE_FILE = 1 << 1
LL_READ_FILE = 1 << 2
LL_READ_DIR = 1 << 3
LL_REFER = 1 << 13
LL_TRUNCATE = 1 << 14
LL_IOCTL_DEV = 1 << 15
_LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
LL_NET_BIND_TCP = 1 << 0
LL_NET_CONNECT_TCP = 1 << 1
LL_SCOPE_ABSTRACT_UNIX = 1 << 0
LL_SCOPE_SIGNAL = 1 << 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    ret = _libc.syscall(ctypes.c_long(_LL_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint32(_LL_VERSION))
    return max(int(ret), 0)


def _handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute ... make_sym
    if abi >= 2:
        rights |= LL_REFER
    if abi >= 3:
        rights |= LL_TRUNCATE
    if abi >= 5:
        rights |= LL_IOCTL_DEV
    return rights


def landlock_restrict(
    abi: int,
    *,
    writable: list[str],
    readable: list[str],
    block_tcp: bool,
    scope: bool,
) -> dict[str, bool]:
    """Confine this process (and its future children) with Landlock.

    ``writable`` paths get every filesystem right, ``readable`` paths read (and execute) rights;
    everything else is inaccessible. With ABI >= 4 and ``block_tcp``, TCP bind/connect is denied;
    with ABI >= 6 and ``scope``, signals and abstract unix sockets cannot reach processes outside
    the domain. Missing paths are skipped. Returns which of the net/scope features were applied.
    """
    fs = _handled_fs(abi)
    net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP if (block_tcp and abi >= 4) else 0
    scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL if (scope and abi >= 6) else 0
    attr = struct.pack("=QQQ", fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = syscall(_LL_CREATE, ctypes.cast(buf, ctypes.c_void_p), size, 0)
    try:
        read_rights = LL_READ_FILE | LL_READ_DIR | LL_EXECUTE
        for rights, paths in ((read_rights, readable), (fs, writable)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights & fs
                    if not os.path.isdir(path):
                        allowed &= _LL_FILE_RIGHTS
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
                    syscall(
                        _LL_ADD_RULE, ruleset, _LL_RULE_PATH_BENEATH, ctypes.cast(rule, ctypes.c_void_p), 0
                    )
                finally:
                    os.close(fd)
        set_no_new_privs()
        syscall(_LL_RESTRICT, ruleset, 0)
    finally:
        os.close(ruleset)
    return {"tcp": bool(net), "scope": bool(scoped)}


# --- seccomp-BPF -----------------------------------------------------------------------------
# Syscall numbers: name, x86_64 (asm/unistd_64.h), aarch64 (asm-generic/unistd.h); "-" where the
# architecture lacks the syscall.
_SYSCALL_TABLE = """
ptrace 101 117              process_vm_readv 310 270    process_vm_writev 311 271
mount 165 40                umount2 166 39              pivot_root 155 41
chroot 161 51               unshare 272 97              setns 308 268
bpf 321 280                 perf_event_open 298 241     keyctl 250 219
add_key 248 217             request_key 249 218         io_uring_setup 425 425
io_uring_enter 426 426      io_uring_register 427 427   kexec_load 246 104
kexec_file_load 320 294     init_module 175 105         finit_module 313 273
delete_module 176 106       reboot 169 142              swapon 167 224
swapoff 168 225             setsid 112 157              setpgid 109 154
userfaultfd 323 282         open_by_handle_at 304 265   name_to_handle_at 303 264
pidfd_getfd 438 438         open_tree 428 428           move_mount 429 429
fsopen 430 430              fsconfig 431 431            fsmount 432 432
fspick 433 433              mount_setattr 442 442       open_tree_attr 467 467
acct 163 89                 quotactl 179 60             syslog 103 116
vhangup 153 58              settimeofday 164 170        adjtimex 159 171
clock_settime 227 112       sethostname 170 161         setdomainname 171 162
fanotify_init 300 262       iopl 172 -                  ioperm 173 -
utime 132 -                 utimes 235 -                utimensat 280 88
futimesat 261 -             setxattr 188 5              lsetxattr 189 6
fsetxattr 190 7             removexattr 197 14          lremovexattr 198 15
fremovexattr 199 16         setxattrat 463 463          removexattrat 466 466
file_setattr 469 469        chmod 90 -                  fchmod 91 52
fchmodat 268 53             fchmodat2 452 452           chown 92 -
fchown 93 55                lchown 94 -                 fchownat 260 54
clone3 435 435              clone 56 220                execve 59 221
execveat 322 281            socket 41 198               socketpair 53 199
kill 62 129                 tkill 200 130               tgkill 234 131
pidfd_send_signal 424 424
"""


def _words(text: str) -> list[str]:
    return text.split()


def _parse_table(text: str) -> dict[str, dict[str, int]]:
    words = _words(text)
    table: dict[str, dict[str, int]] = {"x86_64": {}, "aarch64": {}}
    for name, x86, arm in zip(words[::3], words[1::3], words[2::3], strict=True):
        for arch, nr in (("x86_64", x86), ("aarch64", arm)):
            if nr != "-":
                table[arch][name] = int(nr)
    return table


_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = _parse_table(_SYSCALL_TABLE)
# Denied outright: debugging other processes, kernel/mount/namespace administration, io_uring
# (its ops bypass seccomp), leaving the process group (which the worker kills as a whole), and
# metadata changes Landlock does not cover (timestamps, extended attributes of readable files).
_DENIED = _words(
    """
ptrace process_vm_readv process_vm_writev mount umount2 pivot_root chroot unshare setns bpf
perf_event_open keyctl add_key request_key io_uring_setup io_uring_enter io_uring_register
kexec_load kexec_file_load init_module finit_module delete_module reboot swapon swapoff setsid
setpgid userfaultfd open_by_handle_at name_to_handle_at pidfd_getfd open_tree move_mount fsopen
fsconfig fsmount fspick mount_setattr open_tree_attr acct quotactl syslog vhangup settimeofday
adjtimex clock_settime sethostname setdomainname fanotify_init iopl ioperm utime utimes utimensat
futimesat setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr setxattrat
removexattrat file_setattr
"""
)
# Changing modes and owners needs ownership, so these matter only when the call runs as the
# owner of the user's files (no setuid).
_OWNER_ONLY = _words("chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat")
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
_X32_BIT = 0x40000000
_AF_UNIX = 1


def seccomp_supported() -> bool:
    """Whether this module knows the machine's syscall table."""
    return platform.machine() in _SYSCALLS


class _Bpf:
    """A tiny classic-BPF assembler with forward labels."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | None, str | None, int]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((0x20, None, None, offset))  # BPF_LD | BPF_W | BPF_ABS

    def jump(self, op: int, k: int, jt: str | None, jf: str | None = None) -> None:
        self.code.append((op, jt, jf, k))

    def alu_and(self, k: int) -> None:
        self.code.append((_AND, None, None, k))

    def ret(self, k: int) -> None:
        self.code.append((0x06, None, None, k))  # BPF_RET | BPF_K

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (op, jt, jf, k) in enumerate(self.code):
            offs = [0 if lab is None else self.labels[lab] - i - 1 for lab in (jt, jf)]
            if not all(0 <= o < 256 for o in offs):
                raise ValueError("BPF jump out of range")
            out += struct.pack("=HBBI", op, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)


_JEQ, _JGE, _JSET = 0x15, 0x35, 0x45
_AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
_OFF_NR, _OFF_ARCH, _OFF_ARG0, _OFF_ARG1 = 0, 4, 16, 24  # struct seccomp_data; low 32 bits (LE)
_SOCK_TYPE_MASK = 0xF  # the type without SOCK_NONBLOCK / SOCK_CLOEXEC
_SOCK_STREAM, _SOCK_SEQPACKET = 1, 5


def seccomp_program(
    *, block_network: bool, block_exec: bool, block_chmod: bool, own_pid: int | None
) -> bytes:
    """The filter: deny the `_DENIED` syscalls, namespace-creating clones and (optionally) sockets,
    exec, mode/owner changes, and signals to any process but ``own_pid`` / its group.

    ``block_network`` refuses ``socket()`` of every family, unix included: the network namespace
    does not isolate filesystem sockets (/run/dbus, /dev/log, docker.sock, an ssh agent) and
    Landlock does not cover connecting to them. Connected socket pairs stay (multiprocessing
    pipes, asyncio), stream or seqpacket only: a datagram one could ``sendto()`` any socket path.
    """
    machine = platform.machine()
    nr = _SYSCALLS[machine]
    p = _Bpf()
    p.load(_OFF_ARCH)
    p.jump(_JEQ, _AUDIT_ARCH[machine], None, "kill")
    p.load(_OFF_NR)
    if machine == "x86_64":
        p.jump(_JGE, _X32_BIT, "eperm")
    p.jump(_JEQ, nr["clone3"], "enosys")  # glibc falls back to clone(), whose flags we can inspect
    denied = _DENIED + (["execve", "execveat"] if block_exec else []) + (_OWNER_ONLY if block_chmod else [])
    for name in denied:
        if name in nr:
            p.jump(_JEQ, nr[name], "eperm")
    p.jump(_JEQ, nr["clone"], "clone")
    if block_network:
        p.jump(_JEQ, nr["socket"], "eacces")
        p.jump(_JEQ, nr["socketpair"], "socketpair")
    if own_pid is not None:
        p.jump(_JEQ, nr["kill"], "kill_syscall")
        p.jump(_JEQ, nr["tgkill"], "tgkill")
        p.jump(_JEQ, nr["tkill"], "eperm")
        p.jump(_JEQ, nr["pidfd_send_signal"], "eperm")
    p.ret(_RET_ALLOW)
    p.label("clone")
    p.load(_OFF_ARG0)
    p.jump(_JSET, NAMESPACE_FLAGS, "eperm", "allow")
    if block_network:
        p.label("socketpair")
        p.load(_OFF_ARG0)
        p.jump(_JEQ, _AF_UNIX, None, "eacces")
        p.load(_OFF_ARG1)
        p.alu_and(_SOCK_TYPE_MASK)
        p.jump(_JEQ, _SOCK_STREAM, "allow")
        p.jump(_JEQ, _SOCK_SEQPACKET, "allow", "eacces")
    if own_pid is not None:
        p.label("kill_syscall")
        p.load(_OFF_ARG0)
        p.jump(_JEQ, 0, "allow")
        p.jump(_JEQ, own_pid, "allow")
        p.jump(_JEQ, -own_pid, "allow", "eperm")
        p.label("tgkill")
        p.load(_OFF_ARG0)
        p.jump(_JEQ, own_pid, "allow", "eperm")
    p.label("allow")
    p.ret(_RET_ALLOW)
    p.label("eperm")
    p.ret(_RET_ERRNO | errno.EPERM)
    p.label("eacces")
    p.ret(_RET_ERRNO | errno.EACCES)
    p.label("enosys")
    p.ret(_RET_ERRNO | errno.ENOSYS)
    p.label("kill")
    p.ret(_RET_KILL_PROCESS)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def seccomp_install(program: bytes) -> None:
    """Install a seccomp filter on this thread (inherited by children; cannot be removed)."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    set_no_new_privs()
    _check(
        _libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        "seccomp",
    )  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

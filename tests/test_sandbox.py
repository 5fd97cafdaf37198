"""The python sandbox against hostile code: an adversarial corpus, what calls may read, and the
confinement on degraded hosts. Good cases, concurrency, worker replacement and lifecycle are in
`test_sandbox_calls.py`. Limits are small (1.5 s wall, 1 s CPU, 256 MiB) so the file runs in
seconds."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from sandbox_helpers import REPO, TIMEOUT_S, alive, config

from axpo_nemo.agent.sandbox import SandboxPool

pytestmark = pytest.mark.timeout(120)

ALL_MECHANISMS = [
    "user_namespace",
    "pid_namespace",
    "net_namespace",
    "mount_namespace",
    "setuid",
    "landlock",
    "seccomp",
]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` with its mode, size, mtime and content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(config()) as p:
        yield p


@pytest.fixture(scope="module")
def victim():
    """A world-writable directory outside the sandbox (so only confinement, not file permissions,
    protects it) with its snapshot; checked unchanged after every adversarial case."""
    root = Path(tempfile.mkdtemp(prefix="axpo-victim-"))
    (root / "keep.txt").write_text("precious\n")
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(os.urandom(64))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    before = snapshot(root)
    try:
        yield root, before
        assert snapshot(root) == before
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def listener():
    """A TCP server on the host's loopback that sandboxed code must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.setblocking(False)
    yield server
    server.close()


UNIX_TAG = uuid.uuid4().hex[:12]
UNIX_STREAM = f"/tmp/axpo-unix-{UNIX_TAG}.sock"  # like /run/dbus/system_bus_socket or an ssh agent
UNIX_DGRAM = f"/tmp/axpo-unix-{UNIX_TAG}.dgram"  # like /dev/log
UNIX_ABSTRACT = f"axpo-abstract-{UNIX_TAG}"


@pytest.fixture(scope="module")
def unix_listeners():
    """World-accessible unix sockets of the host (stream, datagram, abstract) that sandboxed code
    must not reach; yields a check that nothing connected to or was sent to them."""
    stream, dgram, abstract = (socket.socket(socket.AF_UNIX, kind) for kind in (
        socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_STREAM))  # fmt: skip
    stream.bind(UNIX_STREAM)
    dgram.bind(UNIX_DGRAM)
    abstract.bind("\0" + UNIX_ABSTRACT)
    for path in (UNIX_STREAM, UNIX_DGRAM):
        os.chmod(path, 0o777)
    for sock in (stream, abstract):
        sock.listen(8)
    for sock in (stream, dgram, abstract):
        sock.setblocking(False)

    def untouched() -> None:
        for sock in (stream, abstract):
            with pytest.raises(BlockingIOError):
                sock.accept()
        with pytest.raises(BlockingIOError):
            dgram.recv(1)

    yield untouched
    for sock in (stream, dgram, abstract):
        sock.close()
    for path in (UNIX_STREAM, UNIX_DGRAM):
        os.unlink(path)


@dataclass(frozen=True)
class Case:
    """Adversarial code and the failures it may end with (more than one where tiers differ)."""

    name: str
    code: str
    expected: tuple[str, ...]
    needs: str | None = None  # a mechanism the expectation relies on
    stdout: str | None = None  # the exact stdout, when it matters


ADVERSARIAL = [
    # runaway time
    Case("infinite_loop", "while True: pass", ("cpu", "timeout")),
    Case("sleep_forever", "import time; time.sleep(10**6)", ("timeout",)),
    Case(
        "print_then_hang",
        "print('started')\nimport time\nwhile True: time.sleep(0.01)",
        ("timeout",),
        stdout="started\n",  # output before the kill is kept
    ),
    Case(
        "ignore_signals",
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP, signal.SIGALRM):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass",
        ("cpu", "timeout"),
    ),
    # processes
    Case("fork_bomb", "import os\nwhile True: os.fork()", ("exception", "timeout", "cpu"), needs="setuid"),
    Case(
        "fork_bomb_persistent",
        "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",
        ("timeout", "cpu", "memory"),
        needs="setuid",
    ),
    Case(
        "thread_bomb",
        "import threading, time\nfor _ in range(10**4): threading.Thread(target=time.sleep, args=(100,)).start()",
        ("exception",),
        needs="setuid",
    ),
    Case("subprocess_run", "import subprocess; subprocess.run(['ls', '/'])", ("exception",)),
    Case("subprocess_sleep", "import subprocess; subprocess.Popen(['sleep', '1000']).wait()", ("exception",)),
    Case("os_system", "import os, sys; sys.exit(os.system('echo pwned > @TMPFILE@'))", ("exit", "exception")),
    Case(
        "exec_python",
        "import os, sys; os.execv(sys.executable, [sys.executable, '-c', 'print(1)'])",
        ("exception",),
    ),
    Case("setsid_escape", "import os; os.setsid()", ("exception",)),
    # memory
    Case("bytearray_bomb", "x = bytearray(10**10)", ("memory",)),
    # Grows while burning CPU: under load the CPU limit can fire before the memory cap.
    Case("list_growth", "x = []\nwhile True: x.append(' ' * 10**6)", ("memory", "cpu")),
    Case("numpy_bomb", "import numpy as np; a = np.ones((10**5, 10**5))", ("memory",)),
    Case(
        "memory_across_processes",
        "import os, time\nfor _ in range(10):\n    if os.fork() == 0:\n"
        "        x = bytearray(100 * 2**20); time.sleep(30)\ntime.sleep(30)",
        ("memory",),
    ),
    # files outside the working directory
    Case("write_tmp", "open('@TMPFILE@', 'w').write('x')", ("exception",)),
    Case("write_repo", "open('@REPOFILE@', 'w').write('x')", ("exception",)),
    Case("write_home", "open('@HOMEFILE@', 'w').write('x')", ("exception",)),
    Case("write_victim", "open('@VICTIM@/new.txt', 'w').write('x')", ("exception",)),
    Case("append_victim", "open('@VICTIM@/keep.txt', 'a').write('x')", ("exception",)),
    Case("truncate_victim", "import os; os.truncate('@VICTIM@/keep.txt', 0)", ("exception",)),
    Case("delete_victim", "import os; os.remove('@VICTIM@/keep.txt')", ("exception",)),
    Case("rmtree_victim", "import shutil; shutil.rmtree('@VICTIM@')", ("exception",)),
    Case("rename_victim", "import os; os.rename('@VICTIM@/keep.txt', 'stolen.txt')", ("exception",)),
    Case("chmod_victim", "import os; os.chmod('@VICTIM@/keep.txt', 0)", ("exception",)),
    Case("touch_victim", "import os; os.utime('@VICTIM@/keep.txt', (0, 0))", ("exception",)),
    Case(
        "symlink_escape",
        "import os; os.symlink('@VICTIM@/keep.txt', 'l'); open('l', 'w').write('x')",
        ("exception",),
    ),
    Case("hardlink_escape", "import os; os.link('@VICTIM@/keep.txt', 'l')", ("exception",)),
    Case("chdir_escape", "import os; os.chdir('@VICTIM@'); open('new.txt', 'w').write('x')", ("exception",)),
    Case("dev_shm", "open('/dev/shm/@UNIQUE@', 'w').write('x')", ("exception",)),
    Case("read_shadow", "print(open('/etc/shadow').read())", ("exception",), needs="landlock"),
    Case("read_trainer_environ", "print(open('/proc/@MAINPID@/environ').read())", ("exception",)),
    Case("huge_file", "open('big', 'wb').write(b'x' * (5 * 2**20))", ("exception",)),
    Case(
        "fill_disk",
        "for i in range(100): open(f'f{i}', 'wb').write(b'x' * (3 * 2**20))",
        ("exception",),
        needs="mount_namespace",
    ),
    Case("too_many_open_files", "fs = [open('/dev/null') for _ in range(10**5)]", ("exception",)),
    # network
    Case(
        "connect_localhost",
        "import socket; socket.create_connection(('127.0.0.1', @PORT@), timeout=1)",
        ("exception",),
    ),
    Case(
        "connect_external",
        "import socket; socket.create_connection(('1.1.1.1', 80), timeout=5)",
        ("exception",),
    ),
    Case(
        "udp_external",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('1.1.1.1', 53))",
        ("exception",),
    ),
    Case("dns_lookup", "import socket; socket.getaddrinfo('example.com', 443)", ("exception",)),
    Case(
        "http_get",
        "import urllib.request; urllib.request.urlopen('http://1.1.1.1', timeout=5)",
        ("exception",),
    ),
    Case("raw_socket", "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)", ("exception",)),
    # the host's unix sockets (dbus, /dev/log, docker.sock, an ssh agent): no network namespace
    # separates them and Landlock does not cover connecting
    Case(
        "unix_connect",
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('@UNIXSTREAM@'); s.send(b'x')",
        ("exception",),
    ),
    Case(
        "unix_abstract_connect",
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0@UNIXABSTRACT@'); s.send(b'x')",
        ("exception",),
    ),
    Case(
        "unix_datagram_sendto",
        "import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', '@UNIXDGRAM@')",
        ("exception",),
    ),
    Case(
        "unix_socketpair_sendto",
        "import socket\na, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\na.sendto(b'x', '@UNIXDGRAM@')",
        ("exception",),
    ),
    # output floods
    Case("stdout_flood", "while True: print('x' * 1000)", ("output_limit",)),
    Case("stderr_flood", "import sys\nwhile True: sys.stderr.write('e' * 10000)", ("output_limit",)),
    Case("one_huge_write", "import sys; sys.stdout.write('x' * (50 * 10**6))", ("output_limit",)),
    Case(
        "binary_flood",
        "import os, sys\nwhile True: sys.stdout.buffer.write(os.urandom(65536))",
        ("output_limit",),
    ),
    # killing itself or others
    Case("kill_self", "import os; os.kill(os.getpid(), 9)", ("signal",)),
    Case("os_exit", "import os; os._exit(3)", ("exit",)),
    Case("sys_exit", "import sys; sys.exit(2)", ("exit",)),
    Case("sys_exit_256", "import sys; sys.exit(256)", ("exit",)),
    Case("sys_exit_message", "import sys; sys.exit('bye')", ("exit",)),
    Case("kill_parent", "import os; os.kill(os.getppid(), 9)", ("exception", "signal")),
    Case("kill_everyone", "import os; os.kill(-1, 9)\nraise SystemExit(5)", ("exception", "exit", "signal")),
    Case("kill_zygote", "import os; os.kill(@ZYGOTE@, 9)", ("exception",)),
    Case("kill_trainer", "import os; os.kill(@MAINPID@, 9)", ("exception",)),
    Case(
        "close_pipes", "import os\nfor fd in (1, 2, 3): os.close(fd)\nraise ValueError", ("exit", "exception")
    ),
    # privilege and kernel surface
    Case("ptrace", "import ctypes; assert ctypes.CDLL(None).ptrace(16, 1, 0, 0) == 0", ("exception",)),
    Case(
        "mount",
        "import ctypes; assert ctypes.CDLL(None).mount(b'none', b'/mnt', b'tmpfs', 0, None) == 0",
        ("exception",),
    ),
    Case(
        "new_user_namespace",
        "import ctypes; assert ctypes.CDLL(None).unshare(0x10000000) == 0",
        ("exception",),
    ),
    Case("raise_rlimit", "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", ("exception",)),
    Case("become_root", "import os; os.setuid(0)", ("exception",), needs="setuid"),
    Case("ctypes_segfault", "import ctypes; ctypes.string_at(0)", ("crash", "exception")),
    # plain errors
    Case("recursion_bomb", "def f(): return f()\nf()", ("exception",)),
    Case("syntax_error", "def (:", ("exception",)),
    Case("null_byte", "print(1)\x00", ("exception",)),
    Case("exception_traceback", "raise ValueError('boom')", ("exception",)),
    Case("huge_exception_message", "raise ValueError('x' * 10**7)", ("exception",)),
    Case("input_eof", "x = input('? ')", ("exception",)),
    Case("heavy_import", "import torch", ("exception",)),
    Case("heavy_import_submodule", "from transformers import AutoModel", ("exception",)),
    Case("closed_stdout", "import sys; sys.stdout.close(); print(1)", ("exception",)),
]


def fill(code: str, tokens: dict[str, str]) -> str:
    for key, value in tokens.items():
        code = code.replace(f"@{key}@", value)
    return code


def run_case(pool: SandboxPool, case: Case, victim_dir: Path, port: int) -> None:
    """Run one adversarial case and check the error kind, the time and that nothing leaked."""
    if case.needs and case.needs not in pool.confinement:
        pytest.skip(f"relies on {case.needs}, not active here")
    unique = f"axpo-evil-{uuid.uuid4().hex}"
    tokens = {
        "TMPFILE": f"/tmp/{unique}",
        "REPOFILE": str(REPO / unique),
        "HOMEFILE": os.path.join(os.path.expanduser("~"), unique),
        "VICTIM": str(victim_dir),
        "UNIQUE": unique,
        "PORT": str(port),
        "UNIXSTREAM": UNIX_STREAM,
        "UNIXDGRAM": UNIX_DGRAM,
        "UNIXABSTRACT": UNIX_ABSTRACT,
        "MAINPID": str(os.getpid()),
        "ZYGOTE": str(pool.zygote_pid),
    }
    start = time.monotonic()
    result = pool.run(fill(case.code, tokens))
    elapsed = time.monotonic() - start
    assert result.failure in case.expected, (result.failure, result.stdout[-300:], result.stderr[-1500:])
    if case.stdout is not None:
        assert result.stdout == case.stdout
    assert elapsed < TIMEOUT_S + 3.0
    assert len(result.stdout) < 2 * 4096 + 200 and len(result.stderr) < 2 * 4096 + 200
    for key in ("TMPFILE", "REPOFILE", "HOMEFILE"):
        assert not os.path.exists(tokens[key]), f"{case.name} created {tokens[key]}"
    assert not os.path.exists(f"/dev/shm/{unique}")


@pytest.mark.parametrize("case", ADVERSARIAL, ids=[c.name for c in ADVERSARIAL])
def test_adversarial_code_fails_cleanly(pool, victim, listener, unix_listeners, case):
    victim_dir, before = victim
    run_case(pool, case, victim_dir, listener.getsockname()[1])
    assert snapshot(victim_dir) == before
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing connected to the host's loopback
    unix_listeners()  # nor to its unix sockets
    after = pool.run("print(7)")
    assert after.ok and after.stdout == "7\n"  # and the pool still works
    assert alive(pool.zygote_pid)


def test_corpus_is_large_and_named_uniquely():
    assert len(ADVERSARIAL) >= 40
    assert len({c.name for c in ADVERSARIAL}) == len(ADVERSARIAL)


def test_external_connect_fails_fast(pool):
    start = time.monotonic()
    result = pool.run("import socket; socket.create_connection(('1.1.1.1', 80), timeout=30)")
    assert result.failure == "exception"
    assert time.monotonic() - start < 1.5


def test_exception_tracebacks_point_at_the_code(pool):
    result = pool.run("def f(x):\n    return 1 / x\n\nf(0)")
    assert result.failure == "exception" and result.error_type == "ZeroDivisionError"
    assert 'File "<code>", line 2, in f' in result.stderr
    assert "return 1 / x" in result.stderr
    assert "_runner" not in result.stderr


def test_output_is_cut_to_head_and_tail(pool):
    result = pool.run("print('HEAD' + 'x' * 100_000 + 'TAIL')")
    assert result.ok
    assert result.stdout.startswith("HEAD") and result.stdout.rstrip().endswith("TAIL")
    assert result.stdout_omitted > 90_000 and "bytes of output omitted" in result.stdout


def test_background_processes_end_with_the_call(pool):
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\nprint('parent done')"
    assert pool.run(code).stdout == "parent done\n"
    for pid in pool.worker_pids():
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            assert f.read().split() == []


def test_timeout_argument_shortens_the_limit(pool):
    start = time.monotonic()
    result = pool.run("import time; time.sleep(60)", timeout_s=0.5)
    assert result.failure == "timeout"
    assert time.monotonic() - start < 1.5


# --- what calls may read --------------------------------------------------------------------

# The pool as this host gives it, and an unprivileged container's (no namespaces, no setuid).
TIERS = {
    "default": [],
    "unprivileged": ["user_namespace", "pid_namespace", "net_namespace", "mount_namespace", "setuid"],
}


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_launch_directory_is_unreadable(tier, tmp_path, monkeypatch):
    """Started with ``python -m`` the trainer's cwd is on sys.path: its .env must stay private."""
    launch = tmp_path / "launch"
    launch.mkdir()
    secret = launch / ".env"
    secret.write_text("API_KEY=hunter2\n")
    secret.chmod(0o600)
    monkeypatch.chdir(launch)
    monkeypatch.syspath_prepend(str(launch))
    with SandboxPool(config(pool_size=1, disable=TIERS[tier])) as p:
        read = p.run(f"print(open({str(secret)!r}).read())")
        listing = p.run(f"import os; print(os.listdir({str(launch)!r}))")
        lazy = p.run("import decimal, fractions, sqlite3, xml.dom.minidom; print('imported')")
    assert read.failure == "exception" and read.error_type == "PermissionError", read.stderr
    assert "hunter2" not in read.stdout + read.stderr
    assert listing.failure == "exception" and ".env" not in listing.stdout
    assert lazy.ok and lazy.stdout == "imported\n", lazy.stderr  # the interpreter stays readable


def test_allowed_subprocesses_can_run_the_interpreter():
    with SandboxPool(config(pool_size=1, allow_subprocess=True)) as p:
        result = p.run("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import json; print(6 * 7)'], check=True)")
    assert result.ok and result.stdout == "42\n", result.stderr


def test_readable_paths_leave_out_the_launch_directories(tmp_path):
    from axpo_nemo.agent.sandbox.confinement import default_readable_paths

    launch = tmp_path / "app"
    launch.mkdir()
    paths = default_readable_paths([], [str(launch), "/usr/src/app"], ["numpy", "PIL.Image"])
    assert str(launch) not in paths and REPO.as_posix() not in paths
    assert not any(str(launch).startswith(p + "/") for p in paths)  # nor any directory above it
    assert "/usr" not in paths and "/" not in paths
    assert os.path.realpath(os.path.dirname(os.__file__)) in paths  # the standard library is
    assert os.path.realpath(os.path.dirname(Image.__file__)) in paths  # and the preloaded packages


def test_calls_hold_no_capabilities(tmp_path):
    """A 0600 file of another user stays unreadable even where Landlock would allow reading it."""
    if os.geteuid() != 0:
        pytest.skip("the per-call uid only exists as root")
    shared = Path(tempfile.mkdtemp(prefix="axpo-shared-"))
    try:
        shared.chmod(0o755)
        (shared / "private.txt").write_text("root only\n")
        (shared / "private.txt").chmod(0o600)
        (shared / "public.txt").write_text("everyone\n")
        (shared / "public.txt").chmod(0o644)
        with SandboxPool(config(pool_size=1, extra_readable_paths=[str(shared)])) as p:
            if "setuid" not in p.confinement:
                pytest.skip("calls do not run as their own uid here")
            public = p.run(f"print(open({str(shared / 'public.txt')!r}).read(), end='')")
            private = p.run(f"print(open({str(shared / 'private.txt')!r}).read())")
    finally:
        shutil.rmtree(shared)
    assert public.ok and public.stdout == "everyone\n", public.stderr
    assert private.failure == "exception" and private.error_type == "PermissionError"


# --- the confinement on degraded hosts -----------------------------------------------------

DEGRADED = {
    # An unprivileged container: no namespaces, no root.
    "landlock_seccomp_only": [
        "user_namespace",
        "pid_namespace",
        "net_namespace",
        "mount_namespace",
        "setuid",
    ],
    # Nothing but rlimits: the in-interpreter audit guard.
    "audit_guard_only": ALL_MECHANISMS,
}
DEGRADED_CASES = [
    c
    for c in ADVERSARIAL
    if c.name
    in {
        "infinite_loop",
        "subprocess_run",
        "bytearray_bomb",
        "memory_across_processes",
        "write_tmp",
        "write_victim",
        "delete_victim",
        "rename_victim",
        "connect_localhost",
        "udp_external",
        "unix_connect",
        "unix_abstract_connect",
        "unix_datagram_sendto",
        "unix_socketpair_sendto",
        "stdout_flood",
        "kill_parent",
        "kill_everyone",
        "kill_trainer",
        "kill_zygote",
        "exception_traceback",
    }
]


@pytest.fixture(scope="module", params=sorted(DEGRADED))
def degraded_pool(request):
    with SandboxPool(config(pool_size=2, disable=DEGRADED[request.param])) as p:
        yield p


def test_degraded_pool_reports_what_it_lacks(degraded_pool):
    conf = degraded_pool.confinement
    assert "rlimits" in conf and not {"pid_namespace", "setuid"} & set(conf.mechanisms)
    assert conf.unavailable["setuid"] in ("disabled", "needs root")
    assert conf.level in ("partial", "weak", "strong")


@pytest.mark.parametrize("case", DEGRADED_CASES, ids=[c.name for c in DEGRADED_CASES])
def test_degraded_confinement_still_contains_code(degraded_pool, victim, listener, unix_listeners, case):
    victim_dir, before = victim
    run_case(degraded_pool, case, victim_dir, listener.getsockname()[1])
    assert snapshot(victim_dir) == before
    with pytest.raises(BlockingIOError):
        listener.accept()
    unix_listeners()
    assert degraded_pool.run("print(7)").stdout == "7\n"

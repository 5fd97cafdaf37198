"""The python sandbox on ordinary code: good cases, concurrency, worker replacement, the
confinement report and the pool's lifecycle (hostile code: `test_sandbox.py`). Limits are small
(1.5 s wall, 1 s CPU, 256 MiB) so the file runs in seconds."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from sandbox_helpers import LIMITS, REPO, TIMEOUT_S, alive, config

from axpo_nemo.agent.sandbox import Confinement, SandboxConfig, SandboxError, SandboxPool, _linux

pytestmark = pytest.mark.timeout(120)


def can_unshare(flags: int) -> bool:
    """Whether a child of this process may create these namespaces (checked independently)."""
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() != 0:
                _linux.unshare(_linux.CLONE_NEWUSER)
            _linux.unshare(flags)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def zombie_children() -> list[int]:
    """This process's children that exited and were not reaped."""
    kids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            kids += [int(p) for p in f.read().split()]
    return [pid for pid in kids if not alive(pid) and os.path.exists(f"/proc/{pid}")]


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(config()) as p:
        yield p


# --- good cases ------------------------------------------------------------------------------


def gradient(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height))
    img.putdata([(x % 256, y % 256, 128) for y in range(height) for x in range(width)])
    return img


def test_print_and_numpy(pool):
    result = pool.run("import numpy as np\nprint('hello')\nprint(np.arange(10).reshape(2, 5).sum(axis=1))")
    assert result.ok and result.exit_code == 0
    assert result.stdout == "hello\n[10 35]\n" and result.stderr == ""


def test_crop_of_preloaded_image_comes_back(pool):
    img = gradient(64, 48)
    result = pool.run("print(image.size, len(images))\nshow(image.crop((10, 5, 30, 25)))", images=[img])
    assert result.ok, result.stderr
    assert result.stdout == "(64, 48) 1\n"
    assert len(result.images) == 1 and result.images[0].size == (20, 20)
    assert result.images[0].convert("RGB").getpixel((0, 0)) == img.getpixel((10, 5))


def test_several_images_are_preloaded_in_order(pool):
    images = [gradient(8, 4), Image.new("L", (5, 7), 200), Image.new("P", (3, 3))]
    code = "print([im.size for im in images], image_1.size, image_2.mode, image_3.mode, image is image_1)"
    result = pool.run(code, images=images)
    assert result.stdout == "[(8, 4), (5, 7), (3, 3)] (8, 4) L RGB True\n"


def test_no_images_means_image_is_none(pool):
    assert pool.run("print(image, images)").stdout == "None []\n"


@pytest.mark.parametrize(
    "code",
    [
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()",
        "fig, ax = plt.subplots()\nax.imshow(np.zeros((4, 4)))",  # left open: returned at the end
        "plt.plot([1, 2])\nplt.savefig('plot.png')\nplt.close('all')",  # saved file
        "show(np.linspace(0, 1, 100).reshape(10, 10))",  # a float array
        "Image.new('RGB', (20, 10), 'red').save('red.jpg')",
    ],
    ids=["plt_show", "open_figure", "savefig_file", "numpy_array", "saved_jpeg"],
)
def test_produced_images_are_returned(pool, code):
    result = pool.run(code)
    assert result.ok, result.stderr
    assert len(result.images) == 1 and result.images_dropped == 0
    assert result.images[0].width * result.images[0].height <= LIMITS["max_image_pixels"]


def test_giant_image_is_downscaled(pool):
    result = pool.run("show(Image.new('RGB', (4000, 1000), 'blue'))")
    assert result.ok and len(result.images) == 1
    w, h = result.images[0].size
    assert w * h <= LIMITS["max_image_pixels"] and abs(w / h - 4) < 0.1


def test_image_count_is_capped(pool):
    result = pool.run("for i in range(10): show(Image.new('L', (8, 8), i))")
    assert result.ok
    assert len(result.images) == LIMITS["max_images"] and result.images_dropped == 6


def test_forged_result_frames_are_ignored(pool):
    code = textwrap.dedent(
        """
        import os, struct
        png = b'\\x89PNG\\r\\n\\x1a\\n' + struct.pack('>I', 13) + b'IHDR' + struct.pack('>II', 100000, 100000)
        os.write(3, b'I' + struct.pack('!I', len(png)) + png)
        os.write(3, b'S' + struct.pack('!I', 5) + b'{"x":')
        """
    )
    result = pool.run(code)
    assert result.ok and result.images == [] and result.images_dropped == 1


FORGE = textwrap.dedent(
    """
    import json, os, struct
    payload = json.dumps(@STATUS@).encode()
    data = memoryview(struct.pack("!cI", b"S", len(payload)) + payload)
    while data:
        data = data[os.write(3, data):]
    os._exit(1)
    """
)


def test_exception_names_are_short_identifiers(pool):
    huge = pool.run("raise type('E' * 2_000_000, (Exception,), {})('x')")
    assert huge.failure == "exception" and huge.error_type is None
    assert len(huge.stderr) < 2 * 4096 + 200
    odd = pool.run("raise type('not a name', (Exception,), {})('x')")
    assert odd.failure == "exception" and odd.error_type is None
    named = pool.run("class Boom(Exception):\n    pass\nraise Boom()")
    assert named.failure == "exception" and named.error_type == "Boom"


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        ("{'status': 'exception', 'type': 'E' * 3_000_000}", "exception"),
        ("{'status': 'exception', 'type': ['E'] * 1000}", "exception"),
        ("{'status': 'setup_failed', 'error': 'x' * 5_000_000}", "sandbox_error"),
        ("{'status': 'probe', 'applied': ['a' * 10**6] * 5, 'failed': {'b' * 10**6: 'c' * 10**6}}", "exit"),
    ],
    ids=["huge_type", "type_not_a_string", "huge_setup_error", "huge_probe_report"],
)
def test_forged_status_frames_stay_small(pool, status, failure):
    """The code can write its own status frame on fd 3; nothing of it reaches the pool uncapped."""
    start = time.monotonic()
    result = pool.run(FORGE.replace("@STATUS@", status))
    assert result.failure == failure and result.error_type is None
    assert sum(len(n) for n in result.notes) < 4000
    assert time.monotonic() - start < TIMEOUT_S + 3.0


def test_connected_socket_pairs_still_work(pool):
    code = textwrap.dedent(
        """
        import multiprocessing, socket
        a, b = socket.socketpair()
        a.sendall(b"pair")
        parent, child = multiprocessing.Pipe()
        child.send("pipe")
        print(b.recv(4).decode(), parent.recv())
        """
    )
    result = pool.run(code)
    assert result.ok and result.stdout == "pair pipe\n", result.stderr


def test_forking_works_but_multiprocessing_locks_do_not(pool):
    """As documented: os.fork and multiprocessing.Process run; multiprocessing's locks, queues and
    pools need POSIX semaphores in the host's /dev/shm and fail with PermissionError."""
    forked = pool.run(
        "import multiprocessing as mp, os\n"
        "p = mp.Process(target=print, args=('child',))\np.start()\np.join()\n"
        "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint(p.exitcode, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"
    )
    assert forked.ok and forked.stdout == "child\n0 7\n", forked.stderr
    for code in ("import multiprocessing as mp\nmp.Pool(2)", "import multiprocessing as mp\nmp.Queue()",
                 "from concurrent.futures import ProcessPoolExecutor\nProcessPoolExecutor(2).submit(abs, -1).result()"):  # fmt: skip
        refused = pool.run(code)
        assert refused.failure == "exception" and refused.error_type == "PermissionError", refused.stderr
    threads = pool.run(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(2) as ex:\n    print(sum(ex.map(abs, [-1, -2])))"
    )
    assert threads.ok and threads.stdout == "3\n"
    help_text = SandboxConfig.__dataclass_fields__["allow_subprocess"].metadata["help"]
    assert "multiprocessing" in help_text and "/dev/shm" in help_text


def test_non_utf8_output_is_replaced(pool):
    result = pool.run("import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')")
    assert result.ok and result.stdout == "ok \ufffd\ufffd end\n"


def test_unicode_and_stderr_warnings(pool):
    result = pool.run("import warnings\nprint('héllo ✓')\nwarnings.warn('careful')")
    assert result.ok and result.stdout == "héllo ✓\n" and "careful" in result.stderr


def test_files_in_the_working_directory_work_within_a_call(pool):
    code = (
        "import os\nassert os.listdir('.') == []\nopen('notes.txt', 'w').write('abc')\n"
        "print(open('notes.txt').read(), os.path.getsize('notes.txt'))\nimport tempfile\n"
        "with tempfile.NamedTemporaryFile() as f: print(f.name.startswith(os.getcwd()))"
    )
    result = pool.run(code)
    assert result.ok, result.stderr
    assert result.stdout == "abc 3\nTrue\n"


def test_state_does_not_leak_between_calls(pool):
    setup = (
        "import os, sys, numpy as np\nleaked = 1\nopen('left.txt', 'w').write('x')\nos.environ['LEAK'] = '1'\n"
        "np.pi = 3\nsys.modules['leaky'] = sys\nimage.putpixel((0, 0), (1, 2, 3))"
    )
    check = (
        "import os, sys, numpy as np\nprint('leaked' in globals(), os.listdir('.'), 'LEAK' in os.environ,\n"
        "      round(np.pi, 2), 'leaky' in sys.modules, image.getpixel((0, 0)))"
    )
    img = Image.new("RGB", (4, 4), (9, 9, 9))
    for _ in range(2 * pool.config.pool_size):  # every worker
        assert pool.run(setup, images=[img]).ok
    for _ in range(2 * pool.config.pool_size):
        assert pool.run(check, images=[img]).stdout == "False [] False 3.14 False (9, 9, 9)\n"
    assert img.getpixel((0, 0)) == (9, 9, 9)


def test_environment_is_scrubbed(pool):
    result = pool.run("import os; print(' '.join(sorted(os.environ)))")
    assert result.ok
    allowed = {"PATH", "HOME", "TMPDIR", "PWD", "LANG", "LC_ALL", "MPLBACKEND", "MPLCONFIGDIR"}
    allowed |= {"PYTHONDONTWRITEBYTECODE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    allowed |= {"NUMEXPR_NUM_THREADS", "MALLOC_ARENA_MAX"}
    assert set(result.stdout.split()) <= allowed


# --- concurrency, replacement, confinement report, lifecycle ----------------------------------


def test_64_concurrent_calls_finish(pool):
    def call(i: int):
        code = "while True: pass" if i % 16 == 0 else f"print({i} * 2)"
        return i, pool.run(code)

    start = time.monotonic()
    with ThreadPoolExecutor(64) as ex:
        results = dict(ex.map(call, range(64)))
    elapsed = time.monotonic() - start
    assert sorted(results) == list(range(64))
    for i, result in results.items():
        if i % 16 == 0:
            assert result.failure in ("cpu", "timeout")
        else:
            assert result.ok and result.stdout == f"{i * 2}\n"
    assert elapsed < 30


def test_killed_workers_are_replaced(pool):
    victims = pool.worker_pids()[:2]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    results = [pool.run(f"print({i})") for i in range(2 * pool.config.pool_size)]
    assert all(r.ok and r.stdout == f"{i}\n" for i, r in enumerate(results))
    assert not set(victims) & set(pool.worker_pids())
    assert len(pool.worker_pids()) == pool.config.pool_size


def test_killed_zygote_is_restarted():
    with SandboxPool(config(pool_size=2)) as p:
        old = p.zygote_pid
        os.kill(old, signal.SIGKILL)
        for pid in p.worker_pids():
            os.kill(pid, signal.SIGKILL)
        assert [p.run(f"print({i})").stdout for i in range(3)] == ["0\n", "1\n", "2\n"]
        assert p.zygote_pid != old


def test_confinement_is_reported_and_logged_once(caplog):
    with (
        caplog.at_level(logging.INFO, logger="axpo_nemo.agent.sandbox"),
        SandboxPool(config(pool_size=1)) as p,
    ):
        conf = p.confinement
        p.run("print(1)")
        os.kill(p.worker_pids()[0], signal.SIGKILL)
        p.run("print(1)")
    records = [r for r in caplog.records if "confinement" in r.getMessage()]
    assert len(records) == 1
    assert isinstance(conf, Confinement) and conf.describe() in records[0].getMessage()
    assert "rlimits" in conf and conf.level in ("strong", "partial", "weak")
    assert records[0].levelno == (logging.INFO if conf.level == "strong" else logging.WARNING)
    if _linux.landlock_abi():
        assert "landlock" in conf and conf.filesystem == "landlock"
    if os.geteuid() == 0:
        assert "setuid" in conf
    if can_unshare(_linux.CLONE_NEWPID | _linux.CLONE_NEWNET | _linux.CLONE_NEWNS):
        assert {"pid_namespace", "net_namespace", "mount_namespace"} <= set(conf.mechanisms)
        assert conf.network == "net_namespace"
    if _linux.landlock_abi() >= 6 and ("setuid" in conf or "pid_namespace" in conf):
        assert conf.level == "strong"
    assert Confinement.from_dict(conf.to_dict()) == conf


def test_close_kills_everything_and_removes_temp_dirs():
    p = SandboxPool(config(pool_size=2))
    assert p.run("open('x.txt', 'w').write('x')").ok
    pids = [p.zygote_pid, *p.worker_pids()]
    workdir = p.workdir
    assert workdir and os.path.isdir(workdir)
    # a call in flight when the pool closes returns (or raises) promptly
    outcome: list[object] = []

    def slow_call() -> None:
        try:
            outcome.append(p.run("import time; time.sleep(60)"))
        except SandboxError as e:
            outcome.append(e)

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.3)
    p.close()
    thread.join(5)
    assert not thread.is_alive() and outcome
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(workdir)
    assert zombie_children() == []
    p.close()  # idempotent
    with pytest.raises(SandboxError):
        p.run("print(1)")


def test_interpreter_exit_cleans_up_without_close(tmp_path):
    script = textwrap.dedent(
        f"""
        from axpo_nemo.agent.sandbox import SandboxConfig, SandboxPool
        pool = SandboxPool(SandboxConfig(pool_size=2, workdir_root={str(tmp_path)!r}))
        assert pool.run("print(1)").ok
        print(pool.zygote_pid, *pool.worker_pids(), flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    pids = [int(x) for x in out.stdout.split()]
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    assert list(tmp_path.iterdir()) == []


def test_config_validates_its_fields():
    with pytest.raises(ValueError, match="pool_size"):
        SandboxConfig(pool_size=0)
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="disable"):
        SandboxConfig(disable=["landlock", "selinux"])

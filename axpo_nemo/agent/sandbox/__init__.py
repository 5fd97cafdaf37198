"""The python sandbox: model-written code in confined, disposable processes from a warm pool.

Public API::

    from axpo_nemo.agent.sandbox import SandboxConfig, SandboxPool

    with SandboxPool(SandboxConfig(pool_size=4, timeout_s=10)) as pool:   # thread-safe
        result = pool.run("print(image.size); show(image.crop((0, 0, 8, 8)))", images=[img])
        result.stdout, result.stderr, result.images, result.failure   # failure None on success
        pool.confinement.mechanisms      # e.g. ('pid_namespace', ..., 'seccomp', 'rlimits')
        pool.confinement.level           # 'strong' | 'partial' | 'weak'

How a call runs: a zygote interpreter (started once, scrubbed environment) preloads numpy, PIL and
matplotlib (Agg) and forks ``pool_size`` workers; each call forks a fresh child from a worker, so
nothing carries over between calls. The child gets rlimits (CPU, address space, file size, open
files, processes), a fresh working directory (a size-limited tmpfs where a mount namespace is
available) and the confinement below, then runs the code as ``__main__`` with the images
preloaded. The worker enforces the wall clock and the call's total memory, caps stdout/stderr
(head and tail kept), kills every process of the call when it ends, and sends back text,
images and a failure reason (`SandboxResult`). The trainer never forks and never unpickles.

Confinement, probed at pool start and degraded in this order (see `confinement`), logged once
per pool (INFO when 'strong', WARNING otherwise):

* root (or unprivileged user namespaces): pid, net and mount namespaces per worker; as root each
  call also runs as its own unprivileged uid without any capability, so RLIMIT_NPROC counts only
  its processes and file modes apply (an interpreter under a private directory, e.g. root's home,
  is exposed to that uid through the worker's mount namespace, the rest of the directory hidden);
* Landlock (kernel >= 5.13, any user): writes only in the working directory, reads only the
  interpreter's standard library and packages and system libraries, never the trainer's working
  or script directory; ABI 4 also blocks TCP, ABI 6 blocks signals to outsiders;
* seccomp (x86_64, aarch64, any user): no sockets of any family, unix ones included (connected
  socket pairs excepted), no exec, ptrace, mounts, namespaces, io_uring, setsid, timestamp/xattr
  changes (and chmod/chown without setuid);
* rlimits always; an audit-hook guard only for what nothing above covers.

Forking works (``os.fork``, ``multiprocessing.Process``, up to ``max_processes``), but
multiprocessing's locks, queues and pools (``Pool``, ``Queue``, ``ProcessPoolExecutor``) raise
PermissionError: their POSIX semaphores live in /dev/shm, which is the host's and not writable from
a call. Threads (``concurrent.futures.ThreadPoolExecutor``) work.

In an unprivileged container without user namespaces the pool still gets Landlock + seccomp +
rlimits, but gives up: a private pid namespace (the call can see other processes in /proc only if
Landlock is missing; it cannot signal them with Landlock ABI >= 6 or, otherwise, seccomp), the
network namespace (seccomp and Landlock block sockets instead), the tmpfs disk quota (only the
per-file size limit remains) and an exact process limit (RLIMIT_NPROC counts all the user's
processes, so it is set to their current count plus ``max_processes``).

Modules: `config` (SandboxConfig), `pool` (SandboxPool, SandboxResult), `confinement` (what
isolates a call, per host), and the private `_zygote`, `_worker` (supervises one call),
`_runner` (executes the code), `_process` (process trees), `_linux` (ctypes syscalls) and
`_protocol` (message framing).

Exports resolve lazily: the sandbox's own processes import this package without pulling in the
trainer-side modules (whose config helpers import torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axpo_nemo.lazy import lazy_exports

if TYPE_CHECKING:
    from axpo_nemo.agent.sandbox.config import SandboxConfig
    from axpo_nemo.agent.sandbox.confinement import MECHANISMS, Confinement
    from axpo_nemo.agent.sandbox.pool import FAILURES, SandboxError, SandboxPool, SandboxResult

__all__ = [
    "FAILURES",
    "MECHANISMS",
    "Confinement",
    "SandboxConfig",
    "SandboxError",
    "SandboxPool",
    "SandboxResult",
]
_HOME = {
    "SandboxConfig": "config",
    "Confinement": "confinement",
    "MECHANISMS": "confinement",
    "SandboxPool": "pool",
    "SandboxResult": "pool",
    "SandboxError": "pool",
    "FAILURES": "pool",
}

__getattr__, __dir__ = lazy_exports(__name__, _HOME)

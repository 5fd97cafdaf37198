"""Settings of the python sandbox: pool size, per-call limits and confinement switches."""

from __future__ import annotations

from dataclasses import dataclass

from axpo_nemo.core.config import ValidatedConfig, setting

DISABLEABLE = (
    "user_namespace",
    "pid_namespace",
    "net_namespace",
    "mount_namespace",
    "setuid",
    "landlock",
    "seccomp",
)
DEFAULT_BLOCKED_MODULES = [
    "torch",
    "tensorflow",
    "jax",
    "transformers",
    "vllm",
    "ray",
    "deepspeed",
    "megatron",
]


@dataclass
class SandboxConfig(ValidatedConfig):
    """How the python tool's sandbox runs model-written code.

    Each call runs in a fresh process forked from a warm worker; these limits apply per call.
    """

    pool_size: int = setting(
        4, "Warm workers, i.e. calls that run at once; further calls queue.", ge=1, le=256
    )
    timeout_s: float = setting(10.0, "Wall-clock limit of one call, in seconds.", gt=0.0)
    cpu_time_s: int = setting(10, "CPU-time limit of each process of a call (RLIMIT_CPU), in seconds.", ge=1)
    memory_mb: int = setting(
        1024,
        "Memory one call may use, in MiB: each process may add this much address space to the "
        "preloaded interpreter (RLIMIT_AS), and the resident memory all the call's processes add "
        "together is polled and capped at it too.",
        ge=16,
    )
    max_processes: int = setting(
        16,
        "Processes and threads one call may run at once (RLIMIT_NPROC on an isolated uid; see the "
        "sandbox docs for where this is approximate).",
        ge=1,
    )
    max_file_mb: int = setting(64, "Largest file a call may write (RLIMIT_FSIZE), in MiB.", ge=0)
    max_disk_mb: int = setting(
        256, "Size of the call's tmpfs working directory, where a mount namespace is available, in MiB.", ge=1
    )
    max_open_files: int = setting(256, "Open file descriptors per process (RLIMIT_NOFILE).", ge=16)
    max_output_bytes: int = setting(
        16384, "Bytes of stdout and of stderr kept per call (head and tail; the middle is elided).", ge=256
    )
    output_kill_bytes: int = setting(
        8 * 1024 * 1024,
        "Total stdout+stderr bytes after which the call is killed (error output_limit).",
        ge=1024,
    )
    max_images: int = setting(8, "Images returned per call at most (shown, plotted or saved).", ge=0)
    max_image_pixels: int = setting(
        1024 * 1024, "Pixels per returned image at most; larger images are downscaled.", ge=64
    )
    max_code_chars: int = setting(100_000, "Longest code accepted by the python tool, in characters.", ge=1)
    allow_network: bool = setting(
        False,
        "Leave the network reachable (off: no sockets at all, the host's unix sockets included; "
        "connected socket pairs still work).",
    )
    allow_subprocess: bool = setting(
        False,
        "Let code execute other programs (execve). Forking is always allowed (os.fork, "
        "multiprocessing.Process), but multiprocessing's locks, queues and pools (Pool, Queue, "
        "ProcessPoolExecutor) fail with PermissionError: they need POSIX semaphores in /dev/shm, "
        "which is shared with the host and not writable from a call; threads work.",
    )
    blocked_modules: list[str] = setting(
        DEFAULT_BLOCKED_MODULES,
        "Top-level modules the code may not import (heavy frameworks); a convenience, not a boundary.",
    )
    preload_modules: list[str] = setting(
        ["numpy", "PIL.Image", "matplotlib.pyplot"],
        "Modules the zygote imports once so calls start warm (matplotlib uses the Agg backend).",
    )
    extra_readable_paths: list[str] = setting(
        [], "Paths code may read besides the interpreter, system libraries and its working directory."
    )
    disable: list[str] = setting(
        [],
        "Confinement mechanisms not to use even if available (for debugging, or hosts where one "
        "misbehaves); rlimits and, where needed, the audit guard always apply.",
        choices=DISABLEABLE,
    )
    workdir_root: str | None = setting(
        None, "Where per-call working directories live; None: the system temp dir."
    )
    queue_timeout_s: float = setting(
        600.0, "How long a call may wait for a free worker before failing with error 'busy'.", gt=0.0
    )
    uid_base: int = setting(
        1_500_000_000, "When run as root: first of the unprivileged uids the calls run as.", ge=1000
    )

"""Shared by the sandbox tests: the small test limits, and whether a process is alive."""

from __future__ import annotations

from pathlib import Path

from axpo_nemo.agent.sandbox import SandboxConfig

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1.5
LIMITS = dict(
    timeout_s=TIMEOUT_S,
    cpu_time_s=1,
    memory_mb=256,
    max_processes=16,
    max_file_mb=4,
    max_disk_mb=16,
    max_output_bytes=4096,
    output_kill_bytes=1 << 20,
    max_images=4,
    max_image_pixels=256 * 256,
)


def config(**overrides: object) -> SandboxConfig:
    """The test limits with ``overrides``."""
    return SandboxConfig(**{"pool_size": 3, **LIMITS, **overrides})  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

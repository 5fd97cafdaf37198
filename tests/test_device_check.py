"""tools/device_check.sh on the CPU with the tiny model: GRPO and AXPO steps, then the TRL comparison
(tools/bench_vs_trl.py) when TRL is installed, all in one command that exits 0."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_tiny_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "device_check.sh"), "--tiny", "--steps", "1", "--warmup", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "model: the demo's tiny Qwen3-VL" in out
    for algorithm in ("grpo", "axpo"):
        assert re.search(rf"^{algorithm}: median step [0-9.]+ s, rollout [0-9]+ tok/s", out, re.M), out
    assert re.search(r"^AXPO/GRPO median step-time ratio: [0-9.]+$", out, re.M)
    if importlib.util.find_spec("trl") is None:
        assert "TRL comparison: skipped" in out
    else:  # both workloads measured in both frameworks, and the ratio line
        for workload in ("single", "tools"):
            assert re.search(rf"^{workload}: ours/TRL step ratio [0-9.]+ ", out, re.M), out
        assert re.search(r"^GRPO step ours/TRL ratio [0-9.]+$", out, re.M), out
        assert "1.00 tool calls (0% failed)" in out  # the tools workload really called the tool
    assert out.rstrip().splitlines()[-1].endswith("; ok")

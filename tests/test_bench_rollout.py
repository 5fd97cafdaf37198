"""tools/bench_rollout.py runs on the CPU in a CI-sized setting and prints its ratio line (figures
are not asserted: they belong to docs/performance.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_rollout_quick_prints_the_ratio(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--quick", "--b", "2", "--n", "2", "--think", "8", "--repeats", "1", "--configs", "before,after"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_rollout.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.rstrip().splitlines()[-1]
    assert re.fullmatch(r"multi-turn/single-turn time ratio [0-9.]+", last), last

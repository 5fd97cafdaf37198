"""The agent-side figures in one run: zoom latency, warm python-call latency, generator tokens/s.

Runs the component benchmarks one after another, each in its own process so none warms the
other's caches:

* ``bench_zoom.py``      p50/p95 of `image_zoom_in` on a 2000x2000 image (target p50 < 10 ms)
* ``bench_sandbox.py``   p50/p95 of a warm sandboxed python call (target p50 < 150 ms)
* ``bench_generator.py`` rollout tokens/s of the local generator on the tiny model, with and
  without shared-prefix forking

    python tools/bench_tools.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Run the three benchmarks and print their reports."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier figures)")
    args = parser.parse_args()
    runs = [
        ("image_zoom_in on 2000x2000", "bench_zoom.py", ["--repeats", "100" if args.quick else "500"]),
        ("warm python call", "bench_sandbox.py", ["--calls", "30" if args.quick else "200"]),
        ("local generator (tiny Qwen3-VL)", "bench_generator.py", ["--repeats", "1" if args.quick else "3"]),
    ]
    failed = 0
    for title, script, extra in runs:
        print(f"=== {title} ({script})", flush=True)
        failed += subprocess.run([sys.executable, str(HERE / script), *extra], check=False).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

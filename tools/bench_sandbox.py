"""Latency of the python sandbox: warm calls, image crops, and a burst of concurrent calls.

Prints p50/p95 of a warm ``print(1)`` call and of a call that crops the preloaded image and
returns the crop (target: warm p50 under 150 ms), the pool's start time and confinement, and the
wall time of a burst of concurrent calls.

    python tools/bench_sandbox.py [--calls 200] [--pool-size 4] [--image-size 1024x768] [--burst 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from axpo_nemo.agent.sandbox import SandboxConfig, SandboxPool

CROP_CODE = "w, h = image.size\nshow(image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)))\nprint(w, h)"


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p95) of ``samples``, in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


def time_calls(pool: SandboxPool, code: str, calls: int, images: list[Image.Image]) -> list[float]:
    """Wall-clock seconds of ``calls`` sequential calls (each checked for success)."""
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        result = pool.run(code, images=images)
        samples.append(time.perf_counter() - start)
        if not result.ok:
            raise RuntimeError(f"benchmark call failed: {result.failure}: {result.stderr}")
    return samples


def bench(
    calls: int = 200, pool_size: int = 4, image_size: tuple[int, int] = (1024, 768), burst: int = 64
) -> dict:
    """Run the benchmark and return its figures (milliseconds, seconds for the burst)."""
    image = Image.new("RGB", image_size, (40, 120, 200))
    start = time.perf_counter()
    with SandboxPool(SandboxConfig(pool_size=pool_size)) as pool:
        startup = time.perf_counter() - start
        time_calls(pool, "print(1)", 5, [])  # warm-up
        warm = percentiles(time_calls(pool, "print(1)", calls, []))
        crop = percentiles(time_calls(pool, CROP_CODE, calls, [image]))
        begin = time.perf_counter()
        with ThreadPoolExecutor(burst) as ex:
            results = list(ex.map(lambda i: pool.run(f"print({i})"), range(burst)))
        burst_s = time.perf_counter() - begin
        assert all(r.ok and r.stdout.strip() == str(i) for i, r in enumerate(results))
        return {
            "confinement": pool.confinement.describe(),
            "startup_s": startup,
            "warm_p50_ms": warm[0],
            "warm_p95_ms": warm[1],
            "crop_p50_ms": crop[0],
            "crop_p95_ms": crop[1],
            "burst": burst,
            "burst_s": burst_s,
        }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--image-size", default="1024x768")
    parser.add_argument("--burst", type=int, default=64)
    args = parser.parse_args()
    w, h = (int(x) for x in args.image_size.split("x"))
    r = bench(args.calls, args.pool_size, (w, h), args.burst)
    print(f"confinement: {r['confinement']}")
    print(f"pool start:          {r['startup_s']:.2f} s (pool_size={args.pool_size})")
    print(f"warm print(1):       p50 {r['warm_p50_ms']:6.1f} ms   p95 {r['warm_p95_ms']:6.1f} ms")
    print(f"crop {w}x{h} image: p50 {r['crop_p50_ms']:6.1f} ms   p95 {r['crop_p95_ms']:6.1f} ms")
    print(f"{r['burst']} concurrent calls: {r['burst_s']:.2f} s")


if __name__ == "__main__":
    main()

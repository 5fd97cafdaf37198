"""Time one `image_zoom_in` call on a random-noise RGB image (target: p50 under 10 ms).

Each repeat zooms into a random box (each side 2-40 % of the image, uniformly placed) of a
2000x2000 image, as the model would: validate, crop, upscale to the 224 px short side (capped at
2048 px long side), convert to RGB. Prints p50/p95/max latency, overall and split by whether the
crop was upscaled or shrunk.

    python tools/bench_zoom.py [--size 2000] [--repeats 500] [--seed 0] [--mode RGB]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from axpo_nemo.agent.tools.base import ToolContext
from axpo_nemo.agent.tools.zoom import ImageZoomTool


def random_boxes(n: int, rng: np.random.Generator) -> list[list[float]]:
    """``n`` boxes in 0-1000 coordinates, each side 20-400 units long, inside the image."""
    w = rng.uniform(20, 400, n)
    h = rng.uniform(20, 400, n)
    x1 = rng.uniform(0, 1000 - w)
    y1 = rng.uniform(0, 1000 - h)
    return [[float(a), float(b), float(a + c), float(b + d)] for a, b, c, d in zip(x1, y1, w, h, strict=True)]


def percentiles_ms(samples: list[float]) -> str:
    """``p50 / p95 / max`` of durations in seconds, as milliseconds."""
    if not samples:
        return "-"
    a = np.asarray(samples) * 1e3
    return f"p50 {np.percentile(a, 50):6.2f} ms  p95 {np.percentile(a, 95):6.2f} ms  max {a.max():6.2f} ms  (n={a.size})"


def main() -> None:
    """Run the benchmark and print the latency figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="RGB", help="PIL mode of the source image (RGB, RGBA, L, P, ...)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    img = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).convert(args.mode)
    tool = ImageZoomTool()
    context = ToolContext(images=[img])
    for box in random_boxes(10, rng):  # warm-up
        tool({"bbox_2d": box}, context)

    total, up, down = [], [], []
    for box in random_boxes(args.repeats, rng):
        start = time.perf_counter()
        res = tool({"bbox_2d": box}, context)
        elapsed = time.perf_counter() - start
        assert res.ok, res.text
        total.append(elapsed)
        left, _, right, _ = res.metadata["pixel_box"]
        (up if res.metadata["output_size"][0] > right - left else down).append(elapsed)

    print(f"image_zoom_in on a {args.size}x{args.size} {args.mode} image, {args.repeats} random boxes")
    print(f"  all        {percentiles_ms(total)}")
    print(f"  upscaled   {percentiles_ms(up)}")
    print(f"  shrunk/1:1 {percentiles_ms(down)}")
    p50 = float(np.percentile(np.asarray(total) * 1e3, 50))
    print(f"target p50 < 10 ms: {'met' if p50 < 10 else 'MISSED'} ({p50:.2f} ms)")


if __name__ == "__main__":
    main()

"""Shard read throughput: samples/s with images decoded, for 1 and 2 workers (and none).

Generates shards of synthetic photo-like JPEGs (smooth gradients plus noise, random sides in
[--min-side, --max-side] px, quality 90: a few hundred KB each, like real training images), then
reads every sample through `ShardReader` with images decoded to RGB PIL images, for each worker
setting, with the shuffle buffer on. Prints samples/s, images/s and MB/s of encoded data per
setting (best of --repeats passes; the first pass also warms the page cache), timed from the
first sample on, so that worker start-up is left out.

    python tools/bench_data.py [--samples 200] [--min-side 448] [--max-side 1024] [--workers 0 1 2]
                               [--worker-type thread] [--shuffle-buffer 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.shards import ShardConfig, ShardReader, ShardWriter


def photo_jpeg(rng: np.random.Generator, min_side: int, max_side: int) -> bytes:
    """A JPEG of random size that compresses like a photograph (gradients + texture noise)."""
    w, h = (int(x) for x in rng.integers(min_side, max_side + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    pixels = np.clip(base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(folder: Path, n: int, min_side: int, max_side: int, seed: int) -> tuple[int, int]:
    """Write ``n`` one-image samples; returns (images, encoded bytes)."""
    rng = np.random.default_rng(seed)
    total = 0
    with ShardWriter(folder, ShardConfig(max_samples=64)) as writer:
        for i in range(n):
            image = photo_jpeg(rng, min_side, max_side)
            total += len(image)
            writer.write(Sample(f"b{i}", f"question {i}", str(i), "math"), images=[image])
    return n, total


def read_all(folder: Path, workers: int, worker_type: str, shuffle_buffer: int) -> tuple[int, int, float]:
    """(samples, images, seconds) of one pass with images decoded, timed from the first sample
    on (so that starting the workers, which processes pay for once, is not counted)."""
    with ShardReader(
        folder, num_workers=workers, worker_type=worker_type, shuffle_buffer=shuffle_buffer
    ) as r:
        it = iter(r)
        next(it)
        start = time.perf_counter()
        samples = images = 0
        for sample in it:
            samples += 1
            images += len(sample.image_data)
        return samples, images, time.perf_counter() - start


def main() -> None:
    """Generate shards, read them with each worker setting, print the throughput."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--min-side", type=int, default=448)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--worker-type", choices=("thread", "process"), default="thread")
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        n, nbytes = make_shards(folder, args.samples, args.min_side, args.max_side, args.seed)
        print(
            f"shards: {n} samples, one JPEG each ({args.min_side}-{args.max_side} px, "
            f"mean {nbytes / n / 1024:.0f} KB), written in {time.perf_counter() - t:.1f} s; "
            f"cpus: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}"
        )
        for workers in args.workers:
            best = min(
                (
                    read_all(folder, workers, args.worker_type, args.shuffle_buffer)
                    for _ in range(args.repeats)
                ),
                key=lambda r: r[2],
            )
            samples, images, secs = best
            label = (
                "in-thread"
                if workers == 0
                else f"{workers} {args.worker_type}{('es' if args.worker_type == 'process' else 's') if workers > 1 else ''}"
            )
            print(
                f"workers={workers} ({label:>9}): {samples / secs:7.1f} samples/s  {images / secs:7.1f} images/s  "
                f"{nbytes * samples / n / secs / 2**20:6.1f} MB/s encoded  ({samples} samples in {secs:.2f} s)"
            )


if __name__ == "__main__":
    main()

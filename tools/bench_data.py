"""Shard read throughput, ShardReader against the webdataset library, and what each can resume.

Generates shards of synthetic photo-like JPEGs (smooth gradients plus noise, random sides in
[--min-side, --max-side] px, quality 90: a few hundred KB each, like real training images), then
reads every sample, images decoded to RGB PIL images, shards and samples shuffled with the same
shuffle buffer, through

* ``ShardReader(decode="pil", num_workers=N, shuffle_buffer=B, shuffle_shards=True)``: threads
  (``--worker-type process``: spawned processes) that read samples by byte range; and
* the webdataset library: ``WebDataset(shards, shardshuffle=<shards>, detshuffle=True, seed=S,
  nodesplitter=split_by_node, workersplitter=split_by_worker).shuffle(B, seed=S).decode("pil")
  .to_tuple("json", "0.jpg")``, iterated in the caller (N = 0) or through
  ``torch.utils.data.DataLoader(batch_size=None, num_workers=N)`` (N processes; this is all that
  ``webdataset.WebLoader`` wraps). Each record becomes a `Sample`, as ShardReader yields.

The passes are interleaved (each setting once, then again: --repeats rounds) and the median is
printed, timed from the first sample on; the start-up (opening, starting workers, the first
sample) is printed apart, and so is the CPU time per sample (this process and its worker
processes, start-up included), which depends less than samples/s on what else the machine runs.
Then, on the same folder, it checks what each can do after a stop at sample i: whether the order
depends on the number of workers, whether a resumed reader continues with exactly the next sample
(with the same and with another worker count), whether epochs differ, and what resuming costs.
The figures are noisy on a shared machine: compare them within one run.

    python tools/bench_data.py [--quick] [--samples 200] [--min-side 448] [--max-side 1024]
        [--shard-samples 25] [--workers 0 1 2] [--worker-type thread] [--shuffle-buffer 64]
        [--repeats 3] [--no-webdataset]
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.shards import ShardConfig, ShardReader, ShardWriter, read_index

SEED = 0


def photo_jpeg(rng: np.random.Generator, min_side: int, max_side: int) -> bytes:
    """A JPEG of random size that compresses like a photograph (gradients + texture noise)."""
    w, h = (int(x) for x in rng.integers(min_side, max_side + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    pixels = np.clip(base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(
    folder: Path, n: int, min_side: int, max_side: int, seed: int, shard_samples: int = 25
) -> tuple[int, int]:
    """Write ``n`` one-image samples, ``shard_samples`` a shard; returns (images, encoded bytes)."""
    rng = np.random.default_rng(seed)
    total = 0
    with ShardWriter(folder, ShardConfig(max_samples=shard_samples)) as writer:
        for i in range(n):
            image = photo_jpeg(rng, min_side, max_side)
            total += len(image)
            writer.write(Sample(f"b{i}", f"question {i}", str(i), "math"), images=[image])
    return n, total


# -- the two readers -----------------------------------------------------------------------------
def wds_pipeline(folder: Path, shuffle_buffer: int, *, decode: bool = True, skip: int = 0,
                 seed: int | None = SEED) -> Any:  # fmt: skip
    """The webdataset pipeline over the shards of ``folder``: shard shuffle, sample shuffle buffer,
    then (``decode``) ``(record, RGB PIL image)`` tuples, else ``(key,)`` tuples. ``skip``: drop
    the first ``skip`` samples before decoding (webdataset's way to start at sample ``skip``).
    ``seed=None``: webdataset's defaults (a random seed per pipeline, an unseeded buffer)."""
    import webdataset as wds

    urls = [str(folder / s["name"]) for s in read_index(folder)["shards"]]
    ds = wds.WebDataset(
        urls, shardshuffle=len(urls), detshuffle=seed is not None, seed=seed,
        nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
    )  # fmt: skip
    ds = ds.shuffle(shuffle_buffer, seed=seed)
    if skip:
        ds = ds.slice(skip, None)
    return ds.decode("pil").to_tuple("json", "0.jpg") if decode else ds.to_tuple("__key__")


def wds_iter(pipeline: Any, workers: int) -> Iterator[Any]:
    """Iterate ``pipeline`` in the caller (0 workers) or through a DataLoader's worker processes."""
    if workers == 0:
        return iter(pipeline)
    from torch.utils.data import DataLoader

    return iter(DataLoader(pipeline, batch_size=None, num_workers=workers))


def wds_samples(pipeline: Any, workers: int) -> Iterator[Sample]:
    """The `Sample`s of a decoding `wds_pipeline` (what ShardReader yields)."""
    for record, image in wds_iter(pipeline, workers):
        sample = Sample.from_dict(record)
        sample.image_data = [image]
        yield sample


class Pass(NamedTuple):
    """One timed pass: ``seconds`` from the first sample on (start-up apart), ``cpu`` the CPU
    seconds of this process and of its worker processes over the whole pass, start-up included."""

    samples: int
    images: int
    seconds: float
    startup: float
    cpu: float


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_pass(open_samples: Callable[[], Iterator[Sample]]) -> tuple[int, int, float, float]:
    """(samples, images, seconds, start-up seconds) of one pass; the seconds count from the first
    sample on, so that starting workers (which processes pay for once) is printed apart."""
    t0 = time.perf_counter()
    it = open_samples()
    next(it)
    start = time.perf_counter()
    samples = images = 0
    for sample in it:
        samples += 1
        images += len(sample.image_data)
    return samples, images, time.perf_counter() - start, start - t0


def reader_pass(folder: Path, workers: int, worker_type: str, shuffle_buffer: int) -> Pass:
    """One timed pass of ShardReader with images decoded to PIL."""
    cpu = cpu_seconds()
    with ShardReader(folder, decode="pil", num_workers=workers, worker_type=worker_type,
                     shuffle_buffer=shuffle_buffer, shuffle_shards=True, seed=SEED) as r:  # fmt: skip
        result = timed_pass(lambda: iter(r))
    return Pass(*result, cpu_seconds() - cpu)  # after close: the worker processes have exited


def wds_pass(folder: Path, workers: int, shuffle_buffer: int) -> Pass:
    """One timed pass of the webdataset pipeline with images decoded to PIL."""
    cpu = cpu_seconds()
    result = timed_pass(lambda: wds_samples(wds_pipeline(folder, shuffle_buffer), workers))
    gc.collect()  # the exhausted DataLoader iterator has joined its workers; make sure of it
    return Pass(*result, cpu_seconds() - cpu)


def worker_label(kind: str, workers: int, worker_type: str) -> str:
    """``in the caller``, ``2 threads``, ``1 process``, …"""
    if workers == 0:
        return "in the caller"
    unit = "thread" if kind == "ShardReader" and worker_type == "thread" else "process"
    return f"{workers} {unit}{'es' if unit == 'process' else 's'}" if workers > 1 else f"1 {unit}"


# -- what each can resume ------------------------------------------------------------------------
def reader_ids(folder: Path, *, limit: int | None = None, state: dict | None = None,
               epochs: int = 1, **opts: Any) -> tuple[list[str], dict]:  # fmt: skip
    """Sample ids a ShardReader yields (``epochs`` epochs, or ``limit`` ids), and its state after."""
    with ShardReader(folder, decode="bytes", **opts) as r:
        if state is not None:
            r.load_state_dict(state)
        ids: list[str] = []
        for _ in range(epochs):
            for sample in r:
                ids.append(sample.id)
                if limit is not None and len(ids) == limit:
                    return ids, r.state_dict()
        return ids, r.state_dict()


def wds_keys(pipeline: Any, workers: int, epochs: int = 1) -> list[str]:
    """Sample keys of ``epochs`` passes over a non-decoding `wds_pipeline`."""
    return [key for _ in range(epochs) for (key,) in wds_iter(pipeline, workers)]


def yes(flag: bool) -> str:
    """``yes`` / ``no``."""
    return "yes" if flag else "no"


def check_resume(folder: Path, workers: int, shuffle_buffer: int, n: int) -> None:
    """Print what ShardReader and webdataset offer for a stop at sample i = n // 2."""
    i = n // 2
    opts = {"shuffle_buffer": shuffle_buffer, "shuffle_shards": True, "seed": SEED}
    full0, _ = reader_ids(folder, epochs=2, **opts)
    fullw, _ = reader_ids(folder, epochs=2, num_workers=workers, **opts)
    _, state = reader_ids(folder, limit=i, num_workers=workers, **opts)
    same_w, _ = reader_ids(folder, state=state, num_workers=workers, **opts)
    other_w, _ = reader_ids(folder, state=state, num_workers=0, **opts)
    with ShardReader(folder, decode="pil", num_workers=workers, **opts) as r:
        t = time.perf_counter()
        r.load_state_dict(state)
        next(iter(r))
        reader_resume = time.perf_counter() - t
    print(f"\nresume at sample i={i} of {n} ({workers} workers; ids compared over two epochs):")
    print(
        f"  ShardReader: same order with 0 and {workers} workers: {yes(full0 == fullw)}; "
        f"state_dict/load_state_dict: yes; resumed with {workers} workers continues at sample i: "
        f"{yes(same_w == fullw[i:n])}; resumed with 0 workers: {yes(other_w == fullw[i:n])}; "
        f"epoch 2 differs from epoch 1 (seeded): {yes(full0[:n] != full0[n:])}; first decoded "
        f"sample {reader_resume * 1000:.0f} ms after load_state_dict (nothing before i is read)"
    )

    import webdataset as wds

    keys0 = wds_keys(wds_pipeline(folder, shuffle_buffer, decode=False), 0, epochs=2)
    keysw = wds_keys(wds_pipeline(folder, shuffle_buffer, decode=False), workers, epochs=2)
    unseeded = [wds_keys(wds_pipeline(folder, shuffle_buffer, decode=False, seed=None), 0) for _ in range(2)]
    # Resuming = rebuilding the pipeline and dropping the first i samples: in the caller before
    # decoding (.slice), behind a DataLoader at its output (each worker holds a part of the stream).
    skip0 = wds_keys(wds_pipeline(folder, shuffle_buffer, decode=False, skip=i), 0)
    skipw = list(
        itertools.islice(wds_keys(wds_pipeline(folder, shuffle_buffer, decode=False), workers), i, None)
    )
    has_state = any(hasattr(c, "state_dict") for c in (wds.WebDataset, wds.DataPipeline, wds.WebLoader))
    t = time.perf_counter()
    next(wds_samples(wds_pipeline(folder, shuffle_buffer, skip=i), 0))
    skip_caller = time.perf_counter() - t
    t = time.perf_counter()
    next(itertools.islice(wds_samples(wds_pipeline(folder, shuffle_buffer), workers), i, None))
    skip_workers = time.perf_counter() - t
    print(
        f"  webdataset {wds.__version__}: same order with 0 and {workers} workers: "
        f"{yes(keys0[:n] == keysw[:n])}; state_dict: {yes(has_state)}; rebuilt and i samples "
        f"skipped, with the same worker count: {yes(skip0 == keys0[i:n])} (0 workers), "
        f"{yes(skipw == keysw[i:n])} ({workers} workers); from a {workers}-worker run resumed with 0: "
        f"{yes(skip0 == keysw[i:n])}; epoch 2 differs from epoch 1: {yes(keys0[:n] != keys0[n:])} "
        f"(0 workers), {yes(keysw[:n] != keysw[n:])} ({workers} workers); unseeded default "
        f"reproducible: {yes(unseeded[0] == unseeded[1])}; first decoded sample after skipping i: "
        f"{skip_caller * 1000:.0f} ms (0 workers: i samples read, not decoded), "
        f"{skip_workers * 1000:.0f} ms ({workers} workers: i samples read, decoded and sent back)"
    )


def main() -> None:
    """Generate shards, time each reader and worker setting (interleaved), check resuming."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="60 samples of 256-512 px, 12 a shard, buffer 16"
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--min-side", type=int, default=448)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--shard-samples", type=int, default=25)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--worker-type", choices=("thread", "process"), default="thread")
    parser.add_argument("--shuffle-buffer", type=int, default=None, help="default 64 (--quick: 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-webdataset", action="store_true", help="ShardReader only")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.min_side, args.max_side, args.shard_samples = 60, 256, 512, 12
    if args.shuffle_buffer is None:
        args.shuffle_buffer = 16 if args.quick else 64
    shards = -(-args.samples // args.shard_samples)
    if max(args.workers) > shards:
        parser.error(
            f"{shards} shards for {max(args.workers)} workers: webdataset gives each worker whole shards"
        )
    use_wds = not args.no_webdataset
    if use_wds:
        try:
            import webdataset  # noqa: F401
        except ImportError:
            print("webdataset is not installed (pip install webdataset): ShardReader only")
            use_wds = False

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        n, nbytes = make_shards(
            folder, args.samples, args.min_side, args.max_side, args.seed, args.shard_samples
        )
        for path in folder.glob("*.tar"):
            path.read_bytes()  # into the page cache before any timed pass
        print(
            f"shards: {n} samples in {shards} shards, one JPEG each ({args.min_side}-{args.max_side} px, "
            f"mean {nbytes / n / 1024:.0f} KB), written in {time.perf_counter() - t:.1f} s; shuffle "
            f"buffer {args.shuffle_buffer}; cpus: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}"
        )
        settings = [("ShardReader", w) for w in args.workers]
        settings += [("webdataset", w) for w in args.workers] if use_wds else []
        runs: dict[tuple[str, int], list[Pass]] = {s: [] for s in settings}
        for _ in range(args.repeats):
            for kind, workers in settings:
                if kind == "ShardReader":
                    runs[kind, workers].append(
                        reader_pass(folder, workers, args.worker_type, args.shuffle_buffer)
                    )
                else:
                    runs[kind, workers].append(wds_pass(folder, workers, args.shuffle_buffer))
        for (kind, workers), results in runs.items():
            rates = [r.samples / r.seconds for r in results]
            rate = statistics.median(rates)
            first = results[0]  # the same samples in every pass
            cpu_ms = statistics.median(r.cpu / (r.samples + 1) for r in results) * 1000
            startup_ms = statistics.median(r.startup for r in results) * 1000
            print(
                f"{kind:<11} workers={workers} ({worker_label(kind, workers, args.worker_type):>13}): "
                f"{rate:6.1f} samples/s (median; runs {' '.join(f'{r:.1f}' for r in rates)})  "
                f"{rate * first.images / first.samples:6.1f} images/s  {rate * nbytes / n / 2**20:5.1f} MB/s "
                f"encoded  CPU {cpu_ms:5.1f} ms/sample  start-up {startup_ms:4.0f} ms"
            )
        if use_wds:
            check_resume(folder, max(max(args.workers), 1), args.shuffle_buffer, n)


if __name__ == "__main__":
    main()

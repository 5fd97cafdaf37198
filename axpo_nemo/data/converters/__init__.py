"""Converters from public dataset formats to `Sample` shards (``axpo data convert``).

Each format is one module with a ``convert_row(row, ctx) -> Sample | None`` and a docstring
mapping its fields; `CONVERTERS` registers them. `convert` drives a conversion: it reads the
rows (`common.read_rows`), converts each, and writes shards or JSONL. A row that cannot be
converted is reported with its row number (from 0), logged to ``bad_rows.jsonl`` in the output
folder and skipped: the conversion never stops midway. ``convert_report.json`` holds the counts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.data.converters import fvqa, mmfinereason, pyvision_rl, virl39k
from axpo_nemo.data.converters.common import BadRow, ConvertConfig, RowContext, read_rows
from axpo_nemo.data.shards import SampleSink
from axpo_nemo.run.atomic import atomic_output_dir

__all__ = ["CONVERTERS", "BadRow", "ConvertConfig", "ConvertReport", "convert"]

logger = logging.getLogger(__name__)

RowConverter = Callable[[dict[str, Any], RowContext], Sample | None]

#: Format name -> row converter.
CONVERTERS: dict[str, RowConverter] = {
    "virl39k": virl39k.convert_row,
    "fvqa": fvqa.convert_row,
    "pyvision_rl": pyvision_rl.convert_row,
    "mmfinereason": mmfinereason.convert_row,
}
#: Bad rows quoted in the report (all of them go to bad_rows.jsonl).
MAX_REPORTED = 20


@dataclass
class ConvertReport:
    """What a conversion did.

    Attributes:
        format / input / output: what was converted where.
        rows: rows read.
        written: samples written.
        filtered: rows left out on purpose (``max_pass_rate``).
        bad: rows skipped because they could not be converted.
        bad_examples: the first few bad rows as ``{"row": n, "error": text}``.
        images: images written.
        elapsed_s: wall time.
    """

    format: str
    input: str
    output: str
    rows: int = 0
    written: int = 0
    filtered: int = 0
    bad: int = 0
    bad_examples: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        """One line of counts."""
        return (
            f"{self.format}: {self.rows} rows -> {self.written} samples ({self.images} images), "
            f"{self.filtered} filtered, {self.bad} bad rows skipped, in {self.elapsed_s:.1f} s"
        )


def convert(
    fmt: str,
    input_path: str | Path,
    out: str | Path,
    cfg: ConvertConfig | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ConvertReport:
    """Convert a public dataset file into shards (or JSONL) in the folder ``out``.

    Bad rows are not logged one by one: they are in the report and ``bad_rows.jsonl``.

    Args:
        fmt: one of `CONVERTERS`.
        input_path: the dataset file (.parquet, .json or .jsonl).
        out: output folder.
        cfg: conversion settings.
        overwrite: replace an existing output.
        progress: called with the number of rows read so far after each row.

    Returns:
        The report (also written to ``out/convert_report.json``). ``out`` appears only when the
        whole input was read (`atomic_output_dir`; a failure keeps the partial output in
        ``<out>.incomplete``).
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(CONVERTERS)}")
    cfg = cfg or ConvertConfig()
    input_path = Path(input_path)
    if not input_path.is_file():  # before anything is written
        raise FileNotFoundError(f"{input_path}: no such file")
    out = Path(out)
    ctx = RowContext(cfg, Path(cfg.image_root) if cfg.image_root else input_path.parent)
    report = ConvertReport(fmt, str(input_path), str(out))
    seen: set[str] = set()
    start = time.perf_counter()
    converter = CONVERTERS[fmt]
    with (
        atomic_output_dir(out, overwrite, keep_failed=True) as tmp,
        SampleSink(tmp, cfg.output, cfg.shard, overwrite=True) as sink,
        (tmp / "bad_rows.jsonl").open("w", encoding="utf-8") as bad_log,
    ):
        for number, row in read_rows(input_path):
            if cfg.limit is not None and report.rows >= cfg.limit:
                break
            report.rows += 1
            if progress is not None:
                progress(report.rows)
            ctx.row = number
            try:
                if isinstance(row, Exception):
                    raise row
                if not isinstance(row, dict):
                    raise BadRow(f"a row must be an object, got {type(row).__name__}")
                sample = converter(row, ctx)
                if sample is None:
                    report.filtered += 1
                    continue
                if sample.id in seen:
                    raise BadRow(f"duplicate id {sample.id}")
                sink.write(sample)
            except Exception as exc:  # a bad row, whatever its kind, never stops the conversion
                report.bad += 1
                entry = {"row": number, "error": f"{type(exc).__name__}: {exc}"}
                bad_log.write(json.dumps(entry, ensure_ascii=False) + "\n")
                if len(report.bad_examples) < MAX_REPORTED:
                    report.bad_examples.append(entry)
                logger.debug("%s row %d: skipped (%s)", input_path, number, entry["error"])
                continue
            seen.add(sample.id)
            report.written += 1
            report.images += len(sample.image_data)
        report.elapsed_s = time.perf_counter() - start
        (tmp / "convert_report.json").write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    if report.bad:
        logger.info("%s: %d bad rows skipped (listed in %s)", input_path, report.bad, out / "bad_rows.jsonl")
    return report

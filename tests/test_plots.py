"""Run tables, plots and comparisons over metrics.jsonl records."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from axpo_nemo.local.plots import (
    SUMMARY_METRICS,
    compare_runs,
    plot_mean_band,
    plot_run,
    rolling_mean,
    run_label,
    series,
    summarize,
    summary_markdown,
    summary_table,
)
from axpo_nemo.run.metrics_log import MetricsLogger


def _records(n: int, axpo: bool = True, offset: float = 0.0) -> list[dict]:
    recs = []
    for s in range(1, n + 1):
        rec = {
            "step": s,
            "phase": "rl",
            "time": float(s),
            "accuracy": offset + s / n / 2,
            "accuracy_tool": offset + s / n / 3,
            "accuracy_no_tool": offset + s / n / 4,
            "tool_use_rate": 0.2 + s / n / 2,
            "tool_subgroup_all_wrong_rate": 0.5 - s / n / 4,
            "mean_turns": 1.0 + s / n,
            "mean_response_tokens": 300.0 + s,
            "resample_recovery_rate": (0.5 if s % 3 else math.nan) if axpo else math.nan,
            "extra_rollout_fraction": 0.25 if axpo else 0.0,
        }
        recs.append(rec)
    return recs


def _check_png(path, expected_size=None):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        if expected_size:
            assert im.size == expected_size
        lo, hi = im.convert("L").getextrema()
        assert lo < hi  # something was drawn


def _write_run(path, records, algorithm=None):
    with MetricsLogger(path) as log:
        for r in records:
            log.log(r["step"], {k: v for k, v in r.items() if k not in ("step", "phase", "time")})
    if algorithm:
        (path / "config.yaml").write_text(f"algorithm: {algorithm}\nseed: 0\n")
    return path


def test_series_sorts_dedups_and_fills_nan():
    recs = [
        {"step": 2, "phase": "rl", "accuracy": 0.2},
        {"step": 1, "phase": "rl", "accuracy": 0.1},
        {"step": 2, "phase": "rl", "accuracy": 0.25},  # re-logged after a resume: last wins
        {"step": 3, "phase": "rl"},
        {"step": 3, "phase": "eval", "accuracy": 0.9},
    ]
    steps, values = series(recs, "accuracy")
    assert steps.tolist() == [1, 2, 3]
    assert values[:2].tolist() == [0.1, 0.25] and math.isnan(values[2])
    assert series(recs, "accuracy", "eval")[1].tolist() == [0.9]


def test_rolling_mean_ignores_nan():
    out = rolling_mean(np.array([1.0, np.nan, 3.0, 5.0, np.nan]), 2)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 3.0 and out[3] == 4.0 and out[4] == 5.0
    assert np.isnan(rolling_mean(np.array([np.nan, np.nan]), 3)).all()


def test_summary_table_and_markdown_contents():
    recs = _records(5, axpo=False)
    rows = {r["metric"]: r for r in summarize(recs)}
    assert list(rows) == list(SUMMARY_METRICS)
    assert rows["accuracy"]["start"] == pytest.approx(0.1) and rows["accuracy"]["end"] == pytest.approx(0.5)
    assert rows["accuracy"]["change"] == pytest.approx(0.4)
    assert math.isnan(rows["resample_recovery_rate"]["end"])

    table = summary_table(recs)
    assert [c.header for c in table.columns] == ["metric", "start", "end", "change"]
    cells = {row: [c._cells[i] for c in table.columns[1:]] for i, row in enumerate(table.columns[0]._cells)}
    assert cells["accuracy"] == ["0.100", "0.500", "+0.400"]
    assert cells["tool_subgroup_all_wrong_rate"] == ["0.450", "0.250", "-0.200"]
    assert cells["mean_response_tokens"] == ["301.0", "305.0", "+4.0"]
    assert cells["resample_recovery_rate"] == ["n/a", "n/a", "n/a"]
    out = io.StringIO()
    Console(file=out, width=120).print(table)
    assert "tool_use_rate" in out.getvalue() and "5 steps" in out.getvalue()

    md = summary_markdown(recs)
    assert md.startswith("| metric | start | end | change |")
    assert "| accuracy | 0.100 | 0.500 | +0.400 |" in md
    assert "| resample_recovery_rate | n/a | n/a | n/a |" in md


def test_summary_uses_windows_on_long_runs():
    rows = {r["metric"]: r for r in summarize(_records(200))}
    assert rows["accuracy"]["window"] == 10
    assert rows["accuracy"]["start"] == pytest.approx(np.mean(np.arange(1, 11) / 400))


@pytest.mark.parametrize("n", [4, 120])
def test_plot_run_writes_pngs(tmp_path, n):
    recs = [*_records(n), {"step": n, "phase": "eval", "time": 0.0, "accuracy": 0.6}]
    paths = plot_run(recs, tmp_path / "plots")
    assert [p.name for p in paths] == ["curves.png", "resampling.png"]
    _check_png(paths[0], (1260, 340))
    _check_png(paths[1], (840, 340))


def test_plot_run_without_resampling_metrics_skips_that_figure(tmp_path):
    recs = [
        {k: v for k, v in r.items() if k not in ("resample_recovery_rate", "extra_rollout_fraction")}
        for r in _records(10)
    ]
    assert [p.name for p in plot_run(recs, tmp_path)] == ["curves.png"]


def test_compare_two_runs_of_different_lengths_with_nan(tmp_path):
    grpo = _write_run(tmp_path / "runs" / "seed0", _records(8, axpo=False), algorithm="grpo")
    axpo = _write_run(tmp_path / "axpo_run", _records(40, axpo=True, offset=0.1), algorithm="axpo")
    # GRPO logged nothing for the resampling rate: a metric missing from every record of a run.
    paths, md = compare_runs([grpo, axpo], tmp_path / "cmp")
    names = [p.name for p in paths]
    assert names == [f"compare_{m}.png" for m in SUMMARY_METRICS]
    for p in paths:
        _check_png(p, (640, 400))
    lines = md.strip().splitlines()
    assert lines[0].startswith("| run | steps | accuracy |")
    assert lines[2].startswith("| seed0 (grpo) | 8 | 0.500 |")
    assert lines[3].startswith("| axpo_run | 40 | 0.5") and "n/a" not in lines[3]
    grpo_cells = lines[2].strip("| ").split(" | ")
    assert grpo_cells[2 + SUMMARY_METRICS.index("resample_recovery_rate")] == "n/a"
    assert grpo_cells[2 + SUMMARY_METRICS.index("extra_rollout_fraction")] == "0.000"

    only_axpo = compare_runs([grpo], tmp_path / "cmp2", metrics=("resample_recovery_rate", "accuracy"))[0]
    assert [p.name for p in only_axpo] == ["compare_accuracy.png"]  # nothing to draw: no file
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        compare_runs([tmp_path / "nothing"], tmp_path / "cmp3")


def test_run_labels_are_unique_and_name_the_algorithm(tmp_path):
    a = _write_run(tmp_path / "a" / "seed0", _records(3), algorithm="axpo")
    b = _write_run(tmp_path / "b" / "seed0", _records(3), algorithm="axpo")
    assert run_label(a) == "seed0 (axpo)"
    _, md = compare_runs([a, b], tmp_path / "cmp", metrics=("accuracy",))
    assert "| a/seed0 (axpo) | 3 |" in md and "| b/seed0 (axpo) | 3 |" in md


def test_plot_mean_band_over_seeds_of_different_lengths(tmp_path):
    runs = {
        "GRPO": [_records(30, axpo=False), _records(25, axpo=False, offset=0.05), _records(30, offset=0.1)],
        "AXPO": [_records(30, offset=0.2)],
        "none": [[{"step": 1, "phase": "rl"}]],
    }
    out = plot_mean_band(runs, "accuracy", tmp_path / "band" / "accuracy.png")
    assert out == tmp_path / "band" / "accuracy.png"
    _check_png(out, (640, 400))
    out2 = plot_mean_band(runs, "resample_recovery_rate", tmp_path / "band" / "rr.png", smooth=1)
    _check_png(out2, (640, 400))

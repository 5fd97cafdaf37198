"""tools/exp_tool_collapse.py: aggregation over fake runs, run planning, reuse of finished runs, --help.

No training runs here: run folders are faked (metrics.jsonl, an RL checkpoint marker, an eval report).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "exp_tool_collapse.py"


@pytest.fixture(scope="module")
def exp():
    try:
        yield load_script(SCRIPT)
    finally:
        sys.modules.pop(SCRIPT.stem, None)


def _tool_rate(algo: str, seed: int, step: int) -> float:
    # AXPO keeps tool use up, GRPO lets it fall; seeds shift the level.
    return (0.5 + 0.01 * step if algo == "axpo" else 0.5 - 0.05 * step) + 0.1 * seed


def _write_run(run_dir: Path, algo: str, seed: int, steps: int = 8, *, eval_in_metrics: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "phase": "sft", "time": float(s), "loss": 1.0}) for s in (1, 2)]
    for s in range(1, steps + 1):
        rec = {
            "step": s,
            "phase": "rl",
            # 2 s per step; one run was stopped for 600 s after step 3 and resumed
            "time": 100.0 + 2.0 * s + seed + (600.0 if (algo, seed, s > 3) == ("grpo", 1, True) else 0.0),
            "tool_use_rate": _tool_rate(algo, seed, s),
            "tool_subgroup_all_wrong_rate": 0.4 if algo == "axpo" else 0.6 + 0.01 * s,
            # GRPO never resamples (null = NaN); AXPO misses step 1 (nothing selected).
            "resample_recovery_rate": (None if s == 1 else 0.5 + 0.1 * seed) if algo == "axpo" else None,
            "accuracy": 0.1 * s / steps + 0.05 * seed,
        }
        lines.append(json.dumps(rec))
    eval_rec = {
        "pass@1": 0.3 + 0.1 * seed,
        "pass@4": 0.6 + 0.1 * seed,
        "tool_use_rate": 0.25,
        "accuracy": 0.3,
    }
    if eval_in_metrics:
        lines.append(json.dumps({"step": steps, "phase": "eval", "time": 200.0, **eval_rec}))
    else:
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / "report.json").write_text(json.dumps({"ks": [1, 4], "overall": eval_rec}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _fake_runs(exp, tmp_path: Path):
    runs = []
    for seed in (0, 1):
        for algo, label in (("grpo", "GRPO"), ("axpo", "AXPO")):
            d = tmp_path / f"seed{seed}" / algo
            # One run reports its eval only in eval/report.json; one takes its time from exp_timing.json.
            _write_run(d, algo, seed, eval_in_metrics=not (algo == "grpo" and seed == 1))
            seconds = 10.0 + seed
            if algo == "axpo" and seed == 1:
                (d / exp.TIMING_FILE).write_text(json.dumps({"seconds": 13.0, "invocations": 2}))
                seconds = math.nan
            runs.append(exp.RunInfo(label, seed, d, seconds))
    return runs


def test_aggregate_tables_and_plots(exp, tmp_path):
    runs = _fake_runs(exp, tmp_path / "runs")
    out = tmp_path / "out"
    agg = exp.aggregate(runs, out, window=2, sft_seconds={0: 5.0, 1: 7.0})
    v = agg.values
    assert agg.window == 2 and list(v) == ["GRPO", "AXPO"]

    # first-2 / last-2 averages per seed, then across seeds.
    axpo_first = [(_tool_rate("axpo", s, 1) + _tool_rate("axpo", s, 2)) / 2 for s in (0, 1)]
    assert v["AXPO"]["tool_use_rate first-2"] == pytest.approx(axpo_first)
    grpo_last = [(_tool_rate("grpo", s, 7) + _tool_rate("grpo", s, 8)) / 2 for s in (0, 1)]
    assert v["GRPO"]["tool_use_rate last-2"] == pytest.approx(grpo_last)
    mean, std, n = exp.mean_std(v["AXPO"]["tool_use_rate first-2"])
    assert n == 2 and mean == pytest.approx(sum(axpo_first) / 2) and std == pytest.approx(0.1 / math.sqrt(2))
    # NaN steps are skipped inside a window; GRPO has no resampling at all.
    assert v["AXPO"]["resample_recovery_rate first-2"] == pytest.approx([0.5, 0.6])
    assert all(math.isnan(x) for x in v["GRPO"]["resample_recovery_rate last-2"])
    # Eval from the metrics' eval record, or from eval/report.json; Pass@k keys are discovered.
    assert v["GRPO"]["eval pass@1"] == pytest.approx([0.3, 0.4])
    assert v["AXPO"]["eval pass@4"] == pytest.approx([0.6, 0.7])
    assert v["AXPO"]["eval tool_use_rate"] == pytest.approx([0.25, 0.25])
    # Wall time from RunInfo.seconds or exp_timing.json; seconds per RL step from record times
    # (the median gap: seed 1's pause of a stopped and resumed run is not spread over its steps).
    assert v["AXPO"]["wall time per run (s)"] == pytest.approx([10.0, 13.0])
    assert v["GRPO"]["seconds per RL step"] == pytest.approx([2.0, 2.0])
    assert v["GRPO"]["RL steps"] == [8.0, 8.0]

    md = agg.results_md.read_text()
    assert md == agg.markdown
    assert "| metric | GRPO | AXPO |" in md
    row = next(line for line in md.splitlines() if line.startswith("| resample_recovery_rate first-2 |"))
    assert row.split("|")[2].strip() == "n/a" and "±" in row.split("|")[3]
    assert "| eval pass@1 |" in md and "| eval pass@4 |" in md and "| wall time per run (s) |" in md
    assert "Shared SFT per seed: 6.0 ± 1.4" in md
    assert md.count("\n| GRPO | ") == 2 and md.count("\n| AXPO | ") == 2  # the per-run table

    summary = json.loads(agg.results_json.read_text())
    assert summary["window"] == 2
    assert summary["summary"]["AXPO"]["eval pass@1"]["mean"] == pytest.approx(0.35)
    assert summary["summary"]["GRPO"]["resample_recovery_rate last-2"]["mean"] is None

    with open(agg.curves_csv) as f:
        rows = list(csv.DictReader(f))
    tool = [r for r in rows if r["algorithm"] == "AXPO" and r["metric"] == "tool_use_rate"]
    assert [int(r["step"]) for r in tool] == list(range(1, 9))
    assert float(tool[0]["mean"]) == pytest.approx((_tool_rate("axpo", 0, 1) + _tool_rate("axpo", 1, 1)) / 2)
    assert float(tool[0]["std"]) == pytest.approx(0.1 / math.sqrt(2)) and tool[0]["seeds"] == "2"
    grpo_rec = [r for r in rows if r["algorithm"] == "GRPO" and r["metric"] == "resample_recovery_rate"]
    assert all(r["mean"] == "" and r["seeds"] == "0" for r in grpo_rec)

    names = sorted(p.name for p in agg.plots)
    assert names == sorted([*(f"{m}.png" for m in exp.CURVE_METRICS), "curves.png"])
    assert all(p.is_file() and p.stat().st_size > 1000 for p in agg.plots)

    # AXPO minus GRPO per seed (same SFT model and questions), with a t interval over seeds
    paired = {d["row"]: d for d in summary["paired"]}
    tool = paired["tool_use_rate last-2"]
    expected = [
        sum(_tool_rate("axpo", sd, s) - _tool_rate("grpo", sd, s) for s in (7, 8)) / 2 for sd in (0, 1)
    ]
    assert tool["other"] == "GRPO" and tool["seeds"] == [0, 1] and tool["diffs"] == pytest.approx(expected)
    assert tool["mean"] == pytest.approx(sum(expected) / 2)
    assert paired["eval pass@1"]["diffs"] == pytest.approx([0.0, 0.0])
    assert "| AXPO − GRPO | tool_use_rate last-2 | 2 |" in md


def test_mean_ci95_is_the_t_interval(exp):
    mean, low, high, n = exp.mean_ci95([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3)
    assert high - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, 2) · s / √n
    assert mean - low == pytest.approx(high - mean)
    assert all(math.isnan(x) for x in exp.mean_ci95([5.0])[1:3])
    assert exp.mean_ci95([0.1] * 40)[1] == pytest.approx(0.1)  # no spread, normal quantile past 30 df


def test_ablations_get_a_figure_of_their_own(exp, tmp_path, monkeypatch):
    import axpo_nemo.local.plots as plots

    drawn = {}
    real = plots.plot_mean_bands

    def record(runs_by_label, metrics, out, **kwargs):
        drawn[Path(out).name] = list(runs_by_label)
        return real(runs_by_label, metrics, out, **kwargs)

    monkeypatch.setattr(plots, "plot_mean_bands", record)
    runs = _fake_runs(exp, tmp_path / "runs")
    label = exp.ABLATIONS["no_prefix_credit"][0]
    _write_run(tmp_path / "runs" / "seed0" / "no_prefix_credit", "axpo", 0)
    runs.append(exp.RunInfo(label, 0, tmp_path / "runs" / "seed0" / "no_prefix_credit", 9.0))
    assert exp.figures(runs) == {"curves.png": ["GRPO", "AXPO"], "ablations.png": ["AXPO", label]}
    assert exp.figures(runs[:-1]) == {"curves.png": ["GRPO", "AXPO"]}
    agg = exp.aggregate(runs, tmp_path / "out", window=2, figures=exp.figures(runs))
    names = sorted(p.name for p in agg.plots)
    assert names == sorted([*(f"{m}.png" for m in exp.CURVE_METRICS), "curves.png", "ablations.png"])
    assert drawn == {"curves.png": ["GRPO", "AXPO"], "ablations.png": ["AXPO", label]}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in agg.plots)


def test_aggregate_default_window_and_one_seed(exp, tmp_path):
    _write_run(tmp_path / "a", "axpo", 0, steps=20)
    _write_run(tmp_path / "g", "grpo", 0, steps=12)
    agg = exp.aggregate(
        [exp.RunInfo("AXPO", 0, tmp_path / "a", 1.0), exp.RunInfo("GRPO", 0, tmp_path / "g", 2.0)],
        tmp_path / "out",
    )
    assert agg.window == exp.default_window(12) == 3
    assert (
        "±" not in agg.markdown.split("## Runs")[0].split("| RL steps |")[1].splitlines()[0]
    )  # one seed: no std
    with pytest.raises(ValueError):
        exp.aggregate([], tmp_path / "out")


def test_budget_matched_and_plan(exp, tmp_path):
    assert exp.budget_matched_group_size(8, 0.25) == 10
    assert exp.budget_matched_group_size(4, 0.25) == 5
    assert exp.budget_matched_group_size(8, 0.0) == 8
    args = exp._parse_args(
        ["--seeds", "3", "--steps", "5", "--out", str(tmp_path), "--budget-matched", "axpo.k=2"]
    )
    specs = exp.plan(args, ["axpo.k=2", "rl.steps=5"], 10)
    assert [(s.key, s.seed) for s in specs] == [("sft", 3), ("grpo", 3), ("axpo", 3), ("grpo_bm", 3)]
    sft, grpo, axpo, bm = specs
    assert sft.run_dir == tmp_path.resolve() / "seed3" / "sft"
    assert "train.stages=[data,sft]" in sft.overrides and "seed=3" in sft.overrides
    data_dir = f"data.dir='{sft.run_dir / 'data'}'"
    for spec, algo in ((grpo, "grpo"), (axpo, "axpo"), (bm, "grpo")):
        assert spec.overrides[:2] == ["axpo.k=2", "rl.steps=5"]  # user overrides first
        assert f"algorithm={algo}" in spec.overrides and data_dir in spec.overrides
        assert "train.stages=[sft,rl,eval,plots]" in spec.overrides
    assert "rollout.group_size=10" in bm.overrides and bm.label == "GRPO-BM (N=10)"

    # The planned overrides are valid config (quoted paths stay strings).
    from axpo_nemo.config import load_config

    cfg = load_config("demo", bm.overrides)
    assert cfg.algorithm == "grpo" and cfg.rollout.group_size == 10 and cfg.seed == 3 and cfg.rl.steps == 5

    # --ablations: each DESIGN ablation is AXPO with one switch flipped, on the first two seeds
    abl_args = exp._parse_args(["--seeds", "3", "4", "5", "--out", str(tmp_path), "--ablations"])
    abl_specs = exp.plan(abl_args, [], None)
    ablations = [(s.key, s.seed) for s in abl_specs if s.key in exp.ABLATIONS]
    assert ablations == [(k, seed) for seed in (3, 4) for k in exp.ABLATIONS]
    for spec in (s for s in abl_specs if s.key in exp.ABLATIONS):
        acfg = load_config("demo", spec.overrides)
        flipped = {
            "no_prefix_fixing": not acfg.axpo.prefix_fixing,
            "no_prefix_credit": not acfg.axpo.prefix_credit,
            "joint_groups": not acfg.axpo.separate_groups,
            "random_selection": acfg.axpo.selection == "random",
        }
        assert acfg.algorithm == "axpo" and [k for k, v in flipped.items() if v] == [spec.key]
    with pytest.raises(SystemExit):
        exp._parse_args(["--seeds", "1", "--ablations", "--ablation-seeds", "2"])
    assert cfg.data.dir == str(sft.run_dir / "data") and cfg.output_dir == str(bm.run_dir)
    assert cfg.train.stages == ["sft", "rl", "eval", "plots"] and cfg.data.synth.seed == 3


def test_reserved_overrides_and_quick_defaults(exp, capsys):
    with pytest.raises(SystemExit) as exc:
        exp._parse_args(["seed=3"])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp._parse_args(["++data.dir=/x"])
    args = exp._parse_args(["--quick"])
    assert args.seeds == [0, 1] and args.steps == exp.QUICK_STEPS
    assert exp._parse_args([]).seeds == [0, 1, 2] and exp._parse_args([]).steps is None


def test_link_sft_model(exp, tmp_path):
    src = tmp_path / "sft" / "final.pt"
    src.parent.mkdir()
    src.write_bytes(b"weights")
    run = tmp_path / "run"
    assert exp.link_sft_model(src, run) in ("linked", "copied")
    assert (run / "sft" / "final.pt").read_bytes() == b"weights"
    assert exp.link_sft_model(src, run) == "present"
    other = tmp_path / "other.pt"
    other.write_bytes(b"other weights")
    with pytest.raises(RuntimeError, match="delete"):
        exp.link_sft_model(other, run)


def test_config_changes(exp, tmp_path):
    from omegaconf import OmegaConf

    from axpo_nemo.config import load_config_tree

    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(load_config_tree("demo", ["rl.steps=5"])))
    assert exp.config_changes(tmp_path, load_config_tree("demo", ["rl.steps=5"])) == []
    tree = load_config_tree("demo", ["rl.steps=7", "sft.epochs=2"])
    assert exp.config_changes(tmp_path, tree) == ["rl.steps", "sft.epochs"]
    assert exp.config_changes(tmp_path, tree, exp.SFT_IRRELEVANT) == ["sft.epochs"]
    assert exp.config_changes(tmp_path / "missing", tree) == []


def _fake_finished(exp, out: Path, seeds, steps: int) -> None:
    import torch

    from axpo_nemo.run.checkpoint import CheckpointManager

    for seed in seeds:
        sft = out / f"seed{seed}" / "sft"
        (sft / "sft").mkdir(parents=True)
        (sft / "sft" / "final.pt").write_bytes(b"sft model %d" % seed)
        (sft / "data").mkdir()
        (sft / "data" / "manifest.json").write_text("{}")
        (sft / exp.TIMING_FILE).write_text(json.dumps({"seconds": 4.0, "invocations": 1}))
        for algo in exp.ALGORITHMS:
            run = out / f"seed{seed}" / algo
            _write_run(run, algo, seed, steps=steps)
            CheckpointManager(run / "rl" / "checkpoints").save(steps, {"x": torch.zeros(1)})
            (run / "eval").mkdir(exist_ok=True)
            (run / "eval" / "report.json").write_text("{}")
            (run / exp.TIMING_FILE).write_text(json.dumps({"seconds": 9.0, "invocations": 1}))


def test_main_reuses_finished_runs(exp, tmp_path, capsys):
    out = tmp_path / "exp"
    _fake_finished(exp, out, (0, 1), steps=4)
    assert exp.rl_done(out / "seed0" / "axpo", 4) and not exp.rl_done(out / "seed0" / "axpo", 5)
    rc = exp.main(["--seeds", "0", "1", "--steps", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert text.count(": reused") == 6 and "[rl]" not in text and "[sft]" not in text
    assert (out / "seed1" / "grpo" / "sft" / "final.pt").read_bytes() == b"sft model 1"
    md = (out / "results.md").read_text()
    assert "| seeds | 0 1 | 0 1 |" in md and "Shared SFT per seed: 4.0 ± 0.0 s" in md
    assert (out / "plots" / "tool_use_rate.png").is_file()
    # --aggregate-only with a missing seed: tables of what exists, non-zero exit.
    rc = exp.main(["--seeds", "0", "1", "2", "--steps", "4", "--out", str(out), "--aggregate-only"])
    assert rc == 1 and "skipped" in capsys.readouterr().out
    # Runs short of the requested steps are tabled as they are ("partial"), exit 1.
    rc = exp.main(["--seeds", "0", "--steps", "6", "--out", str(out), "--aggregate-only"])
    text = capsys.readouterr().out
    assert rc == 1 and "partial: seed 0 AXPO" in text and "unfinished: 4/6 RL steps" in text
    assert "| RL steps | 4 | 4 |" in (out / "results.md").read_text()


def test_help_smoke():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--seeds", "--steps", "--out", "--config", "--quick", "--budget-matched"):
        assert flag in proc.stdout

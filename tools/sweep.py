"""Submit a grid of config overrides as SLURM jobs: one job per grid point, or one job array.

Usage::

    python tools/sweep.py slurm/axpo_8b.sh --grid axpo.r=0.25,0.5 rollout.group_size=4,8,16 --dry-run
    python tools/sweep.py slurm/axpo_8b.sh --name r_vs_n --grid axpo.r=0.25,0.5 rollout.group_size=4,8,16 \\
        --set rl.steps=200 --sbatch=--nodes=2 --sbatch=--account=ACCOUNT
    python tools/sweep.py slurm/cpu_demo.sh --grid seed=0,1,2 --array --max-parallel 2

``--grid KEY=V1,V2,...`` (several) spans the Cartesian product; values are split at top-level
commas, so ``eval.ks=[1,4],[1,8]`` has two values. ``--set KEY=VALUE`` adds an override to every
point; ``--sbatch ARG`` an sbatch option to every submission.

Every point gets a fixed ``output_dir=<runs>/<name>/<point>`` (``<point>`` spells its values,
e.g. ``r-0.25_group_size-4``), so a requeued job resumes in its own folder and
``tools/collect.py <runs>/<name>`` finds the runs. Without ``--dry-run`` the sweep writes
``<runs>/<name>/sweep.json`` (the grid, each point's overrides, folder and job id) before
submitting; ``--dry-run`` prints the ``sbatch`` command lines and writes nothing. Before either,
every point's config is loaded (the script's ``AXPO_CONFIG``) and, on the cluster backend, run
through ``axpo plan``'s layout and memory checks: one failing point and nothing is submitted.

With ``--array`` there is one ``sbatch --array=0-<n-1>`` submission: each task's arguments are
written to ``<runs>/<name>/tasks/<i>.args`` (one per line), which slurm/launch.sh appends to the
job's arguments (``AXPO_ARRAY_ARGS``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class Point:
    """One grid point: its overrides, its folder name and (after submission) its job id."""

    index: int
    overrides: list[str]
    name: str
    output_dir: str
    job_id: str | None = None
    values: dict[str, str] = field(default_factory=dict)


def split_values(text: str) -> list[str]:
    """Split ``'0.25,0.5'`` at commas outside brackets, braces and quotes: ``['0.25', '0.5']``."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    if depth != 0 or quote:
        raise ValueError(f"unbalanced brackets or quotes in {text!r}")
    return out


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``['axpo.r=0.25,0.5', ...]`` → ``[('axpo.r', ['0.25', '0.5']), ...]``; raises ValueError."""
    grid, seen = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        bare = key.lstrip("+")
        if not sep or not bare or not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if bare in seen:
            raise ValueError(f"--grid: key {bare!r} appears twice")
        seen.add(bare)
        vals = split_values(values)
        if any(not v for v in vals):
            raise ValueError(f"--grid {item!r}: empty value")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--grid {item!r}: repeated value")
        grid.append((key, vals))
    return grid


def point_name(pairs: list[tuple[str, str]]) -> str:
    """The folder name of a point: the last component of each key and its value, e.g. ``r-0.25_group_size-4``.

    Only letters, digits and ``._+-`` (other characters become ``_``), so the name is a safe path and
    an override value without quoting (no ``=`` or ``,``, which override parsers treat specially).
    """
    parts = [f"{key.lstrip('+').rsplit('.', 1)[-1]}-{value}" for key, value in pairs]
    return _SAFE.sub("_", "_".join(parts)) or "default"


def build_points(grid: list[tuple[str, list[str]]], fixed: list[str], sweep_dir: str) -> list[Point]:
    """Every grid point in order (the last key varies fastest), with its overrides and folder."""
    points = []
    keys = [k for k, _ in grid]
    for i, combo in enumerate(itertools.product(*(v for _, v in grid))):
        pairs = list(zip(keys, combo, strict=True))
        name = point_name(pairs)
        out = f"{sweep_dir}/{name}"
        overrides = [*fixed, *(f"{k}={v}" for k, v in pairs), f"output_dir={out}"]
        points.append(Point(i, overrides, name, out, values={k.lstrip("+"): v for k, v in pairs}))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError("two grid points map to the same folder name; use keys whose last components differ")
    return points


def sbatch_lines(script: str, sweep: str, points: list[Point], sbatch_args: list[str]) -> list[list[str]]:
    """One ``sbatch`` command per point (separate jobs)."""
    return [
        ["sbatch", "--parsable", f"--job-name={sweep}-{p.index}", *sbatch_args, script, *p.overrides]
        for p in points
    ]


def array_line(
    script: str, sweep: str, n: int, sbatch_args: list[str], max_parallel: int | None
) -> list[str]:
    """The one ``sbatch --array`` command of an array sweep."""
    spec = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    return ["sbatch", "--parsable", f"--job-name={sweep}", f"--array={spec}", *sbatch_args, script]


def _submit(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


_SCRIPT_CONFIG = re.compile(r"AXPO_CONFIG=\$\{AXPO_CONFIG:-([^}]+)\}")


def script_config(script: str) -> str:
    """The config a job script runs: ``$AXPO_CONFIG`` if set, else the script's own default, else
    slurm/launch.sh's (``demo``)."""
    if os.environ.get("AXPO_CONFIG"):
        return os.environ["AXPO_CONFIG"]
    m = _SCRIPT_CONFIG.search(Path(script).read_text(encoding="utf-8", errors="replace"))
    return m.group(1) if m else "demo"


def check_points(config: str, points: list[Point]) -> list[str]:
    """Load every point's config (and, on the cluster backend, run ``axpo plan``'s layout and
    memory checks on it); returns one line per point that would fail, before anything is submitted."""
    from axpo_nemo.config import ConfigError, load_config

    problems = []
    for p in points:
        try:
            cfg = load_config(config, p.overrides)
        except (ConfigError, ValueError) as exc:
            problems.append(f"point {p.name}: {exc}")
            continue
        if cfg.backend != "nemo":
            continue
        from axpo_nemo.nemo.cluster_layout import PlanError
        from axpo_nemo.nemo.cluster_plan import plan

        try:
            report = plan(cfg, config)
        except PlanError as exc:
            problems.append(f"point {p.name}: axpo plan: {exc}")
            continue
        if not report.ok:
            why = report.errors or (report.memory.problems if report.memory is not None else [])
            problems.append(f"point {p.name}: axpo plan fails: {'; '.join(why) or 'does not fit'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Submit a grid of config overrides as SLURM jobs.", epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("script", help="the job script, e.g. slurm/axpo_8b.sh")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="swept keys and values")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point"
    )
    parser.add_argument(
        "--sbatch", action="append", default=[], metavar="ARG", help="sbatch option for every job"
    )
    parser.add_argument("--name", default=None, help="sweep name (default: sweep-<script name>)")
    parser.add_argument("--runs", default="runs", help="folder of the sweep's run folders (default: runs)")
    parser.add_argument(
        "--array", action="store_true", help="submit one job array instead of one job per point"
    )
    parser.add_argument("--max-parallel", type=int, default=None, help="with --array: tasks running at once")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch commands; submit and write nothing"
    )
    args = parser.parse_args(argv)

    try:
        grid = parse_grid(args.grid)
        bad = [s for s in args.set if "=" not in s or s.startswith("=")]
        if bad:
            raise ValueError(f"--set {bad[0]!r}: expected KEY=VALUE")
        if not Path(args.script).is_file():
            raise ValueError(f"job script {args.script} does not exist")
        swept = {k.lstrip("+") for k, _ in grid}
        clash = [s for s in args.set if s.split("=", 1)[0].lstrip("+") in swept | {"output_dir"}]
        if clash:
            raise ValueError(f"--set {clash[0]!r}: that key is swept or set by the sweep")
        name = args.name or f"sweep-{Path(args.script).stem}"
        if not name or _SAFE.sub("", name) != name:
            raise ValueError(f"--name {name!r}: use letters, digits, '.', '_', '-', '+'")
        sweep_dir = f"{args.runs.rstrip('/')}/{name}"
        points = build_points(grid, args.set, sweep_dir)
    except ValueError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    # every point loads and plans before anything is submitted (in a dry run too)
    problems = check_points(script_config(args.script), points)
    if problems:
        for line in problems:
            print(f"sweep: {line}", file=sys.stderr)
        print(f"sweep: {len(problems)} of {len(points)} points would fail; nothing submitted", file=sys.stderr)
        return 2

    if args.array:
        cmd = array_line(args.script, name, len(points), args.sbatch, args.max_parallel)
        commands = [cmd]
    else:
        commands = sbatch_lines(args.script, name, points, args.sbatch)
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        if args.array:
            for p in points:
                print(f"# task {p.index}: {shlex.join(p.overrides)}")
        return 0

    root = Path(sweep_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": name,
        "script": args.script,
        "grid": [{"key": k, "values": v} for k, v in grid],
        "set": args.set,
        "array": args.array,
        "points": [],
    }
    manifest_path = root / "sweep.json"

    def write_manifest() -> None:
        manifest["points"] = [
            {"index": p.index, "name": p.name, "values": p.values, "overrides": p.overrides,
             "output_dir": p.output_dir, "job_id": p.job_id}
            for p in points
        ]  # fmt: skip
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

    write_manifest()
    try:
        if args.array:
            tasks = root / "tasks"
            tasks.mkdir(exist_ok=True)
            for p in points:
                (tasks / f"{p.index}.args").write_text("".join(f"{o}\n" for o in p.overrides))
            env = {**os.environ, "AXPO_ARRAY_ARGS": str(tasks.resolve())}
            job = _submit(commands[0], env)
            for p in points:
                p.job_id = f"{job}_{p.index}"
            print(f"submitted job array {job} ({len(points)} tasks): {shlex.join(commands[0])}")
        else:
            for p, cmd in zip(points, commands, strict=True):
                p.job_id = _submit(cmd)
                print(f"submitted {p.job_id}: {p.name}")
    except (RuntimeError, OSError) as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 1
    finally:
        write_manifest()
    print(f"sweep manifest: {manifest_path}; collect with: python tools/collect.py {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

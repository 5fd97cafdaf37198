"""Per-step metrics: an always-on JSONL log, optional TensorBoard and W&B, and console progress.

``<run_dir>/metrics.jsonl`` is the record of a run: one JSON object per line,
``{"step": 12, "phase": "rl", "time": 1718000000.0, "accuracy": 0.5, ...}``. Each line is
flushed as it is written, so a killed run loses nothing; NaN and ±inf are written as ``null``
(strict JSON) and read back as NaN by :func:`read_metrics`. ``axpo compare`` and the plots read
these files.

TensorBoard (``<run_dir>/tensorboard/<phase>/``) and Weights & Biases (``<run_dir>/wandb/``,
offline by default) are optional: off unless configured, and a configured one whose package is
missing fails at start-up with the config key and the pip command.

Resume: ``MetricsLogger(..., resume_step=S)`` first drops the lines of the resumed phases with
step > S, so a resumed run's log equals an uninterrupted one's; TensorBoard purges the same
steps. W&B resumes the same run (its id is kept in ``<run_dir>/wandb_run_id``) but keeps the
points it already has: the JSONL is the reference.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from axpo_nemo.config.logs import LoggingConfig

__all__ = [
    "DISPLAY_METRICS",
    "PHASES",
    "LoggingConfig",
    "MetricsLogger",
    "ProgressDisplay",
    "read_metrics",
    "require_backends",
    "truncate_jsonl",
]

logger = logging.getLogger(__name__)

PHASES = ("rl", "sft", "eval")
METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "phase", "time")


def _require(module: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{key} is true but the '{module}' package is not installed: pip install {module} "
            f"(or set {key}=false)"
        ) from exc


def require_backends(cfg: LoggingConfig) -> None:
    """Fail early (ImportError naming the config key and the pip command) if an enabled backend is missing."""
    if cfg.tensorboard:
        _require("tensorboard", "logging.tensorboard")
    if cfg.wandb:
        _require("wandb", "logging.wandb")


def _clean(value: Any) -> Any:
    """A JSON-safe copy of a metric value: tensors/numpy scalars to Python, NaN and ±inf to None."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, str):
        value = value.item()  # 0-d torch tensor or numpy scalar
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_clean(v) for v in value]
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not loggable")


def _phase_set(phase: str | Iterable[str] | None) -> set[str] | None:
    if phase is None:
        return None
    return {phase} if isinstance(phase, str) else set(phase)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def truncate_jsonl(path: str | os.PathLike, step: int, phase: str | Iterable[str] | None = None) -> int:
    """Drop the lines with ``step`` > ``step`` (of ``phase``: a name, several, or None for all).

    Unparseable lines (a partial last line of a killed run) are dropped too. The file is
    rewritten atomically. Returns the number of lines dropped.
    """
    path = Path(path)
    if not path.exists():
        return 0
    phases = _phase_set(phase)
    kept, dropped = [], 0
    for line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            drop = rec["step"] > step and (phases is None or rec.get("phase") in phases)
        except (ValueError, KeyError, TypeError):
            drop = True
        if drop:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write("".join(f"{line}\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def read_metrics(path: str | os.PathLike, phase: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (or of a run folder's ``metrics.jsonl``), in file order.

    ``null`` values read back as NaN. ``phase`` keeps only those phases. Unparseable lines are
    skipped with a WARNING.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    phases = _phase_set(phase)
    out = []
    for i, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            logger.warning("%s:%d: skipping a line that is not JSON", path, i)
            continue
        if phases is not None and rec.get("phase") not in phases:
            continue
        out.append({k: math.nan if v is None else v for k, v in rec.items()})
    return out


class MetricsLogger:
    """Appends step metrics to ``<run_dir>/metrics.jsonl`` and forwards them to enabled backends.

    Args:
        run_dir: the run's output folder (created if missing).
        cfg: which optional backends to use; None: JSONL only.
        resume_step: when resuming, the checkpoint's step: lines of ``resume_phases`` with a
            larger step are dropped first (see :meth:`truncate_after`).
        resume_phases: the phases whose step counter ``resume_step`` belongs to (default: RL
            and eval, which is logged at RL steps; pass ``"sft"`` when resuming SFT).
        run_config: a plain dict of the run's config, stored with the W&B run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        cfg: LoggingConfig | None = None,
        *,
        resume_step: int | None = None,
        resume_phases: str | Iterable[str] = ("rl", "eval"),
        run_config: dict[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.cfg = cfg or LoggingConfig()
        self.path = self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        require_backends(self.cfg)
        # phase -> first step TensorBoard purges when it opens that phase's writer (resume).
        self._purge: dict[str, int] = {}
        self._writers: dict[str, Any] = {}
        if resume_step is not None:
            self._truncate(resume_step, resume_phases)
        self._repair_tail()
        self._file = open(self.path, "a")  # noqa: SIM115 (held open; closed by close())
        self._wandb = self._start_wandb(run_config) if self.cfg.wandb else None

    def _repair_tail(self) -> None:
        # A run killed inside a write can leave a partial last line; appending would glue onto it.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a partial last line (%d bytes)", self.path, len(data) - keep)
        with open(self.path, "r+b") as f:
            f.truncate(keep)

    def _truncate(self, step: int, phase: str | Iterable[str] | None) -> int:
        dropped = truncate_jsonl(self.path, step, phase)
        if dropped:
            logger.info("%s: dropped %d lines after step %d (resumed run)", self.path, dropped, step)
        for p in _phase_set(phase) or PHASES:
            self._purge[p] = step + 1
            writer = self._writers.pop(p, None)
            if writer is not None:
                writer.close()
        return dropped

    def truncate_after(self, step: int, phase: str | Iterable[str] | None = ("rl", "eval")) -> int:
        """Drop logged lines of ``phase`` (None: all) with step > ``step``; returns how many.

        For a resume decided after the logger was opened (same effect as ``resume_step``);
        TensorBoard purges the same steps.
        """
        self._file.close()
        try:
            return self._truncate(step, phase)
        finally:
            self._file = open(self.path, "a")  # noqa: SIM115

    def log(self, step: int, metrics: Mapping[str, Any], phase: str = "rl") -> None:
        """Append one record ``{"step", "phase", "time", **metrics}`` and forward it."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)} (got {phase!r})")
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record itself")
        values = {str(k): _clean(v) for k, v in metrics.items()}
        record = {"step": int(step), "phase": phase, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {
            k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self.cfg.tensorboard:
            writer = self._writer(phase)
            for k, v in scalars.items():
                writer.add_scalar(k, v, int(step))
            writer.flush()
        if self._wandb is not None:
            self._wandb.log({f"{phase}/{k}": v for k, v in scalars.items()} | {f"{phase}/step": int(step)})

    def _writer(self, phase: str) -> Any:
        # One writer per phase: each has its own step axis, and a resume purges only its phase.
        if phase not in self._writers:
            _require("tensorboard", "logging.tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            purge = self._purge.get(phase)
            self._writers[phase] = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard" / phase), purge_step=purge
            )
        return self._writers[phase]

    def _start_wandb(self, run_config: dict[str, Any] | None) -> Any:
        wandb = _require("wandb", "logging.wandb")
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = wandb.init(
            project=self.cfg.wandb_project,
            mode=self.cfg.wandb_mode,
            dir=str(self.run_dir),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            config=run_config,
        )
        if run is not None and getattr(run, "id", None) and run_id is None:
            id_file.write_text(str(run.id))
        for phase in PHASES:
            run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        return run

    def close(self) -> None:
        """Flush and close the JSONL file and the backends (idempotent)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Metrics shown in progress descriptions and console lines, with their short labels.
DISPLAY_METRICS = {
    "loss": "loss",
    "reward": "reward",
    "accuracy": "acc",
    "tool_use_rate": "tool",
    "tool_subgroup_all_wrong_rate": "all_wrong",
}


def _format_metrics(metrics: Mapping[str, Any], keys: Mapping[str, str]) -> str:
    parts = []
    for key, label in keys.items():
        v = metrics.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            parts.append(f"{label} {v:.4g}" if math.isfinite(v) else f"{label} nan")
    return " ".join(parts)


class ProgressDisplay:
    """Console progress: rich bars per phase (SFT, RL, eval) plus rollouts within a step.

    On a terminal it shows live ``rich`` bars whose descriptions carry the key metrics; when the
    output is not a terminal (CI, SLURM logs) it prints one plain line every ``console_every``
    steps (and on a phase's last step) instead. Usage::

        with ProgressDisplay(cfg.logging.console_every) as progress:
            progress.add_phase("rl", total=num_steps, completed=start_step)
            for step in ...:
                progress.start_rollouts(total=b * n)
                ... progress.advance_rollouts(k) ...
                progress.update("rl", step, metrics)

    A phase may count other units than steps (``add_phase("eval", 32, unit="question")``) and may
    have no known total (``total=None``; `finish` then ends it).

    Args:
        console_every: plain mode prints every this many steps.
        file: the stream (default stdout).
        plain: force plain (True) or rich (False) output; None detects a terminal.
        keys: metric name -> short label shown (default :data:`DISPLAY_METRICS`).
        min_interval_s: plain mode prints at most this often (a phase's last line always).
    """

    def __init__(
        self,
        console_every: int = 1,
        *,
        file=None,
        plain: bool | None = None,
        keys: Mapping[str, str] | None = None,
        min_interval_s: float = 0.0,
    ):
        from rich.console import Console

        self.console_every = max(1, console_every)
        self.min_interval_s = min_interval_s
        self.file = file if file is not None else sys.stdout
        self.keys = dict(keys) if keys is not None else DISPLAY_METRICS
        self.console = Console(file=self.file)
        self.plain = (
            (not self.console.is_terminal or self.console.is_dumb_terminal) if plain is None else plain
        )
        self._phases: dict[str, dict[str, Any]] = {}
        self._progress = None
        self._rollouts = None
        if not self.plain:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )

    def __enter__(self) -> ProgressDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        if self._progress is not None:
            self._progress.stop()

    def add_phase(self, phase: str, total: int | None, completed: int = 0, unit: str = "step") -> None:
        """Start a bar for ``phase`` ('sft', 'rl', 'eval') of ``total`` units (None: unknown),
        ``completed`` done."""
        info = {
            "total": total, "start": completed, "t0": time.monotonic(), "task": None, "unit": unit,
            "step": completed, "printed": None, "last": None,
        }  # fmt: skip
        if self._progress is not None:
            info["task"] = self._progress.add_task(phase.upper(), total=total, completed=completed)
        self._phases[phase] = info

    def update(self, phase: str, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Mark ``step`` of ``phase`` done and show its key metrics."""
        if phase not in self._phases:
            self.add_phase(phase, total=step)
        info = self._phases[phase]
        info["step"] = step
        text = _format_metrics(metrics or {}, self.keys)
        if self._progress is not None:
            desc = f"{phase.upper()} {text}".rstrip()
            self._progress.update(info["task"], completed=step, description=desc)
            return
        now = time.monotonic()
        final = info["total"] is not None and step >= info["total"]
        due = step % self.console_every == 0 and (
            info["last"] is None or now - info["last"] >= self.min_interval_s
        )
        if final or due:
            self._plain_line(phase, text)

    def finish(self, phase: str) -> None:
        """End ``phase`` at its current count: the bar completes (an unknown total becomes the
        count); plain mode prints the last count unless it already did."""
        info = self._phases.get(phase)
        if info is None:
            return
        if self._progress is not None:
            self._progress.update(
                info["task"], total=info["step"] if info["total"] is None else info["total"]
            )
        elif info["printed"] != info["step"]:
            self._plain_line(phase, "")

    def _plain_line(self, phase: str, text: str) -> None:
        info = self._phases[phase]
        step, unit = info["step"], info["unit"]
        done = step - info["start"]
        elapsed = time.monotonic() - info["t0"]
        if unit == "step":
            rate = f" | {elapsed / done:.2f}s/step" if done > 0 else ""
        else:
            rate = f" | {elapsed / done:.3g}s/{unit}" if done > 0 else ""
        total = "" if info["total"] is None else f"/{info['total']}"
        line = f"[{phase}] {unit} {step}{total}" + (f" | {text}" if text else "") + rate
        print(line, file=self.file, flush=True)
        info["printed"], info["last"] = step, time.monotonic()

    def start_rollouts(self, total: int) -> None:
        """Show (or reset) the bar of rollouts within the current step; no-op in plain mode."""
        if self._progress is None:
            return
        if self._rollouts is None:
            self._rollouts = self._progress.add_task("  rollouts", total=total)
        else:
            self._progress.reset(self._rollouts, total=total)

    def advance_rollouts(self, n: int = 1) -> None:
        """Count ``n`` finished rollouts of the current step."""
        if self._progress is not None and self._rollouts is not None:
            self._progress.advance(self._rollouts, n)

    def print(self, message: Any) -> None:
        """Print a message or a rich renderable (e.g. a table) above the bars (plain: as text)."""
        if isinstance(message, str):
            # Plain text: no markup parsing ("[rl]" is not a style) and no wrapping of log lines.
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(message)

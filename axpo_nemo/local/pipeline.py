"""`axpo train` on one machine: data → SFT → RL (AXPO or GRPO) → eval → export → plots.

Every stage writes under ``output_dir`` and can be re-entered: SFT and RL continue from their
newest valid checkpoint (``checkpoint.resume``); a finished SFT leaves ``sft/final.pt`` and is
skipped, a finished RL stage is recognised by its newest checkpoint having reached ``rl.steps``,
and the synthetic dataset is reused when its settings are unchanged. SIGTERM or SIGUSR1 finishes
the step in flight, writes a checkpoint and exits with `axpo_nemo.run.stop.EXIT_STOPPED`, so a launcher can requeue
the job and the next run picks up where this one stopped.

Layout of ``output_dir``::

    config.yaml          the resolved config
    train.log            the log
    metrics.jsonl        one line per SFT/RL step and per evaluation
    data/                the synthetic dataset (unless data.dir points elsewhere)
    sft/checkpoints/     SFT checkpoints;  sft/final.pt   the SFT model (the RL reference)
    rl/checkpoints/      RL checkpoints (policy, optimizer, scheduler, RNG, data position, AXPO state)
    eval/                results.jsonl (resumable), report.md, report.json
    export/              a Hugging Face folder (safetensors, config, processor, chat template)
    plots/               curves.png (+ resampling.png for AXPO), summary.md
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.sample import Sample, read_samples
from axpo_nemo.agent.tools.registry import Toolbox
from axpo_nemo.config.schema import Config
from axpo_nemo.data.shards import iter_samples
from axpo_nemo.data.synth import synthesize
from axpo_nemo.eval.passk import evaluate
from axpo_nemo.export.hf import export_hf
from axpo_nemo.local.generator import LocalGenerator
from axpo_nemo.local.plots import plot_run, summary_markdown, summary_table
from axpo_nemo.local.rl import RLTrainer
from axpo_nemo.local.sft import SFTTrainer
from axpo_nemo.models import build_policy
from axpo_nemo.run.checkpoint import CheckpointManager, resolve_resume
from axpo_nemo.run.metrics_log import MetricsLogger, ProgressDisplay, read_metrics
from axpo_nemo.run.resume_settings import SETTINGS_KEY, check_resumed_settings, flat_settings
from axpo_nemo.run.run_folder import save_config
from axpo_nemo.run.stop import GracefulStop
from axpo_nemo.run.toolset import build_command_tools, data_dir

logger = logging.getLogger(__name__)



class Stopped(Exception):
    """A stop signal arrived; the current stage checkpointed and the run should exit."""


@dataclass
class RunResult:
    """What a pipeline run produced (paths are None for stages that did not run)."""

    output_dir: Path
    stopped: bool = False
    paths: dict[str, Path] = field(default_factory=dict)
    eval_summary: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


class Pipeline:
    """Runs the configured stages of one local training run (see the module docstring)."""

    def __init__(self, cfg: Config, console: ProgressDisplay | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.console = console
        self.result = RunResult(self.out)
        self.data_dir = data_dir(cfg)
        self.loop_cfg = AgentLoopConfig.from_rollout_config(
            cfg.rollout, tool_timeout_s=cfg.tools.timeout_s, tool_workers=cfg.tools.workers, seed=cfg.seed
        )

    # -- stages ---------------------------------------------------------------------------------

    def run(self, stop: GracefulStop) -> RunResult:
        """Run every configured stage in order; returns what was produced."""
        t0 = time.monotonic()
        stages = list(self.cfg.train.stages)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(self.out, self.cfg.logging, run_config=dataclasses.asdict(self.cfg))
        try:
            if "data" in stages and self.cfg.data.synthesize:
                self.stage_data()
            if not set(stages) & {"sft", "rl", "eval", "export"}:
                if "plots" in stages:
                    self.stage_plots()
                return self.result
            self.bundle = build_policy(self.cfg.model, seed=self.cfg.seed)
            self.protocol = ChatProtocol(self.bundle.processor)
            with self._tools() as tools:
                self.tools = tools
                if "sft" in stages:
                    self.stage_sft(stop)
                if "rl" in stages:
                    self.stage_rl(stop)
                if "eval" in stages:
                    self.stage_eval()
            if "export" in stages:
                self.result.paths["export"] = export_hf(self.bundle, self.out / "export", overwrite=True)
            if "plots" in stages:
                self.stage_plots()
        except Stopped:
            self.result.stopped = True
        finally:
            self.metrics.close()
        self.result.seconds = time.monotonic() - t0
        return self.result

    def _tools(self) -> Toolbox:
        """Every enabled tool; search reads the data folder's corpus unless a path is set."""
        return build_command_tools(self.cfg)

    def stage_data(self) -> None:
        """Generate the synthetic task, or reuse the folder when its manifest has the same settings."""
        manifest = self.data_dir / "manifest.json"
        wanted = dataclasses.asdict(self.cfg.data.synth)
        if manifest.exists():
            try:
                if json.loads(manifest.read_text())["config"] == wanted:
                    logger.info("data: reusing %s", self.data_dir)
                    self.result.paths["data"] = self.data_dir
                    return
            except (ValueError, KeyError):
                pass
        made = synthesize(self.cfg.data.synth, self.data_dir)
        logger.info("data: wrote %s (%s) in %.1f s", self.data_dir, made.counts, made.elapsed_s)
        self.result.paths["data"] = self.data_dir

    def _samples(self, name: str) -> list[Sample]:
        path = self.data_dir / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist (data.dir={self.data_dir}; enable the data stage?)"
            )
        if path.is_dir():  # a shard folder (`axpo data convert` / `filter-sft` / `prune` output)
            return list(iter_samples(path, decode="bytes"))
        return list(read_samples(path))

    def stage_sft(self, stop: GracefulStop) -> None:
        """Supervised fine-tuning; ends by writing ``sft/final.pt`` (the model RL starts from)."""
        final = self.out / "sft" / "final.pt"
        if final.exists():
            self.bundle.model.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
            logger.info("sft: done earlier; loaded %s", final)
            return
        trainer = SFTTrainer(
            self.bundle, self._samples(self.cfg.data.sft_file), self.data_dir, self.tools, self.protocol,
            self.cfg.sft, self.loop_cfg,
        )  # fmt: skip
        if trainer.skipped:
            logger.warning("sft: skipped samples %s", dict(trainer.skipped))
        manager = self._checkpoints("sft")
        self._resume("sft", trainer, manager)
        self._train_loop("sft", trainer, trainer.total_steps, manager, stop)
        final.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(self.bundle.model.state_dict(), final)
        self.result.paths["sft"] = final

    def stage_rl(self, stop: GracefulStop) -> None:
        """AXPO or GRPO from the SFT model, resuming from the newest RL checkpoint."""
        reference = None
        if self.cfg.loss.kl_coef > 0:
            reference = copy.deepcopy(self.bundle.model).eval().requires_grad_(False)
        trainer = RLTrainer(
            self.bundle, reference, self._samples(self.cfg.data.rl_file), self.data_dir, self.tools,
            self.protocol, LocalGenerator.from_bundle(self.bundle), self.cfg.axpo, self.cfg.advantage,
            self.cfg.loss, self.cfg.rl, self.loop_cfg, self.cfg.reward,
            questions_per_step=self.cfg.rollout.questions_per_step, group_size=self.cfg.rollout.group_size,
            algorithm=self.cfg.algorithm,
        )  # fmt: skip
        manager = self._checkpoints("rl")
        self._resume("rl", trainer, manager)
        self._train_loop("rl", trainer, self.cfg.rl.steps, manager, stop)
        self.result.paths["rl"] = manager.dir

    def _resume(self, stage: str, trainer, manager: CheckpointManager) -> None:
        """Continue ``trainer`` from the stage's checkpoint per ``checkpoint.resume``, or start fresh.

        A resume first checks the checkpoint's settings (`check_resumed_settings`). Either way the
        stage's metric lines after the starting step are dropped, so a rerun never logs a step twice.
        """
        resumed = resolve_resume(self.cfg.checkpoint.resume, manager)
        start = 0
        if resumed is not None:
            start, state = resumed
            check_resumed_settings(
                state.get(SETTINGS_KEY),
                flat_settings(self.cfg),
                stage,
                str(manager.dir / manager.step_dir_name(start)),
            )
            trainer.load_state_dict(state)
            logger.info("%s: resumed from step %d", stage, start)
        self.metrics.truncate_after(start, stage)

    def _checkpoints(self, stage: str) -> CheckpointManager:
        """The stage's checkpoint folder: ``<checkpoint.dir>/<stage>`` or ``<output_dir>/<stage>/checkpoints``."""
        ckpt = self.cfg.checkpoint
        folder = Path(ckpt.dir) / stage if ckpt.dir else self.out / stage / "checkpoints"
        return CheckpointManager(folder, ckpt.keep_last)

    def _train_loop(
        self, phase: str, trainer, total: int, manager: CheckpointManager, stop: GracefulStop
    ) -> None:
        start = trainer.step_count
        if self.console is not None:
            self.console.add_phase(phase, total=total, completed=start)
        saved = start
        while trainer.step_count < total:
            metrics = {k: v for k, v in trainer.step().items() if k not in ("step", "phase", "time")}
            step = trainer.step_count
            self.metrics.log(step, metrics, phase=phase)
            if self.console is not None:
                self.console.update(phase, step, metrics)
            if self.cfg.checkpoint.due(step) or stop.requested:
                manager.save(step, self._checkpoint_state(trainer))
                saved = step
            if stop.requested:
                logger.warning(
                    "%s: stopping on %s after step %d (checkpoint written)", phase, stop.signal_name, step
                )
                raise Stopped
        if saved != trainer.step_count or not manager.checkpoints():
            manager.save(trainer.step_count, self._checkpoint_state(trainer))

    def _checkpoint_state(self, trainer) -> dict[str, Any]:
        return {**trainer.state_dict(), SETTINGS_KEY: flat_settings(self.cfg)}

    def stage_eval(self) -> None:
        """Pass@k with tool metrics on the evaluation questions (resumable)."""
        questions = self._samples(self.cfg.data.eval_file)
        out = self.out / "eval"
        out.mkdir(parents=True, exist_ok=True)
        model_id = f"{self.out.resolve()}:{self._model_fingerprint()}"
        report = evaluate(
            LocalGenerator.from_bundle(self.bundle), self.protocol, self.tools, questions, self.data_dir, self.cfg.eval, self.loop_cfg,
            results_path=out / "results.jsonl", model_id=model_id, reward_cfg=self.cfg.reward,
        )  # fmt: skip
        (out / "report.md").write_text(report.to_markdown())
        (out / "report.json").write_text(report.to_json())
        summary = report.summary()
        step = self.cfg.rl.steps if "rl" in self.cfg.train.stages else 0
        self.metrics.truncate_after(step - 1, "eval")  # a rerun replaces the earlier evaluation
        self.metrics.log(step, summary, phase="eval")
        self.result.eval_summary = summary
        self.result.paths["eval"] = out

    def _model_fingerprint(self) -> str:
        total = 0.0
        with torch.no_grad():
            for p in self.bundle.model.parameters():
                total += float(p.double().sum())
        return f"{total:.10e}"

    def stage_plots(self) -> None:
        """Curves of accuracy, tool use and the all-wrong tool-subgroup rate, and the summary."""
        records = read_metrics(self.out / "metrics.jsonl", phase=None)
        out = self.out / "plots"
        plot_run(records, out)
        rl_records = [r for r in records if r.get("phase") == "rl"]
        if rl_records:
            (out / "summary.md").write_text(summary_markdown(rl_records))
            if self.console is not None:
                self.console.print(summary_table(rl_records))
        self.result.paths["plots"] = out


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (the trainers also derive their own)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_train(cfg: Config, cfg_tree=None, *, plain: bool | None = None) -> RunResult:
    """Run the pipeline with signal handling and console progress; returns its result."""
    out = Path(cfg.output_dir)
    if cfg_tree is not None:
        save_config(cfg_tree, out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    seed_everything(cfg.seed)
    if cfg.model.cpu_threads:
        torch.set_num_threads(cfg.model.cpu_threads)
    try:
        with GracefulStop() as stop, ProgressDisplay(cfg.logging.console_every, plain=plain) as console:
            return Pipeline(cfg, console).run(stop)
    finally:
        root.removeHandler(handler)
        handler.close()

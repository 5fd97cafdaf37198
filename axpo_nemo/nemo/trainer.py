"""The AXPO / GRPO training loop on NeMo-RL (v0.7.0): Megatron policy, colocated vLLM, our agent loop.

One `NemoRLTrainer.step` (DESIGN.md §1; the local trainer's step, with NeMo-RL doing the heavy parts):

1. **Refit / wake.** After a training step the vLLM weights are stale: NeMo-RL's
   ``refit_policy_generation`` streams the Megatron weights into the colocated engines (and wakes
   them); otherwise ``prepare_for_generation`` wakes them, after ``offload_after_refit`` has moved
   a colocated policy's optimizer and gradients off the GPU (a checkpoint put them back), in
   ``grpo_train``'s order.
2. **Rollouts.** B questions in the seeded order of the local trainer, N rollouts each, through
   the shared agent loop (`run_rollouts`) with the vLLM `Generator` and the Ray tool pool;
   rewards with `score_answer`.
3. **Resampling** (``algorithm: axpo``), *while vLLM is awake* so the K forks of a prefix hit the
   prefix cache of its source: `plan_resampling`, `fork_at_tool_call` (or fresh rollouts without
   prefix fixing), rolled out and rewarded. Then ``finish_generation`` (sleep, cache reset).
4. **Advantages** with `assemble_advantages`; a row whose behaviour logprobs are missing or
   non-finite (the generator writes NaN) is excluded from the loss (``row_mask``) and counted.
5. **Train data** with `build_train_data`: rows padded to a multiple of the global batch with
   zero-weight rows (never by dropping resampled rows; each holds a one-token image, so every
   micro-batch carries one), Qwen3-VL pixel values and grids per row.
6. **Logprobs.** ``policy.get_logprobs`` (old) and, with a KL term, ``get_reference_policy_logprobs``;
   a row with a non-finite value on a loss token is dropped from the loss and counted.
7. **Update.** ``policy.train(data, AXPOLossFn)``; metrics: every `STEP_METRIC_NAMES` entry plus
   NeMo-RL's loss metrics (combined as ``grpo_train`` does) and the step's counts and timings.

`run_training` builds everything on NeMo-RL's ``grpo.setup`` (cluster, vLLM, Megatron policy,
logger, CheckpointManager) and runs the steps, checkpointing with NeMo-RL's layout plus our state
(step, data position, counters) in ``training_info.json``; setup's automatic resume gives both back.

The NeMo-RL objects are passed in (``policy``, ``generation``, ``refit``), so the step's
orchestration is plain Python over duck-typed objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from axpo_nemo.agent.groups import resample_states
from axpo_nemo.agent.loop import AgentLoopConfig, Generator, run_rollouts
from axpo_nemo.agent.protocol import VISION_END, VISION_START, ChatProtocol
from axpo_nemo.agent.rewards import RewardConfig
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import Tool
from axpo_nemo.agent.trajectory import TrajectoryState
from axpo_nemo.agent.trajectory_reward import score_trajectory
from axpo_nemo.core import (
    AdvantageConfig,
    AXPOConfig,
    LossConfig,
    ResamplePlan,
    RolloutBatch,
    StepAdvantages,
)
from axpo_nemo.nemo.rollout import (
    QuestionOrder,
    exclude_nonfinite_rows,
    reduce_train_metrics,
    row_images,
    sanitize_behaviour_logprobs,
)
from axpo_nemo.nemo.train_data import build_train_data
from axpo_nemo.run.axpo_step import COUNTERS, StepSettings, build_prompts, run_step
from axpo_nemo.run.data_cursor import dataset_fingerprint

__all__ = ["NemoRLTrainer", "run_training"]

logger = logging.getLogger(__name__)

#: Counters carried across steps (and checkpoints).
COUNTER_NAMES = (*COUNTERS, "invalid_logprob_rows")


class _VllmGeneration:
    """`NemoRLTrainer`'s `run.axpo_step.Generation`: the originals and the resample wave through vLLM."""

    def __init__(self, trainer: NemoRLTrainer) -> None:
        self.trainer = trainer

    def originals(self, states: list[TrajectoryState], prompts: list[Any]) -> RolloutBatch:
        """The originals, rolled out and rewarded."""
        return self.trainer._rollouts(states)

    def resample(
        self, plan: ResamplePlan, states: list[TrajectoryState], prompts: list[Any], originals: RolloutBatch
    ) -> tuple[list[TrajectoryState], RolloutBatch]:
        """The selected prefixes' continuations (vLLM's prefix cache still holds their sources)."""
        t = self.trainer
        extra = resample_states(plan, states, prompts, seed=t.seed, step=t.step_count)
        return extra, t._rollouts(extra)


class NemoRLTrainer:
    """AXPO / GRPO steps over NeMo-RL objects (module docstring).

    Args:
        policy: NeMo-RL ``Policy`` (``get_logprobs``, ``get_reference_policy_logprobs``, ``train``,
            ``prepare_for_lp_inference``, ``prepare_for_training``, ``offload_after_refit``).
        generation: NeMo-RL ``VllmGeneration`` (``prepare_for_generation``, ``finish_generation``).
        refit: pushes the policy's weights into ``generation`` and wakes it (NeMo-RL's
            ``refit_policy_generation`` bound to the run's settings).
        colocated: vLLM shares the policy's GPUs (``generation.colocated.enabled``): a wake
            without refit offloads the policy's optimizer first (``offload_after_refit``).
        generator: the agent loop's `Generator` on ``generation`` (`VllmGenerator`).
        tools: tools by name (the Ray tool pool).
        protocol: chat protocol of the policy's processor.
        loss_fn: `AXPOLossFn`.
        questions / data_root: RL questions and the folder their images are relative to.
        algorithm: ``axpo`` or ``grpo``.
        axpo_cfg, adv_cfg, loss_cfg, reward_cfg, loop_cfg: the algorithm and agent-loop settings.
        questions_per_step, group_size: B and N.
        global_batch_size: NeMo-RL ``train_global_batch_size`` (rows are padded to a multiple).
        seq_multiple: ``make_sequence_length_divisible_by``.
        pad_token_id: the tokenizer's pad id.
        seed: base seed (question order, sampling, selection).
        to_train_data: `NemoTrainData` → what ``policy`` consumes (NeMo-RL: `to_batched_data_dict`).
    """

    def __init__(
        self,
        *,
        policy,
        generation,
        refit: Callable[[], None],
        generator: Generator,
        tools: Mapping[str, Tool],
        protocol: ChatProtocol,
        loss_fn,
        questions: Sequence[Sample],
        data_root: str | Path,
        algorithm: str,
        axpo_cfg: AXPOConfig,
        adv_cfg: AdvantageConfig,
        loss_cfg: LossConfig,
        reward_cfg: RewardConfig,
        loop_cfg: AgentLoopConfig,
        questions_per_step: int,
        group_size: int,
        global_batch_size: int,
        seq_multiple: int = 1,
        pad_token_id: int = 0,
        seed: int = 0,
        to_train_data: Callable | None = None,
        colocated: bool = True,
    ) -> None:
        if algorithm not in ("axpo", "grpo"):
            raise ValueError(f"NemoRLTrainer: algorithm must be 'axpo' or 'grpo', got {algorithm!r}")
        if not questions:
            raise ValueError("NemoRLTrainer: no questions")
        self.policy, self.generation, self.refit = policy, generation, refit
        self.generator, self.tools, self.protocol, self.loss_fn = generator, dict(tools), protocol, loss_fn
        self.questions, self.data_root = list(questions), Path(data_root)
        self.algorithm = algorithm
        self.axpo_cfg, self.adv_cfg, self.loss_cfg = axpo_cfg, adv_cfg, loss_cfg
        self.reward_cfg, self.loop_cfg = reward_cfg, loop_cfg
        self.questions_per_step, self.group_size = int(questions_per_step), int(group_size)
        self.global_batch_size, self.seq_multiple = int(global_batch_size), int(seq_multiple)
        self.pad_token_id, self.seed = int(pad_token_id), int(seed)
        if to_train_data is None:
            from axpo_nemo.nemo.train_data import to_batched_data_dict

            to_train_data = to_batched_data_dict
        self.to_train_data = to_train_data
        self.colocated = bool(colocated)
        self.order = QuestionOrder(len(self.questions), self.seed)
        self.fingerprint = dataset_fingerprint(q.id for q in self.questions)
        self.step_count = 0
        self.counters: dict[str, float] = dict.fromkeys(COUNTER_NAMES, 0)
        self.settings = StepSettings(algorithm, axpo_cfg, adv_cfg, self.group_size, self.seed, self.pad_token_id)
        self._valid = torch.zeros(0, dtype=torch.bool)
        self._invalid_before = 0
        self.stale = True  # vLLM holds other weights than the policy until the first refit
        self.last: dict[str, Any] = {}

    # -- generation --------------------------------------------------------------------------

    def wake(self) -> None:
        """Make vLLM generate with the current policy: refit when stale, else wake it.

        The order is ``grpo_train``'s (NeMo-RL v0.7.0, before rollouts and before validation): a
        refit offloads the policy itself; without one, a colocated policy's optimizer and gradients
        go to the CPU (``offload_after_refit``) before vLLM wakes. That case is the step after a
        validation and a checkpoint: the validation refitted, the checkpoint's
        ``prepare_for_training`` reloaded the optimizer, and the weights are still current.
        """
        if self.stale:
            self.refit()
            self.stale = False
        else:
            if self.colocated:
                self.policy.offload_after_refit()
            self.generation.prepare_for_generation()

    def validate(self, run: Callable[[], Any]) -> Any:
        """Run ``run()`` (an evaluation through the generator) with vLLM awake; returns its result.

        `wake` first (a refit after a training step), ``finish_generation`` after, as
        ``grpo_train`` wraps its ``validate``.
        """
        self.wake()
        try:
            return run()
        finally:
            self.generation.finish_generation()

    def _rollouts(self, states: list[TrajectoryState]) -> RolloutBatch:
        """Roll ``states`` out with vLLM, reward them; rows with unusable behaviour logprobs are
        remembered (they keep their reward but carry no loss, see `row_mask`)."""
        run_rollouts(
            states, self.generator, self.tools, self.loop_cfg, protocol=self.protocol,
            allowed_tools=lambda s: self.questions[s.metadata["question"]].allowed_tools,
        )  # fmt: skip
        out = []
        for s in states:
            res = score_trajectory(s, self.questions[s.metadata["question"]], self.protocol, self.reward_cfg)
            out.append(s.to_rollout(reward=float(res.reward), correct=bool(res.correct)))
        batch = RolloutBatch.from_rollouts(out, pad_id=self.pad_token_id)
        valid, batch.logprobs = sanitize_behaviour_logprobs(batch.generated, batch.logprobs)
        self._valid = torch.cat([self._valid, valid])
        return batch

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One RL step (`run.axpo_step.run_step`, the module docstring); returns its metrics."""
        picks = self.order.draw(self.questions_per_step)
        prompts = build_prompts(self.questions, picks, self.protocol, self.data_root, self.tools)
        record, metrics = run_step(self, self.questions, picks, prompts, self.settings, self.step_count, self.counters)
        self.step_count += 1
        metrics.update({"step": float(self.step_count), "epoch": float(self.order.epoch)})
        self.last.update(
            {"batch": record.batch, "plan": record.plan, "advantages": record.advantages, "states": record.states}
        )
        return metrics

    # -- the StepBackend protocol (run.axpo_step) ----------------------------------------------

    @contextlib.contextmanager
    def generating(self) -> Iterator[_VllmGeneration]:
        """vLLM awake (refitted when stale) for the originals and the resample wave, then asleep:
        the K forks of a prefix run while its source's prefix is still in vLLM's cache."""
        self._valid = torch.zeros(0, dtype=torch.bool)
        self._invalid_before = getattr(getattr(self.generator, "stats", None), "invalid_logprob_samples", 0)
        self.wake()
        try:
            yield _VllmGeneration(self)
        finally:
            self.generation.finish_generation()

    def row_mask(self, batch: RolloutBatch) -> torch.Tensor:
        """Rows whose behaviour logprobs vLLM returned finite (the others carry no loss)."""
        return self._valid

    def update(
        self, batch: RolloutBatch, plan: ResamplePlan | None, adv: StepAdvantages, all_states: list[TrajectoryState]
    ) -> dict[str, float]:
        """Train data, old/reference logprobs and ``policy.train`` with the AXPO loss; its metrics."""
        t_start = time.perf_counter()
        invalid_rows = int((~self._valid).sum())
        data = build_train_data(
            batch, adv.advantages, adv.loss_mask, row_images(all_states),
            global_batch_size=self.global_batch_size, pad_token_id=self.pad_token_id,
            seq_multiple=self.seq_multiple, image_token_id=self.protocol.image_pad_id,
            spatial_merge_size=self.protocol.merge_size, vision_start_id=self.protocol.ids[VISION_START],
            vision_end_id=self.protocol.ids[VISION_END],
        )  # fmt: skip
        train_data = self.to_train_data(data)

        self.policy.prepare_for_lp_inference()
        train_data["prev_logprobs"] = self.policy.get_logprobs(train_data)["logprobs"]
        if self.loss_cfg.kl_coef > 0:
            ref = self.policy.get_reference_policy_logprobs(train_data)["reference_logprobs"]
        else:
            ref = torch.zeros_like(train_data["prev_logprobs"])
        train_data["reference_policy_logprobs"] = ref
        nonfinite = exclude_nonfinite_rows(
            train_data, ("prev_logprobs", "reference_policy_logprobs"), num_rows=data.num_real_rows
        )
        t_logprob = time.perf_counter()

        self.policy.prepare_for_training()
        self.stale = True
        results = self.policy.train(train_data, self.loss_fn)
        t_train = time.perf_counter()

        self.counters["invalid_logprob_rows"] += invalid_rows
        stats = getattr(self.generator, "stats", None)
        metrics = reduce_train_metrics(results)
        metrics.update(
            {
                "pad_rows": float(data.num_pad_rows),
                "loss_tokens": float(train_data["token_mask"].sum()),
                "invalid_logprob_rows": float(invalid_rows),
                "invalid_logprob_samples": float(
                    (stats.invalid_logprob_samples if stats is not None else 0) - self._invalid_before
                ),
                "nonfinite_rows": float(nonfinite),
                "logprob_s": t_logprob - t_start,
                "train_s": t_train - t_logprob,
            }
        )
        self.last = {"train_data": train_data}
        return metrics

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Our part of a checkpoint (JSON-serialisable): step, data position, counters."""
        return {
            "step": self.step_count,
            "data": {
                "epoch": self.order.epoch,
                "position": self.order.position,
                "fingerprint": self.fingerprint,
            },
            "counters": dict(self.counters),
            "algorithm": self.algorithm,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`; a changed question set restarts its epoch (with a warning)."""
        self.step_count = int(state["step"])
        self.counters = {**dict.fromkeys(COUNTER_NAMES, 0), **dict(state.get("counters", {}))}
        data = state["data"]
        self.order.epoch, self.order.position = int(data["epoch"]), int(data["position"])
        if data.get("fingerprint") != self.fingerprint:
            logger.warning(
                "the RL questions changed since the checkpoint; epoch %d restarts", self.order.epoch
            )
            self.order.position = 0


# ----------------------------------------------------------------------------- NeMo-RL wiring


class _QuestionIndexDataset(torch.utils.data.Dataset):
    """What ``grpo.setup`` wants as a dataset: only its length is used (our loop draws questions).

    setup builds a ``StatefulDataLoader`` over it and sizes Megatron's scheduler from
    ``len(dataloader)``; we never iterate it, but save its state with each checkpoint because
    setup's resume loads ``train_dataloader.pt``.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"idx": i}


def save_checkpoint(runtime: Mapping[str, Any], trainer: NemoRLTrainer) -> str:
    """A NeMo-RL checkpoint (policy weights, optimizer, tokenizer, dataloader) with our state inside.

    ``training_info.json`` holds NeMo-RL's ``GRPOSaveState`` fields and ``axpo`` (`state_dict`).
    """
    checkpointer, policy, master = runtime["checkpointer"], runtime["policy"], runtime["master_config"]
    save_state = dict(runtime["save_state"])
    save_state.update(
        current_step=trainer.step_count,
        total_steps=trainer.step_count,
        current_epoch=trainer.order.epoch,
        consumed_samples=trainer.step_count * trainer.questions_per_step,
        axpo=trainer.state_dict(),
    )
    save_state.pop("val_reward", None)
    policy.prepare_for_training()
    path = checkpointer.init_tmp_checkpoint(trainer.step_count, save_state, master)
    policy.save_checkpoint(
        weights_path=os.path.join(path, "policy", "weights"),
        optimizer_path=os.path.join(path, "policy", "optimizer") if checkpointer.save_optimizer else None,
        tokenizer_path=os.path.join(path, "policy", "tokenizer"),
        checkpointing_cfg=master.checkpointing,
    )
    torch.save(runtime["dataloader"].state_dict(), os.path.join(path, "train_dataloader.pt"))
    checkpointer.finalize_checkpoint(path)
    return str(path)


def run_training(cfg, cfg_tree=None) -> int:
    """Train ``cfg`` (``backend: nemo``) on NeMo-RL: setup, resume, steps, checkpoints, validation.

    Ray must already be initialised (`axpo_nemo.nemo.train` calls NeMo-RL's ``init_ray``).
    Returns 0, or `EXIT_STOPPED` after a stop signal (a checkpoint was written).
    """
    from axpo_nemo.agent.sample import read_samples
    from axpo_nemo.agent.tools.registry import build_tools  # noqa: F401  (the pool builds them per actor)
    from axpo_nemo.eval.passk import evaluate
    from axpo_nemo.nemo import adapter
    from axpo_nemo.nemo.generator import NemoVllmEngine, VllmGenerator
    from axpo_nemo.nemo.loss import EXTRA_PG_KEYS, AXPOLossFn
    from axpo_nemo.nemo.master_config import (
        build_master_config,
        make_sequence_length_divisible_by,
        train_global_batch_size,
    )
    from axpo_nemo.nemo.tool_pool import RayToolPool
    from axpo_nemo.run.metrics_log import MetricsLogger
    from axpo_nemo.run.run_folder import save_config
    from axpo_nemo.run.stop import EXIT_STOPPED, GracefulStop

    grpo = adapter.grpo_module()
    out = Path(cfg.output_dir)
    if cfg_tree is not None:
        save_config(cfg_tree, out)
    data_dir = Path(cfg.data.dir) if cfg.data.dir else out / "data"
    questions = list(read_samples(data_dir / cfg.data.rl_file))
    val_path = data_dir / cfg.data.eval_file
    val_questions = list(read_samples(val_path)) if cfg.nemo.val_period and val_path.exists() else []

    master = build_master_config(cfg)
    # Validation is ours (Pass@k through the agent loop), so setup must not ask for a val dataset.
    master["grpo"].update(val_period=0, val_at_start=False, val_at_end=False)
    processor = adapter.get_tokenizer(master["policy"]["tokenizer"], get_processor=True)
    tokenizer = processor.tokenizer
    master["policy"]["generation"] = adapter.configure_generation_config(
        master["policy"]["generation"], tokenizer
    )
    master_config = grpo.MasterConfig(**master)
    dataset = _QuestionIndexDataset(max(len(questions), cfg.rollout.questions_per_step))
    (policy, generation, _gym, _clusters, dataloader, _val, _pg_loss, nemo_logger, checkpointer, save_state,
     master_config, _teachers, _aliases) = grpo.setup(master_config, tokenizer, dataset, None, processor=processor)  # fmt: skip

    gen_cfg = master_config.policy["generation"]
    colocated = bool(gen_cfg["colocated"]["enabled"])

    def refit() -> None:
        grpo.refit_policy_generation(
            policy,
            generation,
            colocated,
            _refit_buffer_size_gb=master_config.policy.get("refit_buffer_size_gb"),
        )

    protocol = ChatProtocol(processor)
    generator = VllmGenerator(
        NemoVllmEngine(generation), tokenizer, eos_ids=list(gen_cfg.get("stop_token_ids") or []),
        max_tokens_cap=int(gen_cfg["max_new_tokens"]), max_model_len=int(gen_cfg["vllm_cfg"]["max_model_len"]),
    )  # fmt: skip
    overrides = {k: master["loss_fn"][k] for k in EXTRA_PG_KEYS if k in master.get("loss_fn", {})}
    loss_fn = AXPOLossFn(cfg.loss, overrides)
    loop_cfg = AgentLoopConfig.from_rollout_config(
        cfg.rollout, tool_timeout_s=cfg.tools.timeout_s, tool_workers=cfg.nemo.tool_workers, seed=cfg.seed
    )
    metrics_log = MetricsLogger(out, cfg.logging, run_config={"backend": "nemo", "algorithm": cfg.algorithm})
    with RayToolPool(cfg.tools, cfg.nemo.tool_workers) as tools, GracefulStop() as stop:
        trainer = NemoRLTrainer(
            policy=policy, generation=generation, refit=refit, generator=generator, tools=tools,
            protocol=protocol, loss_fn=loss_fn, questions=questions, data_root=data_dir,
            algorithm=cfg.algorithm, axpo_cfg=cfg.axpo, adv_cfg=cfg.advantage, loss_cfg=cfg.loss,
            reward_cfg=cfg.reward, loop_cfg=loop_cfg, questions_per_step=cfg.rollout.questions_per_step,
            group_size=cfg.rollout.group_size, global_batch_size=train_global_batch_size(cfg),
            seq_multiple=make_sequence_length_divisible_by(cfg), pad_token_id=tokenizer.pad_token_id or 0,
            seed=cfg.seed, colocated=colocated,
        )  # fmt: skip
        if save_state and "axpo" in save_state:
            trainer.load_state_dict(save_state["axpo"])
            metrics_log.truncate_after(trainer.step_count, "rl")
            logger.info("rl (nemo): resumed from step %d", trainer.step_count)
        runtime = {
            "checkpointer": checkpointer, "policy": policy, "master_config": master_config,
            "save_state": save_state or {}, "dataloader": dataloader,
        }  # fmt: skip
        try:
            while trainer.step_count < cfg.rl.steps:
                metrics = trainer.step()
                step = trainer.step_count
                metrics_log.log(step, {k: v for k, v in metrics.items() if k != "step"}, phase="rl")
                nemo_logger.log_metrics(metrics, step, prefix="train")
                last = step >= cfg.rl.steps
                if cfg.nemo.val_period and val_questions and (step % cfg.nemo.val_period == 0 or last):
                    report = trainer.validate(
                        lambda: evaluate(
                            generator, protocol, tools, val_questions, val_path.parent, cfg.eval, loop_cfg,
                            reward_cfg=cfg.reward,
                        )
                    )  # fmt: skip
                    summary = report.summary()
                    metrics_log.log(step, summary, phase="eval")
                    nemo_logger.log_metrics(summary, step, prefix="validation")
                if cfg.checkpoint.due(step) or last or stop.requested:
                    save_checkpoint(runtime, trainer)
                if stop.requested:
                    logger.warning(
                        "rl (nemo): stopping on %s after step %d (checkpoint written)", stop.signal_name, step
                    )
                    return EXIT_STOPPED
        finally:
            metrics_log.close()
    return 0

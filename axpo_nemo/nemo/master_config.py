"""Build NeMo-RL v0.7.0 master configs (plain dicts) from our `Config`.

Framework-free: nothing here imports ``nemo_rl``; the training entry points turn the dict into
NeMo-RL's ``MasterConfig`` (``nemo_rl.algorithms.grpo.MasterConfig(**d)`` /
``nemo_rl.algorithms.sft.MasterConfig(**d)``). A master config is built in three layers, later ones
winning key by key (deep merge):

1. the NeMo-RL YAML named by ``nemo.nemo_rl_config`` (its ``defaults:`` chain followed), or nothing;
2. what our config decides (`_policy`, `_loss_fn`, `_grpo`, ...; the built-in defaults are complete,
   so layer 1 is optional);
3. ``nemo.overrides``, any NeMo-RL keys (the escape hatch).

OmegaConf interpolations (``${policy.model_name}``, ``${mul:a,b}``) are resolved after merging.

Mapping (our key → NeMo-RL key):

* ``model.name`` → ``policy.model_name``, ``policy.tokenizer.name``;
  ``rollout.max_total_tokens`` → ``policy.max_total_sequence_length`` and (default)
  ``policy.generation.vllm_cfg.max_model_len``; ``rollout.max_new_tokens/temperature/top_p`` →
  ``policy.generation.{max_new_tokens,temperature,top_p}``.
* ``nemo.megatron.tensor_parallel/pipeline_parallel/context_parallel/sequence_parallel`` →
  ``policy.megatron_cfg.{tensor_model_parallel_size,pipeline_model_parallel_size,
  context_parallel_size,sequence_parallel}``; ``policy.make_sequence_length_divisible_by`` = TP, times
  2·CP when CP > 1 (NeMo-RL's packing asserts TP with SP and 2·CP with CP).
* ``nemo.megatron.recompute`` → ``activation_checkpointing`` (false for 'none') +
  ``recompute_granularity`` ('selective'|'full') + ``recompute_modules``.
* ``nemo.megatron.distributed_optimizer`` → ``optimizer.use_distributed_optimizer``;
  ``grad_reduce_in_fp32`` → ``distributed_data_parallel_config.grad_reduce_in_fp32``;
  ``optimizer_cpu_offload`` → ``optimizer.optimizer_cpu_offload`` (+ ``optimizer_offload_fraction`` 1.0).
* ``nemo.megatron.fp8`` → as NeMo-RL's ``grpo_math_8B_megatron_fp8.yaml``: ``megatron_cfg.fp8_cfg``
  {enabled, fp8 e4m3, fp8_recipe, fp8_param false}, ``optimizer.use_precision_aware_optimizer``
  false, ``env_vars.NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`` (blockwise), ``vllm_cfg.precision`` fp8 +
  ``use_deep_gemm``, ``loss_fn.use_importance_sampling_correction`` true.
* ``nemo.megatron.train_global_batch_size/train_micro_batch_size/logprob_batch_size`` →
  ``policy.{train_global_batch_size,train_micro_batch_size,logprob_batch_size}`` (see
  `train_global_batch_size` for the null default); ``batching`` → ``policy.dynamic_batching.enabled``
  / ``policy.sequence_packing.enabled`` with token budgets max_total_tokens x micro-batch.
* ``nemo.megatron.freeze_vision_model`` → ``axpo.freeze_vision_model``: NeMo-RL v0.7.0 has no Megatron
  key for it (later releases add ``megatron_cfg.freeze_vision_model``); the AXPO loop applies it.
* ``nemo.vllm.*`` → ``policy.generation.vllm_cfg.{tensor_parallel_size,gpu_memory_utilization,
  enable_prefix_caching,precision,max_model_len,enforce_eager}``; ``skip_tokenizer_init: false``
  (NeMo-RL asserts it for VLMs); ``nemo.colocated`` → ``policy.generation.colocated.enabled``.
* ``rl.lr/min_lr_ratio/weight_decay/warmup_steps/steps/grad_clip`` → ``megatron_cfg.optimizer.{lr,
  min_lr = lr·min_lr_ratio, weight_decay}``, ``scheduler.{lr_warmup_iters, lr_warmup_init = lr/warmup,
  lr_decay_iters = steps, lr_decay_style cosine|constant}``, ``policy.max_grad_norm`` (=
  ``optimizer.clip_grad``). Megatron's scheduler ticks once per ``policy.train`` call (once per RL
  step), so RL steps map 1:1 onto scheduler iterations. ``sft.*`` the same way for SFT.
* ``loss.*`` → ``loss_fn`` (ClippedPGLossConfig): ``clip_low/clip_high`` → ``ratio_clip_min/max``,
  ``dual_clip`` → ``ratio_clip_c``, ``kl_coef`` → ``reference_policy_kl_penalty``, ``kl_type`` →
  ``reference_policy_kl_type``, ``kl_input_clamp/kl_output_clamp`` → ``kl_{input,output}_clamp_value``;
  token-level loss.
* ``rollout.questions_per_step/group_size/max_turns`` → ``grpo.num_prompts_per_step/
  num_generations_per_prompt/max_rollout_turns``; ``rl.steps`` → ``grpo.max_num_steps``;
  ``advantage.normalize_std`` → ``grpo.normalize_rewards``; ``seed`` → ``grpo.seed``;
  ``nemo.val_period`` → ``grpo.val_period``; ``loss.kl_coef == 0`` →
  ``grpo.skip_reference_policy_logprobs_calculation``.
* ``checkpoint.every/keep_last`` → ``checkpointing.save_period/keep_top_k``; the folder is
  ``<checkpoint.dir>/<stage>`` or ``<output_dir>/<stage>/checkpoints`` (as the local backend).
* ``cluster.num_nodes/gpus_per_node`` → ``cluster.*``; ``logging.*`` → ``logger.*``.
* AXPO's own settings (``axpo.*``, ``algorithm``, ``nemo.tool_workers``, ...) go to a top-level
  ``axpo`` section (NeMo-RL's MasterConfig allows extra keys).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from axpo_nemo.config import loader as _loader  # noqa: F401  (registers NeMo-RL's resolvers: mul, add, ...)
from axpo_nemo.config.loader import ConfigError
from axpo_nemo.config.schema import Config
from axpo_nemo.core.budget import resample_budget

__all__ = [
    "build_master_config",
    "build_sft_master_config",
    "checkpoint_dir",
    "data_parallel_size",
    "deep_merge",
    "load_nemo_rl_yaml",
    "make_sequence_length_divisible_by",
    "max_rows_per_step",
    "train_global_batch_size",
]


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update`` key by key: nested mappings merge, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_nemo_rl_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A NeMo-RL YAML with its ``defaults:`` chain merged (parents first, relative to the file, as
    ``nemo_rl.utils.config.load_config`` does), interpolations left unresolved."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"nemo.nemo_rl_config: defaults form a cycle at {path}")
    if not path.is_file():
        raise ConfigError(f"nemo.nemo_rl_config: file not found: {path}")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"nemo.nemo_rl_config: {path} does not hold a mapping")
    data = OmegaConf.to_container(node, resolve=False)
    parents = data.pop("defaults", None) or []
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, load_nemo_rl_yaml(path.parent / str(parent), (*_chain, path)))
    return deep_merge(merged, data)


def data_parallel_size(cfg: Config) -> int:
    """DP = GPUs / (TP·PP·CP), at least 1 (`axpo plan` reports a layout where it does not divide)."""
    meg = cfg.nemo.megatron
    world = cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    return max(1, world // (meg.tensor_parallel * meg.pipeline_parallel * meg.context_parallel))


def max_rows_per_step(cfg: Config) -> int:
    """The most training rows one RL step can produce: B·N originals plus, for AXPO, M·K resampled
    rows with M = floor(r·B·N/K) (DESIGN.md §1, step 4)."""
    originals = cfg.rollout.questions_per_step * cfg.rollout.group_size
    if cfg.algorithm == "grpo":
        return originals
    # the core's exact M: a float floor gave 28 for r=0.29, B·N=100, K=1 where the step makes 29
    return originals + resample_budget(originals, cfg.axpo.r, cfg.axpo.k) * cfg.axpo.k


def train_global_batch_size(cfg: Config) -> int:
    """Rows per optimizer step (``policy.train_global_batch_size``).

    ``nemo.megatron.train_global_batch_size`` when set; null: one optimizer step per RL step, i.e.
    `max_rows_per_step` rounded up to a multiple of DP·micro-batch. Each step's rows are padded with
    zero-weight rows to a multiple of this (never by dropping resampled rows), and the value stays
    fixed so Megatron's LR scheduler ticks exactly once per RL step.
    """
    meg = cfg.nemo.megatron
    if meg.train_global_batch_size:
        return meg.train_global_batch_size
    unit = data_parallel_size(cfg) * meg.train_micro_batch_size
    return math.ceil(max_rows_per_step(cfg) / unit) * unit


def make_sequence_length_divisible_by(cfg: Config) -> int:
    """Pad multiple of sequence lengths: TP (what sequence parallelism splits), times 2·CP with
    context parallelism (each CP rank takes two chunks for load balance)."""
    meg = cfg.nemo.megatron
    return meg.tensor_parallel * (2 * meg.context_parallel if meg.context_parallel > 1 else 1)


def checkpoint_dir(cfg: Config, stage: str) -> str:
    """The stage's checkpoint folder: ``<checkpoint.dir>/<stage>`` or ``<output_dir>/<stage>/checkpoints``."""
    if cfg.checkpoint.dir:
        return str(Path(cfg.checkpoint.dir) / stage)
    return str(Path(cfg.output_dir) / stage / "checkpoints")


def _optimizer(cfg: Config, lr: float, min_lr_ratio: float, weight_decay: float, warmup: int,
               decay_iters: int | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Megatron ``optimizer`` and ``scheduler`` sections for AdamW with linear warm-up then cosine
    decay to ``lr·min_lr_ratio`` (constant when the ratio is 1), as the local trainers schedule it."""
    meg = cfg.nemo.megatron
    optimizer = {
        "optimizer": "adam",  # Megatron's Adam applies decoupled weight decay (AdamW)
        "lr": lr,
        "min_lr": lr * min_lr_ratio,
        "weight_decay": weight_decay,
        "bf16": True,
        "fp16": False,
        "params_dtype": "float32",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_eps": 1e-8,
        "sgd_momentum": 0.9,
        "use_distributed_optimizer": meg.distributed_optimizer,
        "use_precision_aware_optimizer": not meg.fp8,
        "clip_grad": None,  # filled from policy.max_grad_norm by the caller
        "optimizer_cpu_offload": meg.optimizer_cpu_offload,
        "optimizer_offload_fraction": 1.0 if meg.optimizer_cpu_offload else 0.0,
    }
    scheduler = {
        "start_weight_decay": weight_decay,
        "end_weight_decay": weight_decay,
        "weight_decay_incr_style": "constant",
        "lr_decay_style": "constant" if min_lr_ratio >= 1.0 else "cosine",
        "lr_decay_iters": decay_iters,
        "lr_warmup_iters": warmup,
        # Megatron warms up linearly from lr_warmup_init; starting at lr/warmup makes the first
        # update's LR equal the local schedule's (step + 1)/warmup.
        "lr_warmup_init": lr / warmup if warmup else lr,
    }
    return optimizer, scheduler


def _megatron_cfg(cfg: Config, optimizer: dict[str, Any], scheduler: dict[str, Any]) -> dict[str, Any]:
    meg = cfg.nemo.megatron
    env_vars: dict[str, str] = {}
    if meg.fp8 and meg.fp8_recipe == "blockwise":
        env_vars["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"] = "1"
    return {
        "enabled": True,
        "force_reconvert_from_hf": False,
        "empty_unused_memory_level": 1,
        "activation_checkpointing": meg.recompute != "none",
        "recompute_granularity": "full" if meg.recompute == "full" else "selective",
        "recompute_modules": list(meg.recompute_modules) if meg.recompute_modules else None,
        "tensor_model_parallel_size": meg.tensor_parallel,
        "expert_tensor_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "pipeline_model_parallel_size": meg.pipeline_parallel,
        "num_layers_in_first_pipeline_stage": None,
        "num_layers_in_last_pipeline_stage": None,
        "context_parallel_size": meg.context_parallel,
        "pipeline_dtype": "bfloat16",
        "sequence_parallel": meg.sequence_parallel,
        "freeze_moe_router": True,
        "moe_router_dtype": "fp64",
        "moe_router_load_balancing_type": "none",
        "moe_router_bias_update_rate": 0.0,
        "moe_permute_fusion": True,
        # off with sequence packing: fused RoPE over packed Qwen3-VL (M-RoPE) sequences is a known
        # logprob mismatch (NVIDIA-NeMo/Megatron-Bridge issue 1776); `axpo plan` refuses an
        # override that turns it back on
        "apply_rope_fusion": meg.batching != "packing",
        "bias_activation_fusion": True,
        "defer_fp32_logits": False,
        "moe_per_layer_logging": False,
        "moe_enable_deepep": False,
        "moe_token_dispatcher_type": "alltoall",
        "moe_shared_expert_overlap": False,
        "mtp_num_layers": 0,
        "mtp_loss_scaling_factor": 0.0,
        "mtp_use_repeated_layer": False,
        "mtp_detach_heads": False,
        "gradient_accumulation_fusion": False,
        "use_fused_weighted_squared_relu": False,
        # NotRequired in v0.7.0's MegatronConfig, but sft.setup reads it with [] when Megatron is on.
        "use_linear_ce_fusion_loss": False,
        "peft": {"enabled": False},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "distributed_data_parallel_config": {
            "grad_reduce_in_fp32": meg.grad_reduce_in_fp32,
            # False for vision-language models, as in every v0.7.0 VLM Megatron recipe: a last
            # micro-batch without an image fails finish_grad_sync (padding rows carry an image, see
            # train_data.py, but a text-only question's rows can still make one)
            "overlap_grad_reduce": False,
            "overlap_param_gather": True,
            "use_custom_fsdp": False,
            "data_parallel_sharding_strategy": "optim_grads_params",
        },
        "fp8_cfg": {"enabled": meg.fp8, "fp8": "e4m3", "fp8_recipe": meg.fp8_recipe, "fp8_param": False},
        "env_vars": env_vars or None,
    }


def _batching(cfg: Config, seq_len: int, with_logprobs: bool) -> dict[str, Any]:
    """``policy.dynamic_batching`` and ``policy.sequence_packing`` with token budgets of
    sequence length x micro-batch (x logprob batch for the logprob passes)."""
    meg = cfg.nemo.megatron
    train_tokens = seq_len * meg.train_micro_batch_size
    dynamic = {
        "enabled": meg.batching == "dynamic",
        "train_mb_tokens": train_tokens,
        "sequence_length_round": 64,
    }
    packing = {
        "enabled": meg.batching == "packing",
        "train_mb_tokens": train_tokens,
        "algorithm": "modified_first_fit_decreasing",
        "sequence_length_round": 64,
    }
    if with_logprobs:
        dynamic["logprob_mb_tokens"] = packing["logprob_mb_tokens"] = seq_len * meg.logprob_batch_size
    return {"dynamic_batching": dynamic, "sequence_packing": packing}


def _policy(cfg: Config, *, seq_len: int, gbs: int, megatron_cfg: dict[str, Any], max_grad_norm: float,
            generation: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    meg = cfg.nemo.megatron
    megatron_cfg["optimizer"]["clip_grad"] = max_grad_norm
    policy = {
        "model_name": cfg.model.name,
        "tokenizer": {"name": cfg.model.name, "chat_template_kwargs": None},
        "hf_config_overrides": {},
        "train_global_batch_size": gbs,
        "train_micro_batch_size": meg.train_micro_batch_size,
        "generation_batch_size": 32,  # only read by the (unused) Megatron/HF generation backends
        "logprob_batch_size": meg.logprob_batch_size,
        "max_total_sequence_length": seq_len,
        "precision": "bfloat16",
        "logprob_chunk_size": None,
        "offload_optimizer_for_logprob": False,
        "dtensor_cfg": {"enabled": False},
        "megatron_cfg": megatron_cfg,
        **_batching(cfg, seq_len, with_logprobs=generation is not None),
        "make_sequence_length_divisible_by": make_sequence_length_divisible_by(cfg),
        "max_grad_norm": max_grad_norm,
        "optimizer": None,  # the DTensor/torch optimizer; Megatron's lives in megatron_cfg
        "scheduler": None,
    }
    if generation is not None:
        policy["generation"] = generation
    return policy


#: Parameter-name keywords of the Qwen3-VL vision tower (kept out of FP8 quantization).
VISION_TOWER_KWS = ("visual.",)


def _generation(cfg: Config) -> dict[str, Any]:
    """``policy.generation``: vLLM, colocated, prefix caching, FP8 rollouts when training in FP8."""
    vllm, meg, rollout = cfg.nemo.vllm, cfg.nemo.megatron, cfg.rollout
    fp8 = meg.fp8 or vllm.precision == "fp8"
    return {
        "backend": "vllm",
        "max_new_tokens": rollout.max_new_tokens,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "top_k": None,
        "stop_token_ids": None,
        "stop_strings": None,  # per-sample stop strings come with each generation batch
        "port_range_low": 11001,
        "port_range_high": 15000,
        "vllm_cfg": {
            "async_engine": False,
            "precision": "fp8" if fp8 else "bfloat16",
            "kv_cache_dtype": "auto",
            "tensor_parallel_size": vllm.tensor_parallel,
            "pipeline_parallel_size": 1,
            "expert_parallel_size": 1,
            "gpu_memory_utilization": vllm.gpu_memory_utilization,
            "max_model_len": vllm.max_model_len or rollout.max_total_tokens,
            "enforce_eager": vllm.enforce_eager,
            "use_tqdm": False,
            "use_deep_gemm": fp8,
            "num_last_layers_in_bf16": 0,
            "num_first_layers_in_bf16": 0,
            "enable_vllm_metrics_logger": False,
            "vllm_metrics_logger_interval": 0.5,
            "skip_tokenizer_init": False,  # NeMo-RL asserts this for VLMs (the processor renders images)
            "enable_prefix_caching": vllm.enable_prefix_caching,
            # FP8 rollouts keep the vision tower in bf16: v0.7.0's fp8 init matches these keywords
            # against "model.<param name>" of AutoModel (generation/vllm/quantization/fp8.py), where
            # every Qwen3-VL vision parameter lives under "visual." and no text parameter does
            **({"quantization_ignored_layer_kws": list(VISION_TOWER_KWS)} if fp8 else {}),
        },
        # A multimodal processor cache in vLLM broke NeMo-RL's VLM recipe at validation time.
        "vllm_kwargs": {"mm_processor_cache_gb": 0},
        "colocated": {
            "enabled": cfg.nemo.colocated,
            "resources": {"gpus_per_node": None, "num_nodes": None},
        },
    }


def _loss_fn(cfg: Config) -> dict[str, Any]:
    """``loss_fn`` (NeMo-RL ClippedPGLossConfig) from ``loss.*``; FP8 rollouts add importance sampling."""
    loss = cfg.loss
    return {
        "reference_policy_kl_penalty": loss.kl_coef,
        "reference_policy_kl_type": loss.kl_type,
        "kl_input_clamp_value": loss.kl_input_clamp,
        "kl_output_clamp_value": loss.kl_output_clamp,
        "ratio_clip_min": loss.clip_low,
        "ratio_clip_max": loss.clip_high,
        "ratio_clip_c": loss.dual_clip,
        "use_on_policy_kl_approximation": False,
        "use_importance_sampling_correction": cfg.nemo.megatron.fp8 or cfg.nemo.vllm.precision == "fp8",
        "truncated_importance_sampling_type": None,
        "truncated_importance_sampling_ratio": None,
        "truncated_importance_sampling_ratio_min": None,
        "sequence_level_importance_ratios": False,
        "token_level_loss": True,
        "force_on_policy_ratio": False,
        "use_kl_in_reward": False,
        "use_cispo": False,
        "disable_ppo_ratio": False,
        "positive_example_nll_weight": 0.0,
    }


def _grpo(cfg: Config) -> dict[str, Any]:
    """``grpo`` (GRPOConfig): sizes, steps, validation, seed; our advantages are (r - mean)/(std + eps),
    so no leave-one-out baseline."""
    rollout, normalize = cfg.rollout, cfg.advantage.normalize_std
    return {
        "num_prompts_per_step": rollout.questions_per_step,
        "num_generations_per_prompt": rollout.group_size,
        "max_rollout_turns": rollout.max_turns,
        # Steps, not epochs, end a run (the data loader reshuffles each epoch), so epochs never bind.
        "max_num_epochs": cfg.rl.steps,
        "max_num_steps": cfg.rl.steps,
        "normalize_rewards": normalize,
        "use_leave_one_out_baseline": False,
        "val_period": cfg.nemo.val_period,
        "val_at_start": False,
        "val_at_end": cfg.nemo.val_period > 0,
        "overlong_filtering": False,
        "advantage_clip_low": None,
        "advantage_clip_high": None,
        "max_val_samples": cfg.eval.max_questions or 256,
        "val_batch_size": rollout.questions_per_step,
        "seed": cfg.seed,
        "use_dynamic_sampling": False,
        "dynamic_sampling_max_gen_batches": 10,
        "batch_multiplier": 1,
        "skip_reference_policy_logprobs_calculation": cfg.loss.kl_coef == 0.0,
        "reward_shaping": {"enabled": False},
        "reward_scaling": {"enabled": False},
        "adv_estimator": {
            "name": "grpo",
            "normalize_rewards": normalize,
            "use_leave_one_out_baseline": False,
        },
        "seq_logprob_error_threshold": None,
        "invalid_tool_call_advantage": None,
        "malformed_thinking_advantage": None,
        "async_grpo": {"enabled": False, "max_trajectory_age_steps": 1},
    }


def _checkpointing(cfg: Config, stage: str) -> dict[str, Any]:
    every = cfg.checkpoint.every
    return {
        "enabled": True,
        "checkpoint_dir": checkpoint_dir(cfg, stage),
        "metric_name": None,  # keep the newest keep_top_k, by recency
        "higher_is_better": True,
        "keep_top_k": cfg.checkpoint.keep_last,
        # every: 0 means "only at the end"; NeMo-RL always saves on the last step.
        "save_period": every if every > 0 else 10**9,
        "checkpoint_must_save_by": None,
        # v0.7.0's Policy.save_checkpoint raises for any format unless dtensor_cfg._v2 is on
        # (models/policy/lm_policy.py, save_checkpoint); the Megatron worker writes its own format
        "model_save_format": None,
        "save_consolidated": False,
        "save_optimizer": True,
    }


def _logger(cfg: Config, name: str) -> dict[str, Any]:
    log = cfg.logging
    return {
        "log_dir": str(Path(cfg.output_dir) / "nemo_logs"),
        "num_val_samples_to_print": 0,
        "wandb_enabled": log.wandb,
        "tensorboard_enabled": log.tensorboard,
        "mlflow_enabled": False,
        "swanlab_enabled": False,
        "monitor_gpus": True,
        "wandb": {"project": log.wandb_project, "name": name},
        "swanlab": {"project": log.wandb_project, "name": name},
        "tensorboard": {},
        "mlflow": {"experiment_name": log.wandb_project, "run_name": name},
        "gpu_monitoring": {"collection_interval": 10, "flush_interval": 10},
    }


def _cluster(cfg: Config) -> dict[str, Any]:
    return {"gpus_per_node": cfg.cluster.gpus_per_node, "num_nodes": cfg.cluster.num_nodes}


def _data(cfg: Config, seq_len: int) -> dict[str, Any]:
    """``data``: our loop feeds its own samples; these keys satisfy NeMo-RL's DataConfig."""
    return {
        "max_input_seq_length": seq_len,
        "shuffle": True,
        "num_workers": 1,
        "use_multiple_dataloader": False,
        "train": {"data_path": str(Path(cfg.data.dir or Path(cfg.output_dir) / "data"))},
        "validation": None,
        "default": None,
    }


def _axpo_section(cfg: Config) -> dict[str, Any]:
    """Our own settings, for the AXPO loop and for the saved config.yaml of each checkpoint."""
    return {
        "algorithm": cfg.algorithm,
        "resampling": {
            "r": cfg.axpo.r,
            "k": cfg.axpo.k,
            "selection": cfg.axpo.selection,
            "prefix_fixing": cfg.axpo.prefix_fixing,
            "prefix_credit": cfg.axpo.prefix_credit,
            "separate_groups": cfg.axpo.separate_groups,
        },
        "advantage_epsilon": cfg.advantage.epsilon,
        "max_rows_per_step": max_rows_per_step(cfg),
        "tool_workers": cfg.nemo.tool_workers,
        "freeze_vision_model": cfg.nemo.megatron.freeze_vision_model,
        "max_images": cfg.rollout.max_images,
    }


def _finish(cfg: Config, built: dict[str, Any]) -> dict[str, Any]:
    """Layer the NeMo-RL base YAML under ``built`` and ``nemo.overrides`` over it; resolve ``${...}``."""
    base = load_nemo_rl_yaml(cfg.nemo.nemo_rl_config) if cfg.nemo.nemo_rl_config else {}
    merged = deep_merge(deep_merge(base, built), cfg.nemo.overrides or {})
    try:
        return OmegaConf.to_container(OmegaConf.create(merged), resolve=True)
    except Exception as exc:  # an interpolation in the base YAML or the overrides that does not resolve
        raise ConfigError(
            f"nemo.overrides / nemo.nemo_rl_config: cannot resolve the master config: {exc}"
        ) from exc


def build_master_config(cfg: Config) -> dict[str, Any]:
    """The NeMo-RL v0.7.0 GRPO master config (``nemo_rl.algorithms.grpo.MasterConfig`` fields) for an
    AXPO or GRPO run of ``cfg``. See the module docstring for the key mapping."""
    rl, seq_len = cfg.rl, cfg.rollout.max_total_tokens
    optimizer, scheduler = _optimizer(cfg, rl.lr, rl.min_lr_ratio, rl.weight_decay, rl.warmup_steps, rl.steps)
    policy = _policy(
        cfg, seq_len=seq_len, gbs=train_global_batch_size(cfg),
        megatron_cfg=_megatron_cfg(cfg, optimizer, scheduler), max_grad_norm=rl.grad_clip,
        generation=_generation(cfg),
    )  # fmt: skip
    name = f"{cfg.algorithm}-{Path(cfg.output_dir).name}"
    built = {
        "policy": policy,
        "loss_fn": _loss_fn(cfg),
        "grpo": _grpo(cfg),
        "checkpointing": _checkpointing(cfg, "rl"),
        "logger": _logger(cfg, name),
        "cluster": _cluster(cfg),
        "data": _data(cfg, seq_len),
        "env": {},  # tools run in AXPO's Ray tool pool, not in a NeMo-RL environment
        "axpo": _axpo_section(cfg),
    }
    return _finish(cfg, built)


def build_sft_master_config(cfg: Config) -> dict[str, Any]:
    """The NeMo-RL v0.7.0 SFT master config (``nemo_rl.algorithms.sft.MasterConfig`` fields):
    ``sft.batch_size`` rows per optimizer step, ``sft.max_tokens`` per sequence, ``sft.lr`` etc. on
    Megatron's optimizer; no generation section."""
    sft, seq_len = cfg.sft, cfg.sft.max_tokens
    optimizer, scheduler = _optimizer(
        cfg, sft.lr, sft.min_lr_ratio, sft.weight_decay, sft.warmup_steps, sft.steps or None
    )
    policy = _policy(
        cfg, seq_len=seq_len, gbs=sft.batch_size, megatron_cfg=_megatron_cfg(cfg, optimizer, scheduler),
        max_grad_norm=sft.grad_clip, generation=None,
    )  # fmt: skip
    built = {
        "policy": policy,
        "sft": {
            "max_num_steps": sft.steps or 10**9,  # 0: epochs decide
            "max_num_epochs": sft.epochs,
            "val_period": cfg.nemo.val_period,
            "val_batches": 8,
            "val_global_batch_size": sft.batch_size,
            "val_micro_batch_size": cfg.nemo.megatron.train_micro_batch_size,
            "val_at_start": False,
            "val_at_end": False,
            "seed": sft.seed,
            "only_unmask_final": False,
        },
        "checkpointing": _checkpointing(cfg, "sft"),
        "logger": _logger(cfg, f"sft-{Path(cfg.output_dir).name}"),
        "cluster": _cluster(cfg),
        "data": {**_data(cfg, seq_len), "add_bos": False, "add_eos": False, "add_generation_prompt": False},
        "axpo": _axpo_section(cfg),
    }
    return _finish(cfg, built)

"""Config sections of the NeMo-RL cluster backend: the machines (`ClusterConfig`) and how the policy
is laid out on them (`NemoConfig`: Megatron-Core training, colocated vLLM generation, Ray tool workers).

The local backend ignores both sections. Checks that only need one field's value (bounds, choices)
live here and fail at load time; checks that need the model architecture or several sections at once
(heads divisible by TP, world size, batch divisibility, memory) live in `axpo plan`
(`axpo_nemo.nemo.cluster_plan`). `axpo_nemo.nemo.master_config` documents which NeMo-RL key each field sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from axpo_nemo.core.config import ValidatedConfig, setting

RECOMPUTE_MODES = ("none", "selective", "full")
FP8_RECIPES = ("blockwise", "tensorwise")
BATCHING_MODES = ("none", "dynamic", "packing")
VLLM_PRECISIONS = ("bfloat16", "fp8")
#: Megatron-Core modules a dense model can recompute selectively (``recompute: selective``).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
#: Architectures `axpo plan` knows without reading a config.json (see `axpo_nemo.nemo.cluster_plan.ARCHITECTURES`).
ARCHITECTURE_NAMES = ("qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b")


@dataclass
class ClusterConfig(ValidatedConfig):
    """The machines a NeMo-RL run gets (``sbatch --nodes`` x ``--gres=gpu:N``)."""

    num_nodes: int = setting(
        1, "Nodes in the Ray cluster (NeMo-RL cluster.num_nodes; equals sbatch --nodes).", ge=1
    )
    gpus_per_node: int = setting(8, "GPUs per node (NeMo-RL cluster.gpus_per_node).", ge=1)
    gpu_memory_gib: float = setting(
        80.0, "Memory of one GPU in GiB; `axpo plan` fails when its per-GPU estimate exceeds it.", gt=0.0
    )
    step_minutes: float = setting(
        10.0,
        "The longest training step this job expects, in minutes (set it from the first steps' "
        "timings). With the checkpoint's write time it sizes the SIGUSR1 lead that `axpo plan` "
        "prints: the signal must leave time to finish the step and save.",
        gt=0.0,
    )
    checkpoint_write_gbps: float = setting(
        1.0,
        "Write bandwidth of the checkpoint folder's filesystem for this job, in GB/s (`axpo plan` "
        "sizes the save time with it).",
        gt=0.0,
    )


@dataclass
class MegatronConfig(ValidatedConfig):
    """The Megatron-Core policy: parallel layout, recompute, optimizer sharding, FP8 and batching."""

    tensor_parallel: int = setting(
        1, "Tensor-parallel size TP; must divide the attention heads and the KV heads.", ge=1
    )
    pipeline_parallel: int = setting(1, "Pipeline-parallel size PP; must divide the decoder layers.", ge=1)
    context_parallel: int = setting(
        1, "Context-parallel size CP (splits each sequence); > 1 needs batching: packing.", ge=1
    )
    sequence_parallel: bool = setting(
        False, "Megatron sequence parallelism (shards norms/dropout activations over TP); needs TP > 1."
    )
    recompute: str = setting(
        "selective",
        "Activation recompute: 'none', 'selective' (recompute_modules only) or 'full' (every layer "
        "keeps only its input and recomputes the rest in backward).",
        choices=RECOMPUTE_MODES,
    )
    recompute_modules: list[str] | None = setting(
        None,
        "Modules recomputed when recompute is 'selective'; null: Megatron's default ['core_attn'].",
        choices=RECOMPUTE_MODULES,
    )
    distributed_optimizer: bool = setting(
        True, "Shard the fp32 master weights and Adam moments over the data-parallel ranks (ZeRO-1)."
    )
    grad_reduce_in_fp32: bool = setting(
        False, "Keep the gradient buffer in fp32 (4 bytes/param) instead of bf16 (2 bytes/param)."
    )
    fp8: bool = setting(
        False,
        "FP8 training GEMMs through Transformer Engine (Hopper); also turns on FP8 vLLM rollouts and "
        "importance-sampling correction, as NeMo-RL's FP8 recipe does.",
    )
    fp8_recipe: str = setting(
        "blockwise", "Transformer Engine FP8 scaling recipe when fp8 is on.", choices=FP8_RECIPES
    )
    train_global_batch_size: int | None = setting(
        None,
        "Rows per optimizer step. null: one optimizer step per RL step, i.e. the largest step "
        "(B·N + M·K rows) rounded up to a multiple of DP·train_micro_batch_size. A step's rows are "
        "padded with zero-weight rows to a multiple of it.",
        ge=1,
    )
    train_micro_batch_size: int = setting(1, "Sequences per training micro-batch on one DP rank.", ge=1)
    logprob_batch_size: int = setting(
        1,
        "Sequences per logprob (old/reference policy) forward on one DP rank; = micro-batch when TP >= 4.",
        ge=1,
    )
    batching: str = setting(
        "dynamic",
        "Micro-batching of variable-length rows: 'dynamic' (token-budgeted micro-batches; needs PP 1), "
        "'packing' (sequence packing; needed for CP > 1) or 'none' (pad every micro-batch).",
        choices=BATCHING_MODES,
    )
    freeze_vision_model: bool = setting(False, "Train the language model only; the vision tower stays fixed.")
    optimizer_cpu_offload: bool = setting(
        False, "Keep the optimizer states in CPU memory (Megatron hybrid CPU optimizer, fraction 1.0)."
    )


@dataclass
class VllmConfig(ValidatedConfig):
    """The vLLM generator that runs the rollouts and the prefix-frozen resampling."""

    tensor_parallel: int = setting(
        1, "vLLM tensor-parallel size; must divide the attention heads and cluster.gpus_per_node.", ge=1
    )
    gpu_memory_utilization: float = setting(
        0.6,
        "Fraction of each GPU's memory vLLM takes for weights and KV cache while it generates "
        "(colocated: released to training through sleep mode).",
        gt=0.0,
        lt=1.0,
    )
    enable_prefix_caching: bool = setting(
        True, "Reuse KV blocks of shared prefixes (the K continuations of a frozen prefix share its cache)."
    )
    precision: str = setting(
        "bfloat16", "Rollout weight precision; megatron.fp8 forces 'fp8'.", choices=VLLM_PRECISIONS
    )
    max_model_len: int | None = setting(
        None, "Longest sequence vLLM accepts; null: rollout.max_total_tokens.", ge=16
    )
    enforce_eager: bool = setting(
        False, "Disable CUDA graphs in vLLM (slower, less memory, easier debugging)."
    )


@dataclass
class NemoConfig(ValidatedConfig):
    """The NeMo-RL backend (``backend: nemo``): Megatron policy, vLLM generation, Ray tool workers."""

    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    colocated: bool = setting(
        True, "Run vLLM on the training GPUs (sleep/wake between phases) instead of dedicated GPUs."
    )
    tool_workers: int = setting(8, "Ray actors executing tool calls (the size of the tool pool).", ge=1)
    val_period: int = setting(0, "Validate (Pass@k) every this many RL steps; 0: off.", ge=0)
    architecture: str | None = setting(
        None,
        "Model architecture for `axpo plan`; null: read model.name/config.json, else infer from the "
        "name (e.g. 'Qwen3-VL-8B').",
        choices=ARCHITECTURE_NAMES,
    )
    nemo_rl_config: str | None = setting(
        None,
        "A NeMo-RL YAML (its own defaults: chain is followed) to start the master config from; "
        "null: the built-in defaults. Our settings are merged over it.",
    )
    overrides: dict[str, Any] = setting(
        {},
        "Any NeMo-RL master-config keys, deep-merged last (the escape hatch), e.g. "
        "+nemo.overrides.policy.megatron_cfg.apply_rope_fusion=false.",
    )

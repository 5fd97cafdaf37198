"""The cluster plan's third part: bytes per GPU for each phase of a colocated step, and how long a
checkpoint takes to write (what the SIGUSR1 lead before the time limit must cover).

The formulas are written next to the code and in docs/cluster.md.
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field

from axpo_nemo.config.schema import Config
from axpo_nemo.nemo.cluster_layout import Architecture, training_sequence_length

GIB = 2**30
#: Bytes a Megatron checkpoint holds per parameter: bf16 weights (2), the distributed optimizer's
#: fp32 main copy (4) and Adam's two fp32 moments (8); NeMo-RL saves the optimizer with the model.
CHECKPOINT_BYTES_PER_PARAM = 14
#: SIGUSR1 lead beyond one step and the checkpoint write: Ray shutdown, requeue, filesystem jitter.
SIGNAL_MARGIN_S = 120
#: Share of a micro-batch's tokens assumed to be image tokens when sizing the vision tower's
#: activations (a question image plus tool crops in an 8k-token trajectory).
IMAGE_TOKEN_SHARE = 0.5
#: Per-GPU memory outside the model: the CUDA contexts of the Megatron and vLLM processes
#: (~1 GiB each), NCCL communicators and buffers, and allocator fragmentation.
RUNTIME_OVERHEAD_GIB = 4.0
#: Bytes per logit element at the loss: bf16 logits + fp32 copy + fp32 log-softmax kept for backward.
LOGIT_BYTES = 10


@dataclass
class MemoryRow:
    """One line of the memory table."""

    item: str
    gib: float
    formula: str


@dataclass
class MemoryEstimate:
    """Per-GPU memory (GiB) of the busiest pipeline stage, per phase of a colocated step."""

    stage: str
    training: list[MemoryRow]
    training_total_gib: float
    generation: list[MemoryRow]
    generation_total_gib: float
    refit_total_gib: float
    peak_gib: float
    gpu_memory_gib: float
    kv_cache_gib: float
    kv_cache_sequences: float
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether every phase fits the GPU and vLLM has room for a full-length sequence."""
        return not self.problems


def _stage_params(arch: Architecture, tp: int, pp: int) -> dict[str, int]:
    """Parameters held by one GPU of the first and of the last pipeline stage.

    Decoder layers split evenly over PP and everything over TP. The first stage holds the embedding
    and the vision tower; the last the output layer (with PP > 1 a tied embedding is kept there as a
    copy, as Megatron does). With PP = 1 both are the same GPU.
    """
    layers = arch.num_layers // pp * arch.layer_params()
    emb, vision = arch.embedding_params(), arch.vision_params()
    if pp == 1:
        first = layers + emb + (0 if arch.tied_embeddings else emb) + vision + arch.hidden_size
        return {"first": math.ceil(first / tp), "first_vision": math.ceil(vision / tp)}
    return {
        "first": math.ceil((layers + emb + vision) / tp),
        "first_vision": math.ceil(vision / tp),
        "last": math.ceil((layers + emb + arch.hidden_size) / tp),
    }


def activation_bytes_per_token_layer(arch: Architecture, cfg: Config) -> tuple[float, float]:
    """Activation bytes one decoder layer keeps per token for backward: (stored, one layer in full).

    A Qwen3-VL layer in bf16 with flash attention (no s² scores, no dropout; after Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", adapted to GQA, QK-norm
    and SwiGLU), with q = heads·head_dim, k = kv_heads·head_dim, I = MLP width, h = hidden size:

    * replicated over TP unless sequence parallel: norm inputs and linear inputs, 4h values;
    * sharded over TP: q/k-norm inputs (q + k), q, k, v (q + 2k), the attention output (q), the
      gate and up projections (2I) and the SwiGLU output (I): 3q + 3k + 3I values;

    so ``full = 2·(4h/s + (3q + 3k + 3I)/t)`` bytes, s = t with SP, else 1. Recompute keeps:
    ``none`` all of it; ``selective`` drops ``mlp`` → 2·(h + 3I)/t-part, ``layernorm`` → the two
    normalised linear inputs (2h); ``core_attn`` changes nothing here (flash attention already
    keeps no score matrix); ``full`` only the layer input, 2h/s bytes.
    """
    meg = cfg.nemo.megatron
    t = meg.tensor_parallel
    s = t if meg.sequence_parallel else 1
    h, q, k, i = arch.hidden_size, arch.query_width, arch.kv_width, arch.intermediate_size
    full = 2 * (4 * h / s + (3 * q + 3 * k + 3 * i) / t)
    if meg.recompute == "none":
        return full, full
    if meg.recompute == "full":
        return 2 * h / s, full
    modules = meg.recompute_modules or ["core_attn"]
    stored = full
    if "mlp" in modules:
        stored -= 2 * (h / s + 3 * i / t)
    if "layernorm" in modules:
        stored -= 2 * h / s * (1 if "mlp" in modules else 2)  # mlp recompute already dropped its norm output
    return stored, full


def vision_activation_bytes_per_patch_layer(arch: Architecture, cfg: Config) -> float:
    """Activation bytes one vision block keeps per patch: the same count for a ViT block with a GELU
    MLP, ``2·(4h/s + (4h + 2I)/t)`` (no recompute: the tower runs once per step's micro-batch)."""
    meg = cfg.nemo.megatron
    t = meg.tensor_parallel
    s = t if meg.sequence_parallel else 1
    h, i = arch.vision_hidden_size, arch.vision_intermediate_size
    return 2 * (4 * h / s + (4 * h + 2 * i) / t)


def estimate_memory(cfg: Config, arch: Architecture) -> MemoryEstimate:
    """Per-GPU memory of the busiest pipeline stage in each phase of a colocated step.

    * **training** (vLLM asleep: its weights and KV cache released through sleep mode, only its CUDA
      context left, counted in the overhead): weights + FP8 weight caches + gradient buffer +
      optimizer states + activations + logits + overhead;
    * **generation** (the Megatron policy offloaded to CPU after the refit): the vLLM share
      ``gpu_memory_utilization · GPU memory`` + overhead;
    * **refit** (policy weights on GPU, optimizer and gradients offloaded, vLLM weights woken):
      bf16 policy weights + vLLM weights + overhead.

    The peak is the largest phase; it must fit ``cluster.gpu_memory_gib``, and vLLM's share must hold
    its weights plus the KV cache of one ``max_model_len`` sequence.
    """
    meg, vllm = cfg.nemo.megatron, cfg.nemo.vllm
    t, pp, cp = meg.tensor_parallel, meg.pipeline_parallel, meg.context_parallel
    world = cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    dp = max(1, world // (t * pp * cp))
    params = _stage_params(arch, t, pp)
    seq_len = training_sequence_length(cfg)
    rl = "rl" in cfg.train.stages
    tokens = seq_len * meg.train_micro_batch_size / cp
    logit_tokens = seq_len * max(meg.train_micro_batch_size, meg.logprob_batch_size if rl else 1) / cp
    stored, full_layer = activation_bytes_per_token_layer(arch, cfg)
    layers_per_stage = arch.num_layers // pp if arch.num_layers % pp == 0 else math.ceil(arch.num_layers / pp)
    grad_bytes = 4 if meg.grad_reduce_in_fp32 else 2
    # Megatron distributed optimizer (docs: 4 + 16/d bytes/param with bf16 grads, 6 + 12/d with fp32
    # grads): fp32 master weights (4) + Adam moments (8) + an fp32 main-grad copy (4) unless the
    # gradient buffer is already fp32; sharded over the data-parallel (x context-parallel) ranks.
    optim_bytes = 12 + (0 if meg.grad_reduce_in_fp32 else 4)
    shards = dp * cp if meg.distributed_optimizer else 1

    stages = []
    for stage in ("first", "last") if pp > 1 else ("first",):
        n = params[stage]
        trainable = n - (params["first_vision"] if stage == "first" and meg.freeze_vision_model else 0)
        in_flight = pp if stage == "first" else 1  # 1F1B: stage 0 holds PP micro-batches
        rows = [
            MemoryRow("weights (bf16)", 2 * n / GIB, f"2 B x {n:,} params"),
        ]
        if meg.fp8:
            rows.append(MemoryRow("FP8 weight copies (TE)", 2 * n / GIB, "row- + column-wise FP8, 2 B/param"))
        rows.append(MemoryRow(f"gradients ({'fp32' if grad_bytes == 4 else 'bf16'})", grad_bytes * trainable / GIB,
                              f"{grad_bytes} B x {trainable:,} trainable params"))  # fmt: skip
        optim = 0.0 if meg.optimizer_cpu_offload else optim_bytes * trainable / shards
        rows.append(MemoryRow("optimizer (fp32 master + Adam)", optim / GIB,
                              "on CPU" if meg.optimizer_cpu_offload else f"{optim_bytes} B x params / {shards}"))  # fmt: skip
        # Every stored layer, plus what backward recomputes for one layer at a time.
        act = tokens * (layers_per_stage * stored * in_flight + (full_layer - stored))
        rows.append(MemoryRow(f"activations ({meg.recompute})", act / GIB,
                              f"{tokens:.0f} tok x {layers_per_stage} layers x {stored:,.0f} B x {in_flight} in flight"))  # fmt: skip
        if stage == "first" and not meg.freeze_vision_model and arch.vision_depth:
            patches = tokens * IMAGE_TOKEN_SHARE * arch.spatial_merge_size**2
            vis = patches * arch.vision_depth * vision_activation_bytes_per_patch_layer(arch, cfg) * in_flight
            rows.append(MemoryRow("vision activations", vis / GIB,
                                  f"{patches:.0f} patches x {arch.vision_depth} blocks"))  # fmt: skip
        if stage == "last" or pp == 1:
            logits = logit_tokens * arch.vocab_size / t * LOGIT_BYTES
            rows.append(MemoryRow("logits + log-softmax", logits / GIB,
                                  f"{logit_tokens:.0f} tok x {arch.vocab_size}/{t} vocab x {LOGIT_BYTES} B"))  # fmt: skip
        rows.append(MemoryRow("runtime overhead", RUNTIME_OVERHEAD_GIB, "CUDA contexts, NCCL, fragmentation"))
        stages.append((stage, rows, sum(r.gib for r in rows), n))
    stage, training, training_total, stage_params = max(stages, key=lambda s: s[2])

    gpu = cfg.cluster.gpu_memory_gib
    share = vllm.gpu_memory_utilization * gpu
    fp8_rollout = meg.fp8 or vllm.precision == "fp8"
    text_linear = arch.num_layers * arch.layer_params()
    vllm_weight_bytes = (1 if fp8_rollout else 2) * text_linear + 2 * (arch.total_params() - text_linear)
    vllm_weights = vllm_weight_bytes / vllm.tensor_parallel / GIB
    kv_heads_per_gpu = max(1, arch.num_kv_heads // vllm.tensor_parallel)
    kv_bytes_per_token = 2 * arch.num_layers * kv_heads_per_gpu * arch.head_dim * 2
    vllm_runtime = 2.0  # vLLM's own activation peak and CUDA graphs inside its share
    kv_cache = max(0.0, share - vllm_weights - vllm_runtime)
    max_len = vllm.max_model_len or cfg.rollout.max_total_tokens
    kv_sequences = kv_cache * GIB / kv_bytes_per_token / max_len
    generation = [
        MemoryRow(
            "vLLM weights",
            vllm_weights,
            f"{'fp8' if fp8_rollout else 'bf16'} / vLLM TP {vllm.tensor_parallel}",
        ),
        MemoryRow("vLLM KV cache", kv_cache, f"{kv_sequences:.1f} sequences of {max_len} tokens"),
        MemoryRow("vLLM activations, CUDA graphs", vllm_runtime, "inside the share"),
        MemoryRow("runtime overhead", RUNTIME_OVERHEAD_GIB, "policy process offloaded to CPU"),
    ]
    generation_total = share + RUNTIME_OVERHEAD_GIB
    refit_total = 2 * stage_params / GIB + vllm_weights + RUNTIME_OVERHEAD_GIB
    if not rl:  # SFT only: no generator on the GPUs
        generation, generation_total, refit_total, kv_cache, kv_sequences = [], 0.0, 0.0, 0.0, 0.0
    peak = max(training_total, generation_total if cfg.nemo.colocated else 0.0, refit_total)

    problems = []
    if training_total > gpu:
        problems.append(
            f"training needs {training_total:.1f} GiB per GPU > cluster.gpu_memory_gib={gpu:g}: raise "
            "nemo.megatron.tensor_parallel/pipeline_parallel, use recompute: full, a smaller "
            "train_micro_batch_size or rollout.max_total_tokens, or more nodes for the optimizer shards"
        )
    if generation_total > gpu:
        problems.append(
            f"nemo.vllm.gpu_memory_utilization: generation takes {generation_total:.1f} GiB per GPU > {gpu:g}"
        )
    if refit_total > gpu:
        problems.append(
            f"nemo.vllm.tensor_parallel: the weight refit needs {refit_total:.1f} GiB per GPU > {gpu:g}"
        )
    if rl and kv_sequences < 1:
        problems.append(
            f"nemo.vllm.gpu_memory_utilization: vLLM's share ({share:.1f} GiB) leaves {kv_cache:.1f} GiB of KV "
            f"cache, less than one {max_len}-token sequence; raise it or nemo.vllm.tensor_parallel"
        )
    return MemoryEstimate(
        stage=stage if pp > 1 else "only",
        training=training,
        training_total_gib=training_total,
        generation=generation,
        generation_total_gib=generation_total,
        refit_total_gib=refit_total,
        peak_gib=peak,
        gpu_memory_gib=gpu,
        kv_cache_gib=kv_cache,
        kv_cache_sequences=kv_sequences,
        problems=problems,
    )


@dataclass
class CheckpointTiming:
    """How big a checkpoint is, how long it takes to write, and the SIGUSR1 lead that covers it.

    A job told to stop (``#SBATCH --signal=B:USR1@<lead>``) finishes its step, saves and exits
    before the time limit only when ``lead >= step + write + margin``.
    """

    size_gb: float
    write_s: float
    step_s: float
    usr1_lead_s: int


def checkpoint_timing(cfg: Config, arch: Architecture) -> CheckpointTiming:
    """Size one checkpoint of ``arch`` and the SIGUSR1 lead of a job running ``cfg``."""
    size_gb = arch.total_params() * CHECKPOINT_BYTES_PER_PARAM / 1e9
    write_s = size_gb / cfg.cluster.checkpoint_write_gbps
    step_s = cfg.cluster.step_minutes * 60.0
    return CheckpointTiming(size_gb, write_s, step_s, math.ceil(step_s + write_s + SIGNAL_MARGIN_S))

"""`axpo plan`: check a cluster config's parallel layout and estimate per-GPU memory, without a GPU.

Framework-free (no NeMo-RL, Megatron or vLLM import), so it runs in CI and on a laptop before a job
is submitted. Three parts:

1. **Architecture** (`Architecture`): the Qwen3-VL text decoder and vision tower sizes, from the
   table below (the Hugging Face ``config.json`` values of Qwen3-VL-2B/4B/8B/32B; the -Instruct and
   -Thinking variants share them), from ``model.name/config.json`` when ``model.name`` is a local
   folder, or by the explicit ``nemo.architecture``.
2. **Layout checks** (`check_layout`): every rule Megatron-Core, vLLM and NeMo-RL v0.7.0 enforce at
   start-up (or that makes a run pointless), each reported with the config key to change.
3. **Memory estimate** (`estimate_memory`): bytes per GPU for each phase of a colocated step, with
   the formulas written next to the code and in docs/cluster.md.

Rules checked (source of each in parentheses):

* world = cluster.num_nodes · cluster.gpus_per_node must be a multiple of TP·PP·CP; DP is the
  quotient (NeMo-RL ``lm_policy.py``: world % (PP·CP·TP) == 0).
* TP divides the attention heads **and** the KV heads (query groups), the MLP width, and the vision
  tower's heads (Megatron-Core attention: ``divide(num_attention_heads, tp)`` and
  ``divide(num_query_groups, tp)``; column-parallel linears divide their output width by TP).
* PP divides the decoder layers (uniform split; NeMo-RL leaves ``num_layers_in_first/last_pipeline_stage``
  unset).
* sequence parallelism needs TP > 1; CP > 1 needs sequence packing (NeMo-RL ``megatron/setup.py``);
  dynamic batching needs PP = 1 (NeMo-RL ``lm_policy.py``).
* TP >= 4 needs ``train_micro_batch_size == logprob_batch_size`` (NeMo-RL ``lm_policy.py`` asserts this
  against a batch-variant logprob error).
* vLLM TP divides the attention heads, and either divides the KV heads or is a multiple of them
  (vLLM replicates KV heads then); it divides ``gpus_per_node`` (one engine stays inside a node) and
  the world size (colocated engines tile the GPUs).
* the global batch is a multiple of DP·micro-batch (each DP rank gets whole micro-batches;
  NeMo-RL ``megatron_policy_worker.train``: ``local_gbs = gbs // dp``, ``local_gbs // mbs`` micro-batches).
  An RL step's rows (B·N originals + up to M·K resampled, M = floor(r·B·N/K)) are padded with
  zero-weight rows up to a multiple of the global batch (see `master_config.train_global_batch_size`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axpo_nemo.config.schema import Config
from axpo_nemo.nemo.master_config import (
    make_sequence_length_divisible_by,
    max_rows_per_step,
    train_global_batch_size,
)

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


@dataclass(frozen=True)
class Architecture:
    """Sizes of a Qwen3-VL model (text decoder + vision tower), as in its Hugging Face config.json."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    vision_out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    deepstack_layers: int = 3
    num_position_embeddings: int = 2304

    @property
    def query_width(self) -> int:
        """Attention query projection width: heads · head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Key (= value) projection width: KV heads · head_dim."""
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/k/v/o projections (no bias), q/k RMSNorm, two RMSNorms,
        SwiGLU MLP (gate, up, down)."""
        h, q, k, i = self.hidden_size, self.query_width, self.kv_width, self.intermediate_size
        return h * q + 2 * h * k + q * h + 2 * self.head_dim + 2 * h + 3 * h * i

    def embedding_params(self) -> int:
        """Parameters of the token embedding (the output layer has as many when untied)."""
        return self.vocab_size * self.hidden_size

    def vision_params(self) -> int:
        """Parameters of the vision tower: patch embedding (Conv3d with bias), learned position
        embedding, ViT blocks (LayerNorms, qkv/proj and fc1/fc2 with biases), the patch merger and
        the DeepStack mergers (LayerNorm + two linears over merged 2x2 patches)."""
        h, i = self.vision_hidden_size, self.vision_intermediate_size
        patch_in = 3 * self.temporal_patch_size * self.patch_size**2
        params = patch_in * h + h + self.num_position_embeddings * h
        params += self.vision_depth * (4 * h + 4 * h * h + 4 * h + 2 * h * i + i + h)
        merged = h * self.spatial_merge_size**2

        def merger(norm_width: int) -> int:
            return (
                2 * norm_width
                + merged * merged
                + merged
                + merged * self.vision_out_hidden_size
                + self.vision_out_hidden_size
            )

        return params + merger(h) + self.deepstack_layers * merger(merged)

    def total_params(self) -> int:
        """All parameters (text + vision), counting a tied output layer once."""
        embeddings = self.embedding_params() * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params() + embeddings + self.hidden_size + self.vision_params()


def _qwen3_vl(
    name: str, text: tuple[int, ...], tied: bool, vision: tuple[int, int, int, int]
) -> Architecture:
    layers, hidden, heads, kv_heads, intermediate = text
    depth, v_hidden, v_intermediate, v_out = vision
    return Architecture(
        name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=128, intermediate_size=intermediate, vocab_size=151936, tied_embeddings=tied,
        vision_depth=depth, vision_hidden_size=v_hidden, vision_intermediate_size=v_intermediate,
        vision_num_heads=16, vision_out_hidden_size=v_out,
    )  # fmt: skip


#: Hugging Face config.json values of Qwen/Qwen3-VL-{2B,4B,8B,32B}-{Instruct,Thinking}. Check: the
#: parameter counts these give (2,127,532,032 / 4,437,815,808 / 8,767,123,696 / 33,357,390,064) match
#: the published model sizes (2B: 2,127,532,032 exactly).
ARCHITECTURES: dict[str, Architecture] = {
    "qwen3-vl-2b": _qwen3_vl("qwen3-vl-2b", (28, 2048, 16, 8, 6144), True, (24, 1024, 4096, 2048)),
    "qwen3-vl-4b": _qwen3_vl("qwen3-vl-4b", (36, 2560, 32, 8, 9728), True, (24, 1024, 4096, 2560)),
    "qwen3-vl-8b": _qwen3_vl("qwen3-vl-8b", (36, 4096, 32, 8, 12288), False, (27, 1152, 4304, 4096)),
    "qwen3-vl-32b": _qwen3_vl("qwen3-vl-32b", (64, 5120, 64, 8, 25600), False, (27, 1152, 4304, 5120)),
}


class PlanError(ValueError):
    """The architecture cannot be determined; the message names the config key to set."""


def architecture_from_hf_config(config: dict[str, Any], name: str) -> Architecture:
    """Build an `Architecture` from a Qwen3-VL ``config.json`` (``text_config`` + ``vision_config``)."""
    text = config.get("text_config", config)
    vision = config.get("vision_config", {})
    try:
        heads = int(text["num_attention_heads"])
        return Architecture(
            name=name,
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=int(text["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
            intermediate_size=int(text["intermediate_size"]),
            vocab_size=int(text["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision_depth=int(vision.get("depth", 0)),
            vision_hidden_size=int(vision.get("hidden_size", 0)),
            vision_intermediate_size=int(vision.get("intermediate_size", 0)),
            vision_num_heads=int(vision.get("num_heads", 1)),
            vision_out_hidden_size=int(vision.get("out_hidden_size", text["hidden_size"])),
            patch_size=int(vision.get("patch_size", 16)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            deepstack_layers=len(vision.get("deepstack_visual_indexes", [])),
            num_position_embeddings=int(vision.get("num_position_embeddings", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{name}: not a Qwen3-VL config.json (missing or bad {exc})") from exc


def resolve_architecture(cfg: Config) -> Architecture:
    """The architecture to plan for: ``nemo.architecture``, else ``model.name``'s config.json when it is
    a local folder, else the size named in ``model.name`` (e.g. ``Qwen/Qwen3-VL-8B-Thinking``)."""
    if cfg.nemo.architecture:
        return ARCHITECTURES[cfg.nemo.architecture]
    folder = Path(cfg.model.name)
    if (folder / "config.json").is_file():
        config_path = folder / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"model.name: cannot read {config_path}: {exc}") from exc
        return architecture_from_hf_config(config, str(config_path))
    match = re.search(r"qwen3-vl-(\d+)b", cfg.model.name, re.IGNORECASE)
    if match and f"qwen3-vl-{match[1]}b" in ARCHITECTURES:
        return ARCHITECTURES[f"qwen3-vl-{match[1]}b"]
    known = ", ".join(ARCHITECTURES)
    raise PlanError(
        f"model.name: cannot tell the architecture of {cfg.model.name!r} (no config.json there and no "
        f"known size in the name); set nemo.architecture to one of {known}"
    )


@dataclass
class Layout:
    """The parallel layout a config asks for."""

    num_gpus: int
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    vllm_tp: int
    vllm_engines: int
    global_batch_size: int
    micro_batch_size: int
    rows_per_step_max: int
    optimizer_steps_per_rl_step: int
    sequence_length: int
    pad_sequences_to: int


def build_layout(cfg: Config) -> Layout:
    """The layout (DP derived as world / (TP·PP·CP), rounded down when it does not divide)."""
    meg, world = cfg.nemo.megatron, cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    model_parallel = meg.tensor_parallel * meg.pipeline_parallel * meg.context_parallel
    dp = max(1, world // model_parallel)
    gbs = train_global_batch_size(cfg)
    rows = max_rows_per_step(cfg)
    return Layout(
        num_gpus=world,
        tp=meg.tensor_parallel,
        pp=meg.pipeline_parallel,
        cp=meg.context_parallel,
        dp=dp,
        sequence_parallel=meg.sequence_parallel,
        vllm_tp=cfg.nemo.vllm.tensor_parallel,
        vllm_engines=max(1, world // cfg.nemo.vllm.tensor_parallel),
        global_batch_size=gbs,
        micro_batch_size=meg.train_micro_batch_size,
        rows_per_step_max=rows,
        optimizer_steps_per_rl_step=math.ceil(rows / gbs),
        sequence_length=training_sequence_length(cfg),
        pad_sequences_to=make_sequence_length_divisible_by(cfg),
    )


def _divides(part: int, whole: int) -> bool:
    return part > 0 and whole % part == 0


def check_layout(cfg: Config, arch: Architecture) -> tuple[list[str], list[str]]:
    """Check the parallel layout against the model and the cluster.

    Returns ``(errors, warnings)``; every message starts with the config key to change.
    """
    errors: list[str] = []
    warnings: list[str] = []
    meg, vllm, cluster = cfg.nemo.megatron, cfg.nemo.vllm, cfg.cluster
    tp, pp, cp = meg.tensor_parallel, meg.pipeline_parallel, meg.context_parallel
    world = cluster.num_nodes * cluster.gpus_per_node

    if world % (tp * pp * cp):
        errors.append(
            f"cluster.num_nodes: {cluster.num_nodes} nodes x {cluster.gpus_per_node} GPUs = {world} GPUs is not "
            f"a multiple of TP·PP·CP = {tp}·{pp}·{cp} = {tp * pp * cp} (nemo.megatron.tensor_parallel, "
            "pipeline_parallel, context_parallel); world = TP·PP·CP·DP"
        )
    for what, count in (
        ("attention heads", arch.num_heads),
        ("KV heads (query groups)", arch.num_kv_heads),
        ("MLP width (intermediate_size)", arch.intermediate_size),
        ("vision tower heads", arch.vision_num_heads),
    ):
        if count and not _divides(tp, count):
            errors.append(
                f"nemo.megatron.tensor_parallel: TP={tp} does not divide the {count} {what} of {arch.name}"
            )
    if tp > cluster.gpus_per_node:
        warnings.append(
            f"nemo.megatron.tensor_parallel: TP={tp} spans nodes (gpus_per_node={cluster.gpus_per_node}); "
            "tensor parallelism wants NVLink"
        )
    if not _divides(pp, arch.num_layers):
        errors.append(
            f"nemo.megatron.pipeline_parallel: PP={pp} does not divide the {arch.num_layers} layers of {arch.name}"
        )
    if meg.sequence_parallel and tp == 1:
        errors.append(
            "nemo.megatron.sequence_parallel: sequence parallelism needs nemo.megatron.tensor_parallel > 1"
        )
    if cp > 1 and meg.batching != "packing":
        errors.append(
            "nemo.megatron.batching: context parallelism (CP > 1) needs batching: packing in NeMo-RL"
        )
    fusion = ((cfg.nemo.overrides or {}).get("policy") or {}).get("megatron_cfg", {}).get("apply_rope_fusion")
    if meg.batching == "packing" and fusion:
        errors.append(
            "nemo.overrides.policy.megatron_cfg.apply_rope_fusion: fused RoPE with batching: packing gives "
            "Qwen3-VL logprobs that do not match (Megatron-Bridge issue 1776); leave it off"
        )
    if meg.batching == "dynamic" and pp > 1:
        errors.append(
            "nemo.megatron.batching: dynamic batching needs PP = 1 in NeMo-RL; use batching: packing"
        )
    if tp >= 4 and meg.train_micro_batch_size != meg.logprob_batch_size:
        errors.append(
            f"nemo.megatron.logprob_batch_size: with TP={tp} (>= 4) NeMo-RL requires logprob_batch_size == "
            f"train_micro_batch_size ({meg.logprob_batch_size} != {meg.train_micro_batch_size})"
        )
    if meg.recompute != "selective" and meg.recompute_modules:
        warnings.append("nemo.megatron.recompute_modules: only used with recompute: selective")
    if meg.optimizer_cpu_offload and not meg.distributed_optimizer:
        errors.append(
            "nemo.megatron.optimizer_cpu_offload: Megatron's CPU optimizer needs distributed_optimizer: true"
        )

    vtp = vllm.tensor_parallel
    if not _divides(vtp, arch.num_heads):
        errors.append(
            f"nemo.vllm.tensor_parallel: vLLM TP={vtp} does not divide the {arch.num_heads} attention heads"
        )
    if not (_divides(vtp, arch.num_kv_heads) or _divides(arch.num_kv_heads, vtp)):
        errors.append(
            f"nemo.vllm.tensor_parallel: vLLM TP={vtp} must divide the {arch.num_kv_heads} KV heads or be a multiple "
            "of them"
        )
    if not _divides(vtp, cluster.gpus_per_node):
        errors.append(
            f"nemo.vllm.tensor_parallel: vLLM TP={vtp} does not divide cluster.gpus_per_node={cluster.gpus_per_node}"
        )
    elif cfg.nemo.colocated and world % vtp:
        errors.append(f"nemo.vllm.tensor_parallel: vLLM TP={vtp} does not divide the {world} GPUs")
    max_len = vllm.max_model_len or cfg.rollout.max_total_tokens
    if max_len < cfg.rollout.max_total_tokens:
        errors.append(
            f"nemo.vllm.max_model_len: {max_len} is shorter than rollout.max_total_tokens={cfg.rollout.max_total_tokens}"
        )

    dp = world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else 0
    if dp:
        unit = dp * meg.train_micro_batch_size
        gbs = train_global_batch_size(cfg)
        if "rl" in cfg.train.stages and gbs % unit:
            errors.append(
                f"nemo.megatron.train_global_batch_size: {gbs} rows is not a multiple of DP·micro-batch = "
                f"{dp}·{meg.train_micro_batch_size} = {unit}"
            )
        if "sft" in cfg.train.stages and cfg.sft.batch_size % unit:
            errors.append(
                f"sft.batch_size: {cfg.sft.batch_size} is not a multiple of DP·micro-batch = "
                f"{dp}·{meg.train_micro_batch_size} = {unit} (nemo.megatron.train_micro_batch_size)"
            )
        if "rl" in cfg.train.stages:
            rows = max_rows_per_step(cfg)
            padded = math.ceil(rows / gbs) * gbs
            originals = cfg.rollout.questions_per_step * cfg.rollout.group_size
            if originals % dp:
                warnings.append(
                    f"rollout.questions_per_step: B·N = {originals} rows is not a multiple of DP={dp}; every step pads"
                )
            if padded - rows > gbs // 2:
                warnings.append(
                    f"nemo.megatron.train_global_batch_size: a full step ({rows} rows) pads to {padded}, "
                    f"{padded - rows} zero-weight rows"
                )
    if not cfg.nemo.colocated:
        warnings.append(
            "nemo.colocated: false needs dedicated generation GPUs, set through "
            "nemo.overrides.policy.generation.colocated.resources; the estimate below still assumes sharing"
        )
    return errors, warnings


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


def training_sequence_length(cfg: Config) -> int:
    """Longest training sequence: rollout.max_total_tokens for RL, sft.max_tokens for SFT (the larger
    when a config runs both)."""
    lengths = [cfg.rollout.max_total_tokens] if "rl" in cfg.train.stages else []
    lengths += [cfg.sft.max_tokens] if "sft" in cfg.train.stages else []
    return max(lengths or [cfg.rollout.max_total_tokens])


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


@dataclass
class PlanReport:
    """Everything `axpo plan` prints."""

    config_name: str
    architecture: Architecture
    layout: Layout
    errors: list[str]
    warnings: list[str]
    memory: MemoryEstimate | None
    checkpoint: CheckpointTiming | None = None

    @property
    def ok(self) -> bool:
        """True when the layout is valid and fits the GPUs."""
        return not self.errors and self.memory is not None and self.memory.fits

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``axpo plan --json``)."""
        return {
            "config": self.config_name,
            "ok": self.ok,
            "architecture": {**asdict(self.architecture), "total_params": self.architecture.total_params()},
            "layout": asdict(self.layout),
            "errors": self.errors,
            "warnings": self.warnings,
            "memory": asdict(self.memory) if self.memory else None,
            "checkpoint": asdict(self.checkpoint) if self.checkpoint else None,
        }

    def to_text(self) -> str:
        """The human-readable report: architecture, layout, checks and the memory table."""
        a, lay = self.architecture, self.layout
        lines = [
            f"plan for {self.config_name}: {a.name}, {a.total_params() / 1e9:.2f}B params "
            f"({a.num_layers} layers, hidden {a.hidden_size}, {a.num_heads}/{a.num_kv_heads} heads, "
            f"vision {a.vision_depth}x{a.vision_hidden_size})",
            f"layout: {lay.num_gpus} GPUs = TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp}"
            f"{', sequence parallel' if lay.sequence_parallel else ''}; vLLM TP {lay.vllm_tp} "
            f"({lay.vllm_engines} engines)",
            f"batch: <= {lay.rows_per_step_max} rows/step -> global batch {lay.global_batch_size} "
            f"(micro-batch {lay.micro_batch_size}, {lay.optimizer_steps_per_rl_step} optimizer step(s)/RL step); "
            f"sequences <= {lay.sequence_length} tokens, padded to a multiple of {lay.pad_sequences_to}",
        ]
        lines += [f"ERROR   {e}" for e in self.errors]
        lines += [f"warning {w}" for w in self.warnings]
        m = self.memory
        if m is not None:
            stage = "" if m.stage == "only" else f", {m.stage} pipeline stage"
            lines.append(f"\nper-GPU memory, training phase{stage} (GiB):")
            lines += [f"  {r.item:<32} {r.gib:7.2f}   {r.formula}" for r in m.training]
            lines.append(f"  {'total':<32} {m.training_total_gib:7.2f}")
            if m.generation:
                lines.append("per-GPU memory, generation phase (GiB):")
                lines += [f"  {r.item:<32} {r.gib:7.2f}   {r.formula}" for r in m.generation]
                lines.append(f"  {'total':<32} {m.generation_total_gib:7.2f}")
                lines.append(f"refit phase (policy + vLLM weights): {m.refit_total_gib:.2f} GiB")
            verdict = "fits" if m.fits else "DOES NOT FIT"
            lines.append(f"peak {m.peak_gib:.2f} GiB of {m.gpu_memory_gib:g} GiB per GPU: {verdict}")
            lines += [f"ERROR   {p}" for p in m.problems]
        c = self.checkpoint
        if c is not None:
            lines.append(
                f"checkpoint: {c.size_gb:,.0f} GB, {c.write_s / 60:.1f} min to write; SIGUSR1 lead >= "
                f"{c.usr1_lead_s} s (a {c.step_s / 60:g}-min step + the write + {SIGNAL_MARGIN_S} s): "
                f"#SBATCH --signal=B:USR1@{c.usr1_lead_s} or more"
            )
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def plan(cfg: Config, config_name: str = "config") -> PlanReport:
    """Check and size a config. Raises `PlanError` when the architecture cannot be determined."""
    arch = resolve_architecture(cfg)
    errors, warnings = check_layout(cfg, arch)
    world = cfg.cluster.num_nodes * cfg.cluster.gpus_per_node
    meg = cfg.nemo.megatron
    layout_ok = world % (meg.tensor_parallel * meg.pipeline_parallel * meg.context_parallel) == 0
    memory = (
        estimate_memory(cfg, arch) if layout_ok and arch.num_layers % meg.pipeline_parallel == 0 else None
    )
    return PlanReport(
        config_name, arch, build_layout(cfg), errors, warnings, memory, checkpoint_timing(cfg, arch)
    )

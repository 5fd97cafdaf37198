"""The cluster plan's first two parts: the model's architecture, and the parallel-layout checks.

See `axpo_nemo.nemo.cluster_plan` for the rules checked and where each comes from.
"""


from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axpo_nemo.config.schema import Config
from axpo_nemo.nemo.master_config import (
    make_sequence_length_divisible_by,
    max_rows_per_step,
    train_global_batch_size,
)


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


def training_sequence_length(cfg: Config) -> int:
    """Longest training sequence: rollout.max_total_tokens for RL, sft.max_tokens for SFT (the larger
    when a config runs both)."""
    lengths = [cfg.rollout.max_total_tokens] if "rl" in cfg.train.stages else []
    lengths += [cfg.sft.max_tokens] if "sft" in cfg.train.stages else []
    return max(lengths or [cfg.rollout.max_total_tokens])


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

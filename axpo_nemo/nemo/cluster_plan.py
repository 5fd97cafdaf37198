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

from dataclasses import asdict, dataclass
from typing import Any

from axpo_nemo.config.schema import Config
from axpo_nemo.nemo.cluster_layout import (
    Architecture,
    Layout,
    build_layout,
    check_layout,
    resolve_architecture,
)
from axpo_nemo.nemo.memory_estimate import (
    SIGNAL_MARGIN_S,
    CheckpointTiming,
    MemoryEstimate,
    checkpoint_timing,
    estimate_memory,
)


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

"""Every NeMo-RL (v0.7.0) symbol this project uses, in one place.

NeMo-RL changes weekly; pinning the whole surface here means a version bump is one file to
review. Nothing here is imported at module load: each accessor imports on first use and raises
`NemoRLUnavailable` with an actionable message when NeMo-RL (or vLLM/Megatron) is missing.
Accessors are grouped by the part of the backend that uses them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The NeMo-RL release this backend targets (its container: nvcr.io/nvidia/nemo-rl:v0.7.0).
NEMO_RL_VERSION = "0.7.0"


class NemoRLUnavailable(ImportError):
    """NeMo-RL (or one of its engines) is not importable in this environment."""


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NemoRLUnavailable(
            f"the NeMo-RL backend needs '{module}' (NeMo-RL v{NEMO_RL_VERSION}), which is not importable "
            f"here ({exc}); run inside the nvcr.io/nvidia/nemo-rl:v{NEMO_RL_VERSION} container, or use "
            "backend=local"
        ) from exc


def nemo_rl_available() -> bool:
    """Whether ``nemo_rl`` imports in this environment (without raising)."""
    try:
        importlib.import_module("nemo_rl")
    except ImportError:
        return False
    return True


# --- loss and train data ---------------------------------------------------------------------


def clipped_pg_loss() -> tuple[type, type]:
    """(ClippedPGLossFn, ClippedPGLossConfig) from ``nemo_rl.algorithms.loss``.

    In v0.7.0 the config is a pydantic model (``extra="allow"``) and the loss is built as
    ``ClippedPGLossFn(cfg)``; its ``__call__(next_token_logprobs, data, global_valid_seqs,
    global_valid_toks)`` reads ``data[key][:, 1:]`` for every per-token key.
    """
    loss = _import("nemo_rl.algorithms.loss")
    return loss.ClippedPGLossFn, loss.ClippedPGLossConfig


def loss_interfaces() -> tuple[type, type, type]:
    """(LossFunction, LossType, LossInputType) from ``nemo_rl.algorithms.loss.interfaces``.

    v0.7.0 has no ``MetricNormalizer`` (added to NeMo-RL after the release): every loss metric
    is summed over micro-batches by the trainer, so it must come pre-divided by the global count.
    """
    interfaces = _import("nemo_rl.algorithms.loss.interfaces")
    return interfaces.LossFunction, interfaces.LossType, interfaces.LossInputType


def batched_data_dict_cls() -> type:
    """``nemo_rl.distributed.batched_data_dict.BatchedDataDict`` (the train-data container)."""
    return _import("nemo_rl.distributed.batched_data_dict").BatchedDataDict


def packed_tensor_cls() -> type:
    """``nemo_rl.data.multimodal_utils.PackedTensor``: per-row multimodal tensors, None for none."""
    return _import("nemo_rl.data.multimodal_utils").PackedTensor


# --- rollouts, generation, tools and the training loop ---------------------------------------


def grpo_module() -> ModuleType:
    """``nemo_rl.algorithms.grpo``: ``setup``, ``refit_policy_generation``, ``MasterConfig`` (v0.7.0).

    Importing it needs NeMo-RL's own Python (>= 3.13 in the v0.7.0 container).
    """
    return _import("nemo_rl.algorithms.grpo")


def sft_module() -> ModuleType:
    """``nemo_rl.algorithms.sft``: ``setup``, ``sft_train``, ``MasterConfig`` (v0.7.0)."""
    return _import("nemo_rl.algorithms.sft")


def init_ray(*args, **kwargs):
    """``nemo_rl.distributed.virtual_cluster.init_ray``: start or join the Ray cluster."""
    return _import("nemo_rl.distributed.virtual_cluster").init_ray(*args, **kwargs)


def get_tokenizer(tokenizer_cfg, *, get_processor: bool = False):
    """``nemo_rl.algorithms.utils.get_tokenizer`` (sets a pad token; with a processor for VLMs)."""
    return _import("nemo_rl.algorithms.utils").get_tokenizer(tokenizer_cfg, get_processor=get_processor)


def configure_generation_config(generation_cfg, tokenizer):
    """``nemo_rl.models.generation.configure_generation_config`` (pad id, stop ids, model name)."""
    return _import("nemo_rl.models.generation").configure_generation_config(generation_cfg, tokenizer)


def vllm_llm_class():
    """``vllm.LLM`` (standalone generation outside a NeMo-RL cluster)."""
    return _import("vllm").LLM


def vllm_sampling_params_class():
    """``vllm.SamplingParams``."""
    return _import("vllm").SamplingParams


# --- checkpoints and export -----------------------------------------------------------------


def export_model_from_megatron():
    """``nemo_rl.models.megatron.community_import.export_model_from_megatron``: Megatron→HF export
    through Megatron-Bridge (what ``examples/converters/convert_megatron_to_hf.py`` calls).

    Signature at v0.7.0: ``(hf_model_name, input_path, output_path, hf_tokenizer_path,
    overwrite=False, hf_overrides={}, strict=True)``; it runs on CPU under a gloo process group and
    raises FileExistsError when ``output_path`` exists. Needs NeMo-RL's ``mcore`` extra.
    """
    return _import("nemo_rl.models.megatron.community_import").export_model_from_megatron


def convert_dcp_to_hf():
    """``nemo_rl.utils.native_checkpoint.convert_dcp_to_hf``: torch-DCP (DTensor policy) → HF export
    (what ``examples/converters/convert_dcp_to_hf.py`` calls).

    Signature at v0.7.0: ``(dcp_ckpt_path, hf_ckpt_path, model_name_or_path,
    tokenizer_name_or_path, overwrite=False, hf_overrides={})``; accepts ``policy/weights`` of
    DTensor v1 and v2 (``weights/model``) checkpoints.
    """
    return _import("nemo_rl.utils.native_checkpoint").convert_dcp_to_hf

"""`build_master_config` / `build_sft_master_config`: the NeMo-RL v0.7.0 keys and values we emit.

The key names are the ones NeMo-RL v0.7.0 reads (``nemo_rl/algorithms/grpo.py`` MasterConfig and
GRPOConfig, ``nemo_rl/models/policy/__init__.py`` PolicyConfig/MegatronConfig,
``nemo_rl/models/generation/vllm/config.py`` VllmSpecificArgs, ``nemo_rl/algorithms/loss``
ClippedPGLossConfig, ``nemo_rl/utils/checkpoint.py`` CheckpointingConfig, ``nemo_rl/algorithms/sft.py``).
Where NeMo-RL imports, the last test also validates the dicts with its own MasterConfig classes.
"""

from __future__ import annotations

import functools

import pytest

from axpo_nemo.config import ConfigError, load_config
from axpo_nemo.nemo.master_config import (
    build_master_config,
    build_sft_master_config,
    deep_merge,
    max_rows_per_step,
    train_global_batch_size,
)


@functools.cache
def _master(config: str, *overrides: str) -> dict:
    return build_master_config(load_config(config, list(overrides)))


def test_sections_are_those_of_nemo_rl_grpo_master_config():
    master = _master("cluster/axpo_8b")
    assert {"policy", "loss_fn", "env", "data", "grpo", "logger", "cluster", "checkpointing"} <= set(master)
    assert master["cluster"] == {"gpus_per_node": 8, "num_nodes": 2}


def test_policy_megatron_layout_and_batching():
    policy = _master("cluster/axpo_8b")["policy"]
    assert policy["model_name"] == "Qwen/Qwen3-VL-8B-Thinking"
    assert policy["tokenizer"]["name"] == "Qwen/Qwen3-VL-8B-Thinking"
    assert policy["dtensor_cfg"] == {"enabled": False}
    assert policy["optimizer"] is None and policy["scheduler"] is None
    meg = policy["megatron_cfg"]
    assert meg["enabled"] is True
    assert meg["tensor_model_parallel_size"] == 2
    assert meg["pipeline_model_parallel_size"] == 1
    assert meg["context_parallel_size"] == 1
    assert meg["sequence_parallel"] is True
    assert meg["activation_checkpointing"] is True and meg["recompute_granularity"] == "selective"
    assert meg["optimizer"]["use_distributed_optimizer"] is True
    assert meg["fp8_cfg"]["enabled"] is False
    assert policy["max_total_sequence_length"] == 8192
    assert policy["train_micro_batch_size"] == 1 and policy["logprob_batch_size"] == 1
    # AXPO's largest step: B·N = 512 originals + floor(0.25·512/4)·4 = 128 resampled rows; DP 8 divides it.
    assert policy["train_global_batch_size"] == 640
    assert policy["dynamic_batching"]["enabled"] is True and policy["sequence_packing"]["enabled"] is False
    assert policy["dynamic_batching"]["train_mb_tokens"] == 8192
    assert policy["dynamic_batching"]["logprob_mb_tokens"] == 8192


def test_sequence_parallel_and_context_parallel_set_the_length_multiple():
    # NeMo-RL's packing asserts a multiple of TP with SP, of 2·CP with CP, of both together.
    assert _master("cluster/axpo_8b")["policy"]["make_sequence_length_divisible_by"] == 2
    assert _master("cluster/axpo_32b")["policy"]["make_sequence_length_divisible_by"] == 8
    cp = _master("cluster/axpo_8b", "nemo.megatron.context_parallel=2", "nemo.megatron.batching=packing")
    assert cp["policy"]["make_sequence_length_divisible_by"] == 2 * 2 * 2
    assert cp["policy"]["sequence_packing"]["enabled"] is True


def test_recompute_modes():
    none = _master("cluster/axpo_8b", "nemo.megatron.recompute=none")["policy"]["megatron_cfg"]
    assert none["activation_checkpointing"] is False
    full = _master("cluster/axpo_32b")["policy"]["megatron_cfg"]
    assert full["activation_checkpointing"] is True and full["recompute_granularity"] == "full"
    sel = _master("cluster/axpo_8b", "nemo.megatron.recompute_modules=[core_attn,mlp]")["policy"][
        "megatron_cfg"
    ]
    assert sel["recompute_modules"] == ["core_attn", "mlp"]


def test_vllm_generation_colocated_with_prefix_caching():
    gen = _master("cluster/axpo_8b")["policy"]["generation"]
    assert gen["backend"] == "vllm"
    assert gen["colocated"]["enabled"] is True
    assert gen["max_new_tokens"] == 2048
    vllm = gen["vllm_cfg"]
    assert vllm["tensor_parallel_size"] == 2
    assert vllm["gpu_memory_utilization"] == 0.6
    assert vllm["enable_prefix_caching"] is True
    assert vllm["skip_tokenizer_init"] is False  # required for VLMs
    assert vllm["max_model_len"] == 8192  # null -> rollout.max_total_tokens
    assert vllm["precision"] == "bfloat16" and vllm["async_engine"] is False


def test_fp8_is_wired_like_nemo_rl_fp8_recipe():
    master = _master("cluster/axpo_32b")
    meg = master["policy"]["megatron_cfg"]
    assert meg["fp8_cfg"] == {"enabled": True, "fp8": "e4m3", "fp8_recipe": "blockwise", "fp8_param": False}
    assert meg["optimizer"]["use_precision_aware_optimizer"] is False
    assert meg["env_vars"] == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1"}
    vllm = master["policy"]["generation"]["vllm_cfg"]
    assert vllm["precision"] == "fp8" and vllm["use_deep_gemm"] is True
    assert master["loss_fn"]["use_importance_sampling_correction"] is True
    tensorwise = _master("cluster/axpo_32b", "nemo.megatron.fp8_recipe=tensorwise")["policy"]["megatron_cfg"]
    assert tensorwise["fp8_cfg"]["fp8_recipe"] == "tensorwise" and tensorwise["env_vars"] is None
    bf16 = _master("cluster/axpo_8b")
    assert bf16["loss_fn"]["use_importance_sampling_correction"] is False


def test_loss_fn_carries_our_asymmetric_clip_and_kl():
    loss = _master("cluster/axpo_8b", "loss.dual_clip=3.0")["loss_fn"]
    assert loss["ratio_clip_min"] == 0.2 and loss["ratio_clip_max"] == 0.28
    assert loss["ratio_clip_c"] == 3.0
    assert loss["reference_policy_kl_penalty"] == 0.01 and loss["reference_policy_kl_type"] == "k3"
    assert loss["kl_input_clamp_value"] == 20.0 and loss["kl_output_clamp_value"] == 10.0
    assert loss["token_level_loss"] is True


def test_grpo_section():
    grpo = _master("cluster/axpo_8b")["grpo"]
    assert grpo["num_prompts_per_step"] == 64 and grpo["num_generations_per_prompt"] == 8
    assert grpo["max_rollout_turns"] == 3
    assert grpo["max_num_steps"] == 300 and grpo["val_period"] == 20
    assert grpo["use_leave_one_out_baseline"] is False and grpo["normalize_rewards"] is True
    assert grpo["skip_reference_policy_logprobs_calculation"] is False
    assert grpo["async_grpo"]["enabled"] is False
    no_kl = _master("cluster/axpo_8b", "loss.kl_coef=0.0")["grpo"]
    assert no_kl["skip_reference_policy_logprobs_calculation"] is True


def test_optimizer_and_scheduler_follow_rl_settings():
    meg = _master(
        "cluster/axpo_8b", "rl.lr=2e-6", "rl.min_lr_ratio=0.1", "rl.warmup_steps=20", "rl.weight_decay=0.01"
    )
    opt, sched = meg["policy"]["megatron_cfg"]["optimizer"], meg["policy"]["megatron_cfg"]["scheduler"]
    assert opt["lr"] == 2e-6 and opt["min_lr"] == pytest.approx(2e-7) and opt["weight_decay"] == 0.01
    assert opt["clip_grad"] == 1.0 == meg["policy"]["max_grad_norm"]
    assert sched["lr_decay_style"] == "cosine" and sched["lr_decay_iters"] == 300
    assert sched["lr_warmup_iters"] == 20 and sched["lr_warmup_init"] == pytest.approx(1e-7)
    assert sched["start_weight_decay"] == sched["end_weight_decay"] == 0.01
    constant = _master("cluster/axpo_8b")["policy"]["megatron_cfg"]["scheduler"]
    assert constant["lr_decay_style"] == "constant"


def test_checkpointing_and_logger():
    master = _master("cluster/axpo_8b")
    ckpt = master["checkpointing"]
    assert ckpt["checkpoint_dir"] == "runs/axpo_8b/rl/checkpoints"
    assert ckpt["save_period"] == 10 and ckpt["keep_top_k"] == 3 and ckpt["enabled"] is True
    assert ckpt["metric_name"] is None
    custom = _master("cluster/axpo_8b", "checkpoint.dir=/ckpt")["checkpointing"]
    assert custom["checkpoint_dir"] == "/ckpt/rl"
    assert master["logger"]["log_dir"].startswith("runs/axpo_8b")


def test_row_budget_and_global_batch():
    axpo, grpo = load_config("cluster/axpo_2b"), load_config("cluster/grpo_2b")
    assert max_rows_per_step(axpo) == 640 and max_rows_per_step(grpo) == 512
    assert train_global_batch_size(axpo) == 640 and train_global_batch_size(grpo) == 512
    # Rounded up to DP·micro-batch: 4B has DP 4; with micro-batch 3 the unit is 12 -> 648.
    odd = load_config("cluster/axpo_4b", ["nemo.megatron.train_micro_batch_size=3"])
    assert train_global_batch_size(odd) == 648
    fixed = load_config("cluster/axpo_2b", ["nemo.megatron.train_global_batch_size=128"])
    assert train_global_batch_size(fixed) == 128
    # the same M as the training step: 0.29 · 100 is 28.999… in floats, but the step makes 29 prefixes
    from axpo_nemo.core import resample_budget

    exact = load_config(
        "cluster/axpo_2b", ["rollout.questions_per_step=25", "rollout.group_size=4", "axpo.r=0.29", "axpo.k=1"]
    )
    assert resample_budget(100, 0.29, 1) == 29
    assert max_rows_per_step(exact) == 100 + 29


def test_overrides_deep_merge_last():
    master = _master(
        "cluster/axpo_8b",
        "+nemo.overrides.policy.megatron_cfg.apply_rope_fusion=false",
        "+nemo.overrides.policy.generation.vllm_kwargs.compilation_config.backend=eager",
        "+nemo.overrides.grpo.seq_logprob_error_threshold=1.5",
    )
    meg = master["policy"]["megatron_cfg"]
    assert meg["apply_rope_fusion"] is False
    assert meg["tensor_model_parallel_size"] == 2  # siblings survive the merge
    assert master["policy"]["generation"]["vllm_kwargs"] == {
        "mm_processor_cache_gb": 0,
        "compilation_config": {"backend": "eager"},
    }
    assert master["grpo"]["seq_logprob_error_threshold"] == 1.5
    with pytest.raises(ConfigError, match=r"nemo\.overrides"):
        load_config("cluster/axpo_8b", ["nemo.overrides.policy.x=1"])  # new keys need '+'


def test_nemo_rl_yaml_is_the_base_layer(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        "policy:\n  model_name: some/base-model\n  megatron_cfg:\n    moe_router_dtype: fp32\n"
        "    tensor_model_parallel_size: 4\n  extra_key: 7\n  extra_name: base-${policy.model_name}\n"
        "checkpointing:\n  checkpoint_dir: results/${policy.model_name}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "defaults: parent.yaml\ndata:\n  shuffle: false\n  note: ${mul:2, 3}\n"
        "policy:\n  generation:\n    vllm_cfg:\n      load_format: dummy\n"
    )
    cfg = load_config("cluster/axpo_8b", [f"nemo.nemo_rl_config={tmp_path / 'child.yaml'}"])
    master = build_master_config(cfg)
    meg = master["policy"]["megatron_cfg"]
    assert meg["moe_router_dtype"] == "fp64"  # ours wins over the base
    assert meg["tensor_model_parallel_size"] == 2
    assert master["policy"]["extra_key"] == 7  # base-only keys survive
    assert master["policy"]["generation"]["vllm_cfg"]["load_format"] == "dummy"
    assert master["data"]["shuffle"] is True and master["data"]["note"] == 6
    # Interpolations resolve after merging, so the base's see our values.
    assert master["policy"]["extra_name"] == "base-Qwen/Qwen3-VL-8B-Thinking"
    assert master["checkpointing"]["checkpoint_dir"] == "runs/axpo_8b/rl/checkpoints"
    with pytest.raises(ConfigError, match=r"nemo\.nemo_rl_config"):
        build_master_config(
            load_config("cluster/axpo_8b", [f"nemo.nemo_rl_config={tmp_path / 'missing.yaml'}"])
        )


def test_axpo_section_carries_our_settings():
    axpo = _master("cluster/axpo_8b", "nemo.megatron.freeze_vision_model=true")["axpo"]
    assert axpo["algorithm"] == "axpo" and axpo["resampling"]["r"] == 0.25 and axpo["resampling"]["k"] == 4
    assert axpo["tool_workers"] == 32 and axpo["freeze_vision_model"] is True
    assert axpo["max_rows_per_step"] == 640


def test_sft_master_config():
    cfg = load_config("cluster/sft_8b")
    master = build_sft_master_config(cfg)
    assert {"policy", "data", "sft", "logger", "cluster", "checkpointing"} <= set(master)
    policy = master["policy"]
    assert "generation" not in policy
    assert policy["train_global_batch_size"] == 128 and policy["max_total_sequence_length"] == 8192
    assert "logprob_mb_tokens" not in policy["dynamic_batching"]
    opt = policy["megatron_cfg"]["optimizer"]
    assert opt["lr"] == 1e-5 and opt["min_lr"] == pytest.approx(1e-6)
    assert policy["megatron_cfg"]["scheduler"]["lr_decay_iters"] is None  # steps 0: epochs decide
    assert master["sft"]["max_num_epochs"] == 2 and master["sft"]["seed"] == cfg.sft.seed
    assert master["checkpointing"]["checkpoint_dir"] == "runs/sft_8b/sft/checkpoints"


def test_deep_merge_does_not_alias_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    merged = deep_merge(base, {"a": {"b": 2}, "d": 3})
    merged["a"]["c"].append(2)
    assert merged == {"a": {"b": 2, "c": [1, 2]}, "d": 3} and base == {"a": {"b": 1, "c": [1]}}


@pytest.mark.nemo_rl
def test_nemo_rl_master_configs_accept_our_dicts():
    pytest.importorskip("nemo_rl")
    from nemo_rl.algorithms.grpo import MasterConfig as GRPOMasterConfig
    from nemo_rl.algorithms.sft import MasterConfig as SFTMasterConfig

    for size in ("2b", "8b", "32b"):
        grpo = GRPOMasterConfig(**_master(f"cluster/axpo_{size}"))
        assert grpo.policy["megatron_cfg"]["enabled"] is True
        SFTMasterConfig(**build_sft_master_config(load_config(f"cluster/sft_{size}")))


CLUSTER_CONFIGS = [f"cluster/{a}_{m}" for a in ("axpo", "grpo", "sft") for m in ("2b", "4b", "8b", "32b")]


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_every_cluster_config_saves_checkpoints_and_keeps_grad_reduce_in_order(name):
    # v0.7.0's Policy.save_checkpoint (models/policy/lm_policy.py) raises "model_save_format must be
    # None or omitted if using DTensorPolicyWorker (_v2=False)" for any other value; and every v0.7.0
    # VLM Megatron recipe turns overlap_grad_reduce off
    cfg = load_config(name)
    master = build_sft_master_config(cfg) if name.startswith("cluster/sft") else build_master_config(cfg)
    policy = master["policy"]
    if not policy.get("dtensor_cfg", {}).get("_v2", False):
        assert master["checkpointing"].get("model_save_format") is None
    ddp = policy["megatron_cfg"]["distributed_data_parallel_config"]
    assert ddp["overlap_grad_reduce"] is False


def test_fp8_rollouts_keep_the_vision_tower_out_of_quantization():
    # v0.7.0 (generation/vllm/quantization/fp8.py) ignores every "model.<name>" of AutoModel that
    # contains one of quantization_ignored_layer_kws; on a real Qwen3-VL architecture that must be
    # exactly the vision tower
    from transformers import AutoModel

    from axpo_nemo.models.qwen3vl import tiny_qwen3vl_config
    from axpo_nemo.models.tokenizer import build_tiny_tokenizer

    vllm_cfg = _master("cluster/axpo_32b")["policy"]["generation"]["vllm_cfg"]
    assert vllm_cfg["precision"] == "fp8"
    kws = vllm_cfg["quantization_ignored_layer_kws"]
    assert "quantization_ignored_layer_kws" not in _master("cluster/axpo_8b")["policy"]["generation"]["vllm_cfg"]
    tokenizer = build_tiny_tokenizer()
    model = AutoModel.from_config(tiny_qwen3vl_config(len(tokenizer), tokenizer=tokenizer))
    names = [f"model.{n}".removesuffix(".weight") for n, _ in model.named_parameters()]
    ignored = {n for n in names if any(p in n for p in kws)}
    vision = {n for n in names if n.startswith("model.visual.")}
    assert vision and ignored == vision


def test_rope_fusion_is_off_with_sequence_packing():
    # fused RoPE over packed Qwen3-VL sequences gives mismatched logprobs (Megatron-Bridge issue 1776)
    assert _master("cluster/axpo_32b")["policy"]["megatron_cfg"]["apply_rope_fusion"] is False  # packing
    assert _master("cluster/axpo_8b")["policy"]["megatron_cfg"]["apply_rope_fusion"] is True  # dynamic

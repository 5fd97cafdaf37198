"""`axpo plan`: every cluster config passes; bad layouts fail naming the key; memory figures by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from axpo_nemo.cli import main
from axpo_nemo.config import ConfigError, load_config
from axpo_nemo.nemo.cluster_layout import (
    ARCHITECTURES,
    Architecture,
    PlanError,
    architecture_from_hf_config,
    resolve_architecture,
)
from axpo_nemo.nemo.cluster_plan import plan
from axpo_nemo.nemo.memory_estimate import GIB, SIGNAL_MARGIN_S, checkpoint_timing

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "conf" / "cluster"
CLUSTER_CONFIGS = sorted(p for p in CLUSTER_DIR.glob("*.yaml") if p.name != "base.yaml")


def test_the_cluster_configs_cover_every_size_and_algorithm():
    names = {p.stem for p in CLUSTER_CONFIGS}
    assert names == {
        f"{kind}_{size}" for kind in ("axpo", "grpo", "sft") for size in ("2b", "4b", "8b", "32b")
    }


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.stem)
def test_every_cluster_config_loads_validates_and_passes_plan(path, capsys):
    cfg = load_config(path)
    assert cfg.backend == "nemo"
    assert cfg.rollout.group_size == 8 and cfg.rollout.max_turns == 3 and cfg.axpo.r == 0.25
    assert cfg.nemo.colocated and cfg.nemo.megatron.distributed_optimizer
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and out.rstrip().endswith("OK")


def test_grpo_configs_turn_resampling_off_and_sft_configs_run_sft():
    assert load_config("cluster/grpo_8b").algorithm == "grpo"
    assert load_config("cluster/axpo_8b").algorithm == "axpo"
    assert load_config("cluster/sft_8b").train.stages == ["sft"]


def test_32b_uses_the_design_layout():
    cfg = load_config("cluster/axpo_32b")
    meg = cfg.nemo.megatron
    assert (meg.tensor_parallel, meg.pipeline_parallel, meg.sequence_parallel, meg.fp8) == (8, 2, True, True)
    assert cfg.cluster.num_nodes in (4, 8) and cfg.nemo.vllm.tensor_parallel in (4, 8)
    assert meg.batching == "packing"  # NeMo-RL: dynamic batching only with PP = 1


def test_plan_json_is_machine_readable(capsys):
    assert main(["plan", "--config", "cluster/axpo_8b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["layout"]["dp"] == 8 and report["layout"]["tp"] == 2
    assert report["architecture"]["total_params"] == 8_767_123_696
    assert report["memory"]["peak_gib"] <= 80


# --- bad layouts name the key to change ---------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "overrides", "key", "words"),
    [
        # 6 GPUs, TP 6: 6 does not divide Qwen3-VL-2B's 16 attention heads.
        ("cluster/axpo_2b", ["cluster.gpus_per_node=6", "nemo.megatron.tensor_parallel=6"],
         "nemo.megatron.tensor_parallel", "16 attention heads"),
        # TP 16 divides the 32 heads of 8B but not its 8 KV heads.
        ("cluster/axpo_8b", ["nemo.megatron.tensor_parallel=16", "nemo.megatron.logprob_batch_size=1"],
         "nemo.megatron.tensor_parallel", "8 KV heads"),
        # PP 8 does not divide the 28 layers of 2B.
        ("cluster/axpo_2b", ["nemo.megatron.pipeline_parallel=8", "nemo.megatron.batching=packing"],
         "nemo.megatron.pipeline_parallel", "28 layers"),
        # 16 GPUs are not a multiple of TP·PP·CP = 2·1·3.
        ("cluster/axpo_8b", ["nemo.megatron.context_parallel=3", "nemo.megatron.batching=packing"],
         "cluster.num_nodes", "not a multiple of TP·PP·CP"),
        # 100 rows cannot be split into DP 8 x micro-batch 1.
        ("cluster/axpo_2b", ["nemo.megatron.train_global_batch_size=100"],
         "nemo.megatron.train_global_batch_size", "DP·micro-batch"),
        ("cluster/sft_2b", ["sft.batch_size=100"], "sft.batch_size", "DP·micro-batch"),
        ("cluster/axpo_2b", ["nemo.megatron.sequence_parallel=true"], "nemo.megatron.sequence_parallel", "tensor_parallel > 1"),
        ("cluster/axpo_32b", ["nemo.megatron.batching=dynamic"], "nemo.megatron.batching", "PP = 1"),
        ("cluster/axpo_8b", ["nemo.megatron.context_parallel=2"], "nemo.megatron.batching", "packing"),
        ("cluster/axpo_32b", ["nemo.megatron.logprob_batch_size=2"], "nemo.megatron.logprob_batch_size", "TP=8"),
        ("cluster/axpo_8b", ["nemo.vllm.tensor_parallel=3"], "nemo.vllm.tensor_parallel", "32 attention heads"),
        ("cluster/axpo_8b", ["cluster.gpus_per_node=4", "nemo.vllm.tensor_parallel=8"],
         "nemo.vllm.tensor_parallel", "gpus_per_node"),
        ("cluster/axpo_8b", ["nemo.vllm.max_model_len=4096"], "nemo.vllm.max_model_len", "shorter"),
        # fused RoPE over packed Qwen3-VL sequences: a known logprob mismatch
        ("cluster/axpo_32b", ["++nemo.overrides.policy.megatron_cfg.apply_rope_fusion=true"],
         "nemo.overrides.policy.megatron_cfg.apply_rope_fusion", "Megatron-Bridge issue 1776"),
    ],
)  # fmt: skip
def test_bad_layouts_fail_naming_the_key(config, overrides, key, words, capsys):
    assert main(["plan", config, *overrides]) == 1
    errors = [
        line[len("ERROR   ") :] for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")
    ]
    assert any(e.startswith(f"{key}:") and words in e for e in errors), errors


def test_a_good_layout_has_no_errors_or_warnings():
    report = plan(load_config("cluster/axpo_8b"))
    assert report.errors == [] and report.warnings == [] and report.ok


def test_load_time_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"nemo\.vllm\.gpu_memory_utilization"):
        load_config("cluster/axpo_8b", ["nemo.vllm.gpu_memory_utilization=1.0"])
    with pytest.raises(ConfigError, match=r"nemo\.megatron\.recompute"):
        load_config("cluster/axpo_8b", ["nemo.megatron.recompute=some"])
    with pytest.raises(ConfigError, match=r"nemo\.megatron\.tensor_parallel"):
        load_config("cluster/axpo_8b", ["nemo.megatron.tensor_parallel=0"])


# --- architecture --------------------------------------------------------------------------------


def test_parameter_counts_match_the_published_sizes():
    # Hugging Face lists Qwen/Qwen3-VL-2B-Instruct at 2,127,532,032 parameters; the others round to
    # the published 4.44B, 8.77B and 33.4B.
    assert ARCHITECTURES["qwen3-vl-2b"].total_params() == 2_127_532_032
    assert round(ARCHITECTURES["qwen3-vl-4b"].total_params() / 1e9, 2) == 4.44
    assert round(ARCHITECTURES["qwen3-vl-8b"].total_params() / 1e9, 2) == 8.77
    assert round(ARCHITECTURES["qwen3-vl-32b"].total_params() / 1e9, 1) == 33.4


def test_architecture_comes_from_a_local_config_json(tmp_path):
    config = {
        "tie_word_embeddings": True,
        "text_config": {"num_hidden_layers": 6, "hidden_size": 256, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 1000},
        "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                          "out_hidden_size": 256, "deepstack_visual_indexes": [0]},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = load_config("cluster/axpo_2b", [f"model.name={tmp_path}"])
    arch = resolve_architecture(cfg)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.vocab_size) == (6, 4, 2, 1000)
    # TP 8 with 4 heads is now wrong, and the error says so.
    cfg.nemo.megatron.tensor_parallel = 8
    assert any("4 attention heads" in e for e in plan(cfg).errors)


def test_architecture_from_the_name_or_the_explicit_setting():
    assert resolve_architecture(load_config("cluster/axpo_32b")).name == "qwen3-vl-32b"
    cfg = load_config("cluster/axpo_8b", ["model.name=/models/my-sft-run", "nemo.architecture=qwen3-vl-8b"])
    assert resolve_architecture(cfg) is ARCHITECTURES["qwen3-vl-8b"]


def test_an_unknown_model_fails_naming_the_setting(capsys):
    with pytest.raises(PlanError, match=r"nemo\.architecture"):
        resolve_architecture(load_config("cluster/axpo_8b", ["model.name=/models/my-sft-run"]))
    assert main(["plan", "cluster/axpo_8b", "model.name=/models/my-sft-run"]) == 2
    assert "nemo.architecture" in capsys.readouterr().err
    with pytest.raises(PlanError, match=r"not a Qwen3-VL config\.json"):
        architecture_from_hf_config({"text_config": {"hidden_size": 8}}, "x")


# --- memory, checked against figures computed by hand -------------------------------------------


def test_memory_estimate_matches_hand_computation_for_8b():
    """Qwen3-VL-8B on 2 nodes x 8 GPUs, TP 2, PP 1, CP 1 -> DP 8, sequence parallel, bf16 grads,
    distributed optimizer, selective recompute (core_attn), micro-batch 1, 8192-token sequences.

    Parameters (h=4096, 32 heads x 128 = q 4096, 8 KV heads x 128 = k 1024, I=12288, V=151936):
      one layer = h·q + 2·h·k + q·h + 2·128 (q/k norm) + 2·h (norms) + 3·h·I
                = 16,777,216 + 8,388,608 + 16,777,216 + 256 + 8,192 + 150,994,944 = 192,946,432
      36 layers = 6,946,071,552; embedding + untied output layer = 2 x 151936·4096 = 1,244,659,712;
      final norm 4,096; vision tower 576,388,336  ->  total 8,767,123,696.
      Per GPU with TP 2 (one pipeline stage holds everything): 4,383,561,848 params.
    weights   (bf16, 2 B/param)          = 8,767,123,696 B = 8.165 GiB
    gradients (bf16 buffer, 2 B/param)   = 8,767,123,696 B = 8.165 GiB
    optimizer (fp32 master 4 + fp32 main grad 4 + Adam moments 8 = 16 B/param, / DP 8)
              = 16 x 4,383,561,848 / 8   = 8,767,123,696 B = 8.165 GiB
    activations per token and layer (SP: all of it / TP 2):
              2 B x (4h + 3q + 3k + 3I) / 2 = 2 x (16,384 + 12,288 + 3,072 + 36,864) / 2 = 68,608 B
              x 8192 tokens x 36 layers = 20,233,322,496 B = 18.844 GiB
    vision activations: 8192 x 0.5 image share x 4 patches/token = 16,384 patches,
              2 B x (4·1152 + 4·1152 + 2·4304) / 2 = 17,824 B per patch and block
              x 16,384 x 27 blocks = 7,884,767,232 B = 7.343 GiB
    logits:   8192 tokens x 151936/2 vocab x 10 B = 6,223,298,560 B = 5.796 GiB
    runtime overhead 4 GiB  ->  training total 60.48 GiB.
    """
    cfg = load_config("cluster/axpo_8b")
    report = plan(cfg)
    rows = {r.item.split(" (")[0]: r.gib * GIB for r in report.memory.training}
    assert rows["weights"] == pytest.approx(8_767_123_696)
    assert rows["gradients"] == pytest.approx(8_767_123_696)
    assert rows["optimizer"] == pytest.approx(8_767_123_696)
    assert rows["activations"] == pytest.approx(20_233_322_496)
    assert rows["vision activations"] == pytest.approx(7_884_767_232)
    assert rows["logits + log-softmax"] == pytest.approx(6_223_298_560)
    assert report.memory.training_total_gib == pytest.approx(60.48, abs=0.01)
    # Generation: vLLM takes 0.6 x 80 GiB; colocated, that share is released during training.
    assert report.memory.generation_total_gib == pytest.approx(0.6 * 80 + 4)
    assert report.memory.peak_gib == pytest.approx(60.48, abs=0.01)


def test_full_recompute_keeps_only_layer_inputs():
    # 8B, TP 2 + SP, full recompute: 2 B x h / TP = 4,096 B per token and layer are kept, plus what
    # backward rebuilds for one layer at a time, 68,608 - 4,096 = 64,512 B:
    # 8192 x (36 x 4,096 + 64,512) = 1,736,441,856 B.
    report = plan(load_config("cluster/axpo_8b", ["nemo.megatron.recompute=full"]))
    act = next(r for r in report.memory.training if r.item.startswith("activations"))
    assert act.gib * GIB == pytest.approx(1_736_441_856)


def test_pipeline_parallel_splits_layers_and_fp8_adds_weight_copies():
    report = plan(load_config("cluster/axpo_32b"))
    # First stage of 32B: (32 layers x 487,598,336 + embedding 777,912,320 + vision 595,266,800) / TP 8.
    first = (32 * 487_598_336 + 151_936 * 5120 + ARCHITECTURES["qwen3-vl-32b"].vision_params()) / 8
    rows = {r.item: r.gib * GIB for r in report.memory.training}
    assert report.memory.stage == "first"
    assert rows["weights (bf16)"] == pytest.approx(2 * first, rel=1e-6)
    assert rows["FP8 weight copies (TE)"] == pytest.approx(2 * first, rel=1e-6)
    assert rows["optimizer (fp32 master + Adam)"] == pytest.approx(16 * first / 2, rel=1e-6)  # DP 2


def test_a_layout_that_cannot_fit_80gb_fails(capsys):
    # 32B on one node: TP 8 alone leaves DP 1, so the unsharded optimizer (16 B x 4.2e9) overflows.
    overrides = ["cluster.num_nodes=1", "nemo.megatron.pipeline_parallel=1", "nemo.megatron.batching=dynamic"]
    report = plan(load_config("cluster/axpo_32b", overrides))
    assert report.errors == [] and not report.memory.fits and not report.ok
    assert report.memory.training_total_gib > 80
    assert main(["plan", "cluster/axpo_32b", *overrides]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "cluster.gpu_memory_gib=80" in out


def test_a_vllm_share_without_room_for_one_sequence_fails():
    report = plan(
        load_config(
            "cluster/axpo_32b", ["nemo.vllm.tensor_parallel=1", "nemo.vllm.gpu_memory_utilization=0.3"]
        )
    )
    assert any(p.startswith("nemo.vllm.gpu_memory_utilization:") for p in report.memory.problems)


def test_architecture_is_a_frozen_record():
    arch = ARCHITECTURES["qwen3-vl-2b"]
    assert isinstance(arch, Architecture)
    with pytest.raises(AttributeError):
        arch.num_layers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (ROOT / "slurm").glob("*.sh") if p.name.startswith(("axpo_", "grpo_", "sft_")))
)
def test_each_job_script_signals_early_enough_to_finish_its_step_and_save(script):
    # `--signal=B:USR1@<lead>` must cover the longest step plus writing the whole checkpoint
    # (a 32B checkpoint is ~470 GB), or the stop never saves and the job is killed unrequeued.
    text = (ROOT / "slurm" / script).read_text()
    lead = int(re.search(r"--signal=B:USR1@(\d+)", text).group(1))
    config = re.search(r"AXPO_CONFIG=\$\{AXPO_CONFIG:-([\w/]+)\}", text).group(1)
    timing = checkpoint_timing(cfg := load_config(config), resolve_architecture(cfg))
    assert lead >= timing.usr1_lead_s, (script, lead, timing)


def test_checkpoint_timing_by_hand():
    cfg = load_config("cluster/axpo_32b", ["cluster.checkpoint_write_gbps=2", "cluster.step_minutes=15"])
    arch = resolve_architecture(cfg)
    timing = checkpoint_timing(cfg, arch)
    assert timing.size_gb == pytest.approx(arch.total_params() * 14 / 1e9)
    assert 440 < timing.size_gb < 500  # Qwen3-VL-32B: weights, fp32 main copy and two Adam moments
    assert timing.usr1_lead_s == math.ceil(15 * 60 + timing.size_gb / 2 + SIGNAL_MARGIN_S)

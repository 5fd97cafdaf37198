"""The NeMo-RL v0.7.0 calls of the nemo backend, checked against the real NeMo-RL signatures.

Each test binds the arguments the backend passes (same names, same positional count) to the
signature of the NeMo-RL object it calls, so a renamed or added required argument fails here
instead of on a cluster. Needs NeMo-RL importable (on Python 3.11 through the TypedDict shim in
conftest.py).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import textwrap
from pathlib import Path

import pytest

from axpo_nemo.config import load_config
from axpo_nemo.nemo.master_config import build_master_config, build_sft_master_config

pytestmark = pytest.mark.nemo_rl
pytest.importorskip("nemo_rl")

CLUSTER_CONFIGS = sorted(
    f"cluster/{p.stem}" for p in (Path(__file__).resolve().parents[1] / "conf" / "cluster").glob("*.yaml")
)


def _bind(fn, *args, **kwargs) -> inspect.BoundArguments:
    """Bind a call shape (placeholders for values) to ``fn``'s signature; raises TypeError on a mismatch."""
    return inspect.signature(fn).bind(*args, **kwargs)


def _tuple_len(annotation) -> int:
    return len(getattr(annotation, "__args__", ()))


def test_grpo_calls_match_v070():
    from nemo_rl.algorithms import grpo

    # trainer.run_training: grpo.setup(master_config, tokenizer, dataset, None, processor=processor)
    _bind(grpo.setup, "cfg", "tokenizer", "dataset", None, processor="processor")
    # ... and unpacks 13 values from it.
    assert _tuple_len(inspect.signature(grpo.setup).return_annotation) == 13
    _bind(grpo.refit_policy_generation, "policy", "generation", True, _refit_buffer_size_gb=None)
    assert {"consumed_samples", "current_step", "current_epoch", "total_steps"} <= set(
        grpo.GRPOSaveState.__annotations__
    )


def test_sft_calls_match_v070():
    from nemo_rl.algorithms import sft

    _bind(sft.setup, "cfg", "processor", "dataset", None)
    assert _tuple_len(inspect.signature(sft.setup).return_annotation) == 9
    _bind(sft.sft_train, *(["x"] * 9))


def test_policy_checkpoint_and_logger_calls_match_v070():
    from nemo_rl.algorithms.utils import get_tokenizer
    from nemo_rl.data.multimodal_utils import PackedTensor
    from nemo_rl.distributed.virtual_cluster import init_ray
    from nemo_rl.distributed.worker_groups import RayWorkerGroup
    from nemo_rl.models.generation import configure_generation_config
    from nemo_rl.models.policy.lm_policy import Policy
    from nemo_rl.utils.checkpoint import CheckpointManager
    from nemo_rl.utils.logger import Logger

    _bind(init_ray)
    _bind(get_tokenizer, "tokenizer_cfg", get_processor=True)
    _bind(configure_generation_config, "generation_cfg", "tokenizer")
    _bind(PackedTensor.__init__, "self", "tensor", dim_to_pack=0)
    _bind(Policy.get_logprobs, "self", "data")
    _bind(Policy.get_reference_policy_logprobs, "self", "data")
    _bind(Policy.train, "self", "data", "loss_fn")
    _bind(Policy.save_checkpoint, "self", weights_path="w", optimizer_path=None, tokenizer_path="t",
          checkpointing_cfg={})  # fmt: skip
    _bind(CheckpointManager.init_tmp_checkpoint, "self", 1, {}, "master")
    _bind(CheckpointManager.finalize_checkpoint, "self", "path")
    assert "self.save_optimizer" in inspect.getsource(CheckpointManager.__init__)
    _bind(Logger.log_metrics, "self", {}, 1, prefix="train")
    _bind(RayWorkerGroup.get_dp_leader_worker_idx, "self", 0)
    assert isinstance(inspect.getattr_static(RayWorkerGroup, "dp_size"), property)
    assert isinstance(inspect.getattr_static(RayWorkerGroup, "workers"), property)


def test_logprob_output_keys_match_v070():
    from nemo_rl.models.policy.interfaces import LogprobOutputSpec, ReferenceLogprobOutputSpec

    assert "logprobs" in LogprobOutputSpec.__annotations__  # trainer: get_logprobs(...)["logprobs"]
    assert "reference_logprobs" in ReferenceLogprobOutputSpec.__annotations__


def test_converter_calls_match_v070():
    from nemo_rl.utils.native_checkpoint import convert_dcp_to_hf

    _bind(convert_dcp_to_hf, dcp_ckpt_path="d", hf_ckpt_path="h", model_name_or_path="m",
          tokenizer_name_or_path="t", hf_overrides={})  # fmt: skip
    # community_import needs Megatron-Bridge to import; read its signature from the source instead.
    spec = importlib.util.find_spec("nemo_rl.models.megatron.community_import")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    fn = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "export_model_from_megatron"
    )
    names = [a.arg for a in fn.args.args]
    required = names[: len(names) - len(fn.args.defaults)]
    passed = {"hf_model_name", "input_path", "output_path", "hf_tokenizer_path", "hf_overrides", "strict"}
    assert passed <= set(names) and set(required) <= passed


def _megatron_keys_read_with_subscript(fn) -> set[str]:
    """Keys that ``fn`` reads as ``...["megatron_cfg"]["KEY"]`` (a KeyError when the config lacks them)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    keys = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.value, ast.Subscript)
            and isinstance(node.value.slice, ast.Constant)
            and node.value.slice.value == "megatron_cfg"
        ):
            keys.add(node.slice.value)
    return keys


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_every_cluster_config_builds_valid_master_configs(name):
    from nemo_rl.algorithms import grpo, sft

    cfg = load_config(name)
    grpo_master = build_master_config(cfg)
    sft_master = build_sft_master_config(cfg)
    grpo.MasterConfig(**grpo_master)
    sft.MasterConfig(**sft_master)
    # pydantic accepts a missing NotRequired key that setup still reads with [] (v0.7.0's sft.setup
    # reads megatron_cfg["use_linear_ce_fusion_loss"]), so check those reads directly.
    for fn, master in ((grpo.setup, grpo_master), (sft.setup, sft_master)):
        megatron_cfg = master["policy"]["megatron_cfg"]
        if megatron_cfg.get("enabled"):
            missing = _megatron_keys_read_with_subscript(fn) - set(megatron_cfg)
            assert not missing, f"{fn.__module__}.setup reads megatron_cfg keys {missing} that {name} lacks"

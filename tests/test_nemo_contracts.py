"""NeMo-RL v0.7.0's own code run on CPU against what this project hands it, workers stubbed.

* ``Policy.save_checkpoint`` (``models/policy/lm_policy.py``) and ``CheckpointManager``
  (``utils/checkpoint.py``) on every RL and SFT master config, through the RL loop's
  `save_checkpoint`: the settings must pass v0.7.0's checks and the step folder must finalize.
* ``Policy._shard_for_train`` → ``BatchedDataDict.shard_by_batch_size`` (``distributed/
  batched_data_dict.py``) with dynamic batching, sequence packing and fixed micro-batches on
  `build_train_data` output, then the Megatron worker's per-global-batch micro-batch iteration:
  every DP rank's micro-batches, the last included, carry an image.

The ``Policy`` objects are made without ``__init__`` (it starts Ray workers); the attributes
``__init__`` would set are set as it sets them (line numbers below).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from axpo_nemo import core
from axpo_nemo.config import load_config
from axpo_nemo.nemo.master_config import (
    build_master_config,
    build_sft_master_config,
    data_parallel_size,
    train_global_batch_size,
)
from axpo_nemo.nemo.train_data import build_train_data, to_batched_data_dict

pytestmark = pytest.mark.nemo_rl
pytest.importorskip("nemo_rl")

CLUSTER_CONFIGS = sorted(
    f"cluster/{p.stem}" for p in (Path(__file__).resolve().parents[1] / "conf" / "cluster").glob("*.yaml")
)


class WorkerGroup:
    """Stands in for ``RayWorkerGroup``: records what the policy sends its workers."""

    def __init__(self):
        self.calls = []

    def run_all_workers_single_data(self, method, **kwargs):
        self.calls.append((method, kwargs))
        return []

    def shutdown(self, cleanup_method=None):
        return True


class Sharding:
    """Stands in for the policy's ``sharding_annotations``: only the DP size is read."""

    def __init__(self, dp: int):
        self.dp = dp

    def get_axis_size(self, name: str) -> int:
        assert name == "data_parallel"
        return self.dp


def stub_policy(policy_cfg: dict, dp: int = 1):
    """v0.7.0's ``Policy`` with a recording worker group and the batching state ``__init__`` sets."""
    from nemo_rl.models.policy.lm_policy import Policy

    policy = Policy.__new__(Policy)
    policy.worker_group, policy.sharding_annotations, policy.cfg = WorkerGroup(), Sharding(dp), policy_cfg
    # lm_policy.py 282-323: the argument dicts of dynamic batching and sequence packing
    policy.use_dynamic_batches = bool(policy_cfg["dynamic_batching"]["enabled"])
    policy.dynamic_batching_args = {
        "input_key": "input_ids",
        "input_lengths_key": "input_lengths",
        "sequence_length_round": policy_cfg["dynamic_batching"]["sequence_length_round"],
        "max_tokens_per_microbatch": 0,
    }
    policy.use_sequence_packing = bool(policy_cfg["sequence_packing"]["enabled"])
    policy.sequence_packing_args = {
        "algorithm": policy_cfg["sequence_packing"]["algorithm"],
        "input_key": "input_ids",
        "input_lengths_key": "input_lengths",
        "sequence_length_pad_multiple": policy_cfg["make_sequence_length_divisible_by"],
    }
    return policy


# --- checkpoints ------------------------------------------------------------------------------


def _saving_policy(master_cls, master: dict, tmp_path, monkeypatch):
    """(v0.7.0 master config checkpointing under ``tmp_path``, a stub-worker `Policy` for it)."""
    from nemo_rl.models.policy import lm_policy

    monkeypatch.setattr(lm_policy.ray, "get", lambda refs: refs)
    master["checkpointing"]["checkpoint_dir"] = str(tmp_path / "ckpts")
    master_config = master_cls(**master)
    return master_config, stub_policy(master_config.policy)


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_policy_save_checkpoint_accepts_every_rl_master_config(name, tmp_path, monkeypatch):
    from nemo_rl.algorithms import grpo
    from nemo_rl.utils.checkpoint import CheckpointManager

    from axpo_nemo.nemo.trainer import save_checkpoint

    master_config, policy = _saving_policy(
        grpo.MasterConfig, build_master_config(load_config(name)), tmp_path, monkeypatch
    )
    trainer = SimpleNamespace(
        step_count=3, order=SimpleNamespace(epoch=0), questions_per_step=4, state_dict=lambda: {"step": 3}
    )
    runtime = {
        "checkpointer": CheckpointManager(master_config.checkpointing), "policy": policy,
        "master_config": master_config, "save_state": grpo._default_grpo_save_state(),
        "dataloader": SimpleNamespace(state_dict=lambda: {"position": 12}),
    }  # fmt: skip
    policy.prepare_for_training = lambda: None  # the worker call; save_checkpoint is under test

    save_checkpoint(runtime, trainer)

    step = tmp_path / "ckpts" / "step_3"
    [(method, kwargs)] = policy.worker_group.calls
    assert method == "save_checkpoint"
    assert kwargs["weights_path"] == str(tmp_path / "ckpts" / "tmp_step_3" / "policy" / "weights")
    assert (kwargs["optimizer_path"] is not None) == master_config.checkpointing["save_optimizer"]
    info = json.loads((step / "training_info.json").read_text())
    assert info["current_step"] == 3 and info["axpo"] == {"step": 3}
    assert (step / "config.yaml").is_file() and (step / "train_dataloader.pt").is_file()
    # the setting v0.7.0 rejects with the Megatron policy (what every config once had)
    with pytest.raises(ValueError, match="model_save_format must be None"):
        policy.save_checkpoint(
            weights_path="w", checkpointing_cfg={**master_config.checkpointing, "model_save_format": "safetensors"}
        )


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_policy_save_checkpoint_accepts_every_sft_master_config(name, tmp_path, monkeypatch):
    from nemo_rl.algorithms import sft
    from nemo_rl.utils.checkpoint import CheckpointManager

    master_config, policy = _saving_policy(
        sft.MasterConfig, build_sft_master_config(load_config(name)), tmp_path, monkeypatch
    )
    checkpointer = CheckpointManager(master_config.checkpointing)
    # sft_train's save (v0.7.0 algorithms/sft.py 573-594): init_tmp_checkpoint, save_checkpoint, finalize
    path = checkpointer.init_tmp_checkpoint(5, {"step": 5}, master_config)
    policy.save_checkpoint(
        weights_path=str(Path(path) / "policy" / "weights"),
        optimizer_path=str(Path(path) / "policy" / "optimizer") if checkpointer.save_optimizer else None,
        tokenizer_path=str(Path(path) / "policy" / "tokenizer"),
        checkpointing_cfg=master_config.checkpointing,
    )
    checkpointer.finalize_checkpoint(path)
    assert [m for m, _ in policy.worker_group.calls] == ["save_checkpoint"]
    assert (tmp_path / "ckpts" / "step_5" / "config.yaml").is_file()


# --- sharding and micro-batches ----------------------------------------------------------------

IMG, VSTART, VEND, PAD = 9, 7, 8, 0


def step_rows(rows: int, max_len: int, seed: int):
    """``rows`` rollouts of random length, each with one image (one token) in its prompt."""
    rng = random.Random(seed)
    rollouts, images = [], []
    for i in range(rows):
        n = rng.randint(16, max_len)
        ids = [5, VSTART, IMG, VEND] + [5] * (n - 4)
        gen = [False] * 8 + [True] * (n - 8)
        rollouts.append(core.Rollout(group=i // 8, token_ids=ids, prompt_len=8, generated=gen,
                                     logprobs=[-0.1 * g for g in gen], reward=float(i % 2), correct=bool(i % 2)))  # fmt: skip
        gen_t = torch.Generator().manual_seed(i)
        images.append([{"pixel_values": torch.randn(4, 6, generator=gen_t), "image_grid_thw": torch.tensor([1, 2, 2])}])
    batch = core.RolloutBatch.from_rollouts(rollouts)
    adv = core.assemble_advantages(batch)
    return batch, adv, images


def worker_micro_batches(shard, policy_cfg: dict, gbs: int, dp: int, num_rows: int):
    """Per global batch, the micro-batches one Megatron DP rank trains on, in order.

    v0.7.0 ``megatron_policy_worker.train`` (lines 562-625): ``local_gbs = gbs // dp``, one
    ``get_batch`` per global batch, then ``models/megatron/data.py`` ``get_microbatch_iterator``
    (lines 180-202) picks the iterator by batching mode.
    """
    out = []
    for gb in range(num_rows // gbs):
        batch = shard.get_batch(batch_idx=gb, batch_size=gbs // dp)
        if policy_cfg["dynamic_batching"]["enabled"]:
            out.append(list(batch.make_microbatch_iterator_with_dynamic_shapes()))
        elif policy_cfg["sequence_packing"]["enabled"]:
            out.append(list(batch.make_microbatch_iterator_for_packable_sequences()))
        else:
            out.append(list(batch.make_microbatch_iterator(policy_cfg["train_micro_batch_size"])))
    return out


def imageless_micro_batches(name: str, overrides: list[str], rows: int, pad_images: bool) -> list[tuple]:
    """(DP rank, global batch, micro-batch, whether it is the last) of each micro-batch without an image."""
    cfg = load_config(name, overrides)
    policy_cfg = build_master_config(cfg)["policy"]
    dp, gbs = data_parallel_size(cfg), train_global_batch_size(cfg)
    batch, adv, images = step_rows(rows, max_len=policy_cfg["max_total_sequence_length"] // 4, seed=rows)
    vision = {"vision_start_id": VSTART, "vision_end_id": VEND} if pad_images else {}
    train = build_train_data(
        batch, adv.advantages, adv.loss_mask, images, global_batch_size=gbs, pad_token_id=PAD,
        seq_multiple=policy_cfg["make_sequence_length_divisible_by"], image_token_id=IMG, **vision,
    )  # fmt: skip
    assert train.num_rows % gbs == 0 and train.num_pad_rows == (-rows) % gbs
    shards = stub_policy(policy_cfg, dp)._shard_for_train(to_batched_data_dict(train), gbs)
    assert len(shards) == dp
    missing = []
    for rank, shard in enumerate(shards):
        for gb, micro_batches in enumerate(worker_micro_batches(shard, policy_cfg, gbs, dp, train.num_rows)):
            for index, mb in enumerate(micro_batches):
                if mb.get_multimodal_dict(as_tensors=True).get("pixel_values") is None:
                    missing.append((rank, gb, index, index == len(micro_batches) - 1))
    return missing


#: The RL configs' batching modes at their DP sizes; one step makes 512 (B·N) to 640 rows (+ M·K).
LAYOUTS = [
    ("cluster/axpo_8b", []),  # dynamic batching, DP 8
    ("cluster/axpo_32b", []),  # sequence packing, DP 2
    ("cluster/axpo_32b", ["cluster.num_nodes=8"]),  # sequence packing, DP 4
    ("cluster/axpo_8b", ["nemo.megatron.batching=packing"]),  # sequence packing, DP 8
    ("cluster/axpo_8b", ["nemo.megatron.batching=none"]),  # fixed micro-batches, DP 8
]


@pytest.mark.parametrize(("name", "overrides"), LAYOUTS)
@pytest.mark.parametrize("rows", [512, 577, 639])
def test_every_dp_ranks_last_micro_batch_carries_an_image(name, overrides, rows):
    # Megatron's overlapped gradient reduce (overlap_grad_reduce; off in our configs, as in v0.7.0's
    # VLM recipes) finishes a bucket only when its parameters got gradients in the last micro-batch:
    # a last micro-batch without an image leaves the vision tower's buckets unfinished.
    assert imageless_micro_batches(name, overrides, rows, pad_images=True) == []


def test_one_token_padding_rows_leave_micro_batches_without_an_image():
    # what build_train_data did before padding rows carried an image: with fixed micro-batches the
    # padding rows are the last DP ranks' whole share of the global batch (contiguous slices)
    missing = imageless_micro_batches("cluster/axpo_8b", ["nemo.megatron.batching=none"], 512, pad_images=False)
    assert {(rank, 0, 79, True) for rank in (6, 7)} <= set(missing)  # 80 rows per rank, 128 padding rows
    # sequence packing: the bins v0.7.0's packer adds to reach a multiple of DP take one padding row each
    missing = imageless_micro_batches("cluster/axpo_32b", ["cluster.num_nodes=8"], 512, pad_images=False)
    assert {(rank, gb, last) for rank, gb, _, last in missing} == {(2, 0, True), (3, 0, True)}

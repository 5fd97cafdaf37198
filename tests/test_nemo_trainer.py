"""The NeMo-RL AXPO step's orchestration and its pure helpers, without NeMo-RL.

The step runs for real — agent loop, vLLM generator logic, core planning and advantages, train-data
translation, logprob exclusion, metrics — with the NeMo-RL policy and vLLM engine replaced by small
objects that answer the same calls (the Megatron forward and vLLM sampling cannot run here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import IM_END, ChatProtocol, format_assistant_turn
from axpo_nemo.agent.rewards import RewardConfig
from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import ToolResult
from axpo_nemo.core import STEP_METRIC_NAMES, AdvantageConfig, AXPOConfig, LossConfig
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer
from axpo_nemo.nemo.generator import RawOutput, VllmGenerator
from axpo_nemo.nemo.rollout import QuestionOrder, exclude_nonfinite_rows, reduce_train_metrics
from axpo_nemo.nemo.trainer import NemoRLTrainer


class CropTool:
    name = "crop"

    def schema(self):
        return {"type": "function", "function": {"name": self.name, "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        return ToolResult(text="a crop", images=[context.images[0].crop((0, 0, 32, 32))])


class Engine:
    """Like vLLM: "alpha" questions call the tool then answer wrong; forks (prompt ending in
    ``<tool_call>``) finish the call, then answer wrong too; "beta" answers right at once. The
    first "beta" request gets a missing logprob."""

    def __init__(self, proto, base):
        self.proto, self.base, self.nan_done = proto, base, False

    def _text(self, r):
        tok = self.proto.tokenizer
        turn = r.prompt_token_ids.count(self.proto.tool_call_close_id) - self.base
        if r.prompt_token_ids[-1] == self.proto.tool_call_open_id:
            return '\n{"name": "crop", "arguments": {}}\n</tool_call>', "fork"
        prompt = tok.decode(r.prompt_token_ids)
        if "alpha" in prompt:
            if turn == 0:
                return format_assistant_turn("Look.", tool_calls=[("crop", {})]), None
            return format_assistant_turn("Hmm.", answer="wrong") + IM_END, None
        return format_assistant_turn("Easy.", answer="yes") + IM_END, "beta"

    def run(self, requests):
        out = []
        for r in requests:
            text, kind = self._text(r)
            ids = self.proto.tokenizer(text, add_special_tokens=False)["input_ids"]
            logprobs = [-0.3] * len(ids)
            if kind == "beta" and not self.nan_done:
                logprobs[1], self.nan_done = None, True
            out.append(RawOutput(ids, logprobs, "stop"))
        return out


class Policy:
    """Answers NeMo-RL's Policy calls: old logprobs = behaviour logprobs (one NaN on row 0)."""

    def __init__(self):
        self.calls, self.trained = [], []

    def prepare_for_lp_inference(self):
        self.calls.append("lp")

    def prepare_for_training(self):
        self.calls.append("train_prep")

    def get_logprobs(self, data):
        lp = data["generation_logprobs"].clone()
        lp[0, int(torch.nonzero(data["token_mask"][0])[0])] = math.nan
        return {"logprobs": lp}

    def get_reference_policy_logprobs(self, data):
        return {"reference_logprobs": data["generation_logprobs"].clone()}

    def train(self, data, loss_fn):
        self.trained.append(data)
        return {
            "loss": np.array(0.5),
            "grad_norm": np.array(1.0),
            "all_mb_metrics": {"loss": [0.2, 0.3], "lr": [1e-6, 1e-6]},
        }


class Generation:
    def __init__(self):
        self.calls = []

    def prepare_for_generation(self):
        self.calls.append("wake")

    def finish_generation(self):
        self.calls.append("sleep")


def _image(seed):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (48, 64, 3), generator=gen, dtype=torch.uint8).numpy())


def _trainer(data_root, policy, generation, refit) -> NemoRLTrainer:
    proto = ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))
    for i in range(2):
        _image(i).save(data_root / f"q{i}.png")
    questions = [
        Sample(id="a", question="alpha: what?", answer="right", images=["q0.png"]),
        Sample(id="b", question="beta: what?", answer="yes", images=["q1.png"]),
    ]
    base = proto.build_prompt("x", [_image(0)], [CropTool()]).token_ids.count(proto.tool_call_close_id)
    generator = VllmGenerator(Engine(proto, base), proto.tokenizer, eos_ids=[proto.im_end_id])
    return NemoRLTrainer(
        policy=policy, generation=generation, refit=refit, generator=generator,
        tools={"crop": CropTool()}, protocol=proto, loss_fn="loss", questions=questions, data_root=data_root,
        algorithm="axpo", axpo_cfg=AXPOConfig(r=0.5, k=2), adv_cfg=AdvantageConfig(), loss_cfg=LossConfig(kl_coef=0.0),
        reward_cfg=RewardConfig(), loop_cfg=AgentLoopConfig(max_new_tokens=64, max_total_tokens=4096),
        questions_per_step=2, group_size=2, global_batch_size=4, pad_token_id=proto.tokenizer.pad_token_id or 0,
        to_train_data=lambda d: {**d.tensors, **d.multimodal},
    )  # fmt: skip


@pytest.fixture()
def setup(tmp_path):
    policy, generation, refits = Policy(), Generation(), []
    trainer = _trainer(tmp_path, policy, generation, lambda: refits.append(1))
    return trainer, policy, generation, refits


def test_axpo_step_orchestration(setup):
    trainer, policy, generation, refits = setup
    metrics = trainer.step()
    for name in STEP_METRIC_NAMES:
        assert name in metrics
    batch, plan = trainer.last["batch"], trainer.last["plan"]
    # alpha's two tool-using rollouts are all wrong: one prefix (M = floor(0.5*4/2)), K = 2 forks.
    assert metrics["triggered_groups"] == 1 and metrics["prefixes_selected"] == 1
    assert batch.num_rows == 6 and batch.source.tolist()[4:] == [int(plan.selected[0])] * 2
    assert metrics["rows"] == 6 and metrics["pad_rows"] == 2  # padded to a multiple of 4, none dropped
    # Refit before generating, sleep after resampling, logprobs, then training.
    assert refits == [1] and generation.calls == ["sleep"] and policy.calls == ["lp", "train_prep"]
    data = policy.trained[0]
    assert data["input_ids"].shape[0] == 8 and data["sample_mask"][6:].tolist() == [0.0, 0.0]
    # One generated NaN (a beta rollout) and one NaN old logprob (row 0): both rows carry no loss.
    assert metrics["invalid_logprob_rows"] == 1 and metrics["invalid_logprob_samples"] == 1
    assert metrics["nonfinite_rows"] == 1 and data["sample_mask"][0] == 0 and data["token_mask"][0].sum() == 0
    assert sum(float(data["sample_mask"][i]) == 0.0 for i in (2, 3)) == 1  # the beta row with the NaN
    assert all(torch.isfinite(data[k]).all() for k in ("prev_logprobs", "generation_logprobs", "advantages"))
    assert metrics["loss"] == pytest.approx(0.5) and metrics["lr"] == 1e-6
    assert metrics["accuracy"] == 0.5 and metrics["resample_reward_mean"] == 0.0

    trainer.step()  # the policy changed: refit again
    assert refits == [1, 1] and generation.calls == ["sleep", "sleep"]
    state = trainer.state_dict()
    assert state["step"] == 2 and (state["data"]["epoch"], state["data"]["position"]) == (1, 2)
    assert state["counters"]["rollouts"] == 12
    fresh = NemoRLTrainer.__new__(NemoRLTrainer)
    fresh.order, fresh.fingerprint = QuestionOrder(2, 0), trainer.fingerprint
    fresh.load_state_dict(state)
    assert (fresh.step_count, fresh.order.epoch, fresh.counters) == (2, 1, trainer.counters)


def test_question_order_matches_the_local_trainer_and_resumes():
    a = QuestionOrder(5, seed=3)
    drawn = [a.draw(2) for _ in range(4)]
    assert sorted(drawn[0] + drawn[1] + [drawn[2][0]]) == [0, 1, 2, 3, 4] and a.epoch == 1
    b = QuestionOrder(5, seed=3, epoch=a.epoch, position=a.position)
    assert a.draw(3) == b.draw(3)


def test_exclude_nonfinite_rows_and_metric_reduction():
    tensors = {
        "token_mask": torch.tensor([[0, 1, 1], [0, 1, 0], [0, 0, 0]]),
        "sample_mask": torch.tensor([1.0, 1.0, 0.0]),
        "prev_logprobs": torch.tensor([[0.0, -1.0, math.nan], [math.nan, -0.5, math.inf], [math.nan, 0, 0]]),
    }
    assert exclude_nonfinite_rows(tensors, ("prev_logprobs", "absent"), num_rows=2) == 1
    assert tensors["sample_mask"].tolist() == [0.0, 1.0, 0.0] and tensors["token_mask"][0].sum() == 0
    assert torch.isfinite(tensors["prev_logprobs"]).all()  # NaN off the mask is zeroed too

    out = reduce_train_metrics(
        {"loss": np.array([0.25]), "grad_norm": 2.0,
         "all_mb_metrics": {"loss": [0.1, 0.2], "lr": [1.0, 3.0], "probs_ratio_min": [0.9, -np.inf, 0.8], "x": []}}
    )  # fmt: skip
    # As in grpo_train, the micro-batch losses (summed) replace the results' loss.
    assert out == pytest.approx({"loss": 0.3, "grad_norm": 2.0, "lr": 2.0, "probs_ratio_min": 0.8})


def test_sft_message_log_rebuilds_the_trajectory(setup):
    from axpo_nemo.nemo.sft import SFTDataset, message_log_from_state

    trainer = setup[0]
    trainer.step()
    state = trainer.last["states"][0]  # alpha: prompt image, a tool call, a crop image, an answer
    messages = message_log_from_state(state, decode=trainer.protocol.decode)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert torch.cat([m["token_ids"] for m in messages]).tolist() == state.token_ids
    mask = torch.cat([torch.full((len(m["token_ids"]),), m["role"] == "assistant") for m in messages])
    assert mask.tolist() == state.generated  # assistant messages are exactly the generated tokens
    assert (
        torch.cat([m["mm_token_type_ids"] for m in messages]).tolist() == state.mm_token_type_ids().tolist()
    )
    with_images = [m for m in messages if "pixel_values" in m]
    assert [m["role"] for m in with_images] == ["user", "tool"]
    assert torch.equal(
        torch.cat([m["pixel_values"] for m in with_images]),
        torch.cat([s.image.pixel_values for s in state.images]),
    )
    assert torch.cat([m["image_grid_thw"] for m in with_images]).shape == (2, 3)
    datum = SFTDataset([state])[0]
    assert datum["length"] == len(state.token_ids) and datum["loss_multiplier"] == 1.0
    assert datum["task_name"] == "axpo_sft" and len(datum["message_log"]) == 4


# --- wake / offload order against NeMo-RL v0.7.0's grpo_train ---------------------------------


class RecordingPolicy(Policy):
    """`Policy` that writes every NeMo-RL call that moves memory (and the train/save calls) to ``log``."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def prepare_for_lp_inference(self):
        self.log.append("policy.prepare_for_lp_inference")

    def prepare_for_training(self):
        self.log.append("policy.prepare_for_training")

    def offload_before_refit(self):
        self.log.append("policy.offload_before_refit")

    def offload_after_refit(self):
        self.log.append("policy.offload_after_refit")

    def train(self, data, loss_fn):
        self.log.append("policy.train")
        return super().train(data, loss_fn)

    def save_checkpoint(self, **kwargs):
        self.log.append("policy.save_checkpoint")

    # what v0.7.0's refit_policy_generation asks of a colocated policy
    def get_free_memory_bytes(self):
        return 1 << 30

    def stream_weights_via_ipc_zmq(self, buffer_size_bytes):
        self.log.append("policy.stream_weights_via_ipc_zmq")
        return []


class RecordingGeneration:
    """A vLLM generation interface that writes its calls to ``log``."""

    def __init__(self, log):
        self.log = log

    def prepare_for_generation(self, tags=None):
        self.log.append("generation.prepare_for_generation" + (f"({','.join(tags)})" if tags else ""))

    def finish_generation(self):
        self.log.append("generation.finish_generation")

    def update_weights_via_ipc_zmq(self):
        self.log.append("generation.update_weights_via_ipc_zmq")
        return [True]


class Checkpointer:
    save_optimizer = True

    def __init__(self, root, log):
        self.root, self.log = root, log

    def init_tmp_checkpoint(self, step, save_state, master_config):
        self.log.append("checkpointer.init_tmp_checkpoint")
        path = self.root / f"tmp_step_{step}"
        path.mkdir()
        return str(path)

    def finalize_checkpoint(self, path):
        self.log.append("checkpointer.finalize_checkpoint")


class Dataloader:
    def state_dict(self):
        return {}


#: ``grpo_train``'s calls (NeMo-RL v0.7.0, nemo_rl/algorithms/grpo.py) for one step, a validation
#: and a checkpoint, then the next step's wake, with colocated vLLM. REFIT is what the stub refit
#: records; `test_wake_order_with_v070s_own_refit` runs v0.7.0's refit_policy_generation instead.
REFIT = ["refit"]
#: refit_policy_generation, lines 1876 (offload_before_refit), 1880 (prepare, tags weights), 1924 and 1927
#: (stream to vLLM), 1962 (offload_after_refit), 1966 (prepare, tags kv_cache).
V070_REFIT = [
    "policy.offload_before_refit",
    "generation.prepare_for_generation(weights)",
    "policy.stream_weights_via_ipc_zmq",
    "generation.update_weights_via_ipc_zmq",
    "policy.offload_after_refit",
    "generation.prepare_for_generation(kv_cache)",
]


def expected_order(refit: list[str]) -> list[str]:
    """v0.7.0's grpo_train: step, validation, checkpoint, next step's wake (line numbers inline)."""
    after_generation = [
        "generation.finish_generation",  # 2400, after the rollouts
        "policy.prepare_for_lp_inference",  # 2602
        "policy.prepare_for_training",  # 2726, then POLICY_GENERATION_STALE = True
        "policy.train",  # 2731
    ]
    return [
        *refit,  # 2282-2322: stale, so refit (it wakes vLLM)
        *after_generation,
        *refit,  # 2762-2770: validation after a training step refits
        "validate",  # 2775
        "generation.finish_generation",  # 2784
        "policy.prepare_for_training",  # 2886: the checkpoint reloads the optimizer onto the GPU
        "checkpointer.init_tmp_checkpoint",  # 2933
        "policy.save_checkpoint",  # 2936
        "checkpointer.finalize_checkpoint",  # 2967
        # 2323-2326: the weights are current (not stale), so no refit; colocated, so the optimizer
        # goes off the GPU *before* vLLM wakes
        "policy.offload_after_refit",
        "generation.prepare_for_generation",
        *after_generation,
    ]


def _step_validate_checkpoint_step(tmp_path, refit_with) -> list[str]:
    from axpo_nemo.nemo.trainer import save_checkpoint

    log: list[str] = []
    policy, generation = RecordingPolicy(log), RecordingGeneration(log)
    (tmp_path / "data").mkdir()
    trainer = _trainer(tmp_path / "data", policy, generation, lambda: refit_with(policy, generation, log))
    runtime = {
        "checkpointer": Checkpointer(tmp_path, log), "policy": policy, "save_state": {},
        "master_config": type("Master", (), {"checkpointing": {"enabled": True}})(), "dataloader": Dataloader(),
    }  # fmt: skip
    trainer.step()
    assert trainer.validate(lambda: log.append("validate") or "report") == "report"
    save_checkpoint(runtime, trainer)
    trainer.step()
    return log


def test_wake_after_validation_and_checkpoint_offloads_the_optimizer_first(tmp_path):
    log = _step_validate_checkpoint_step(tmp_path, lambda policy, generation, log: log.append("refit"))
    assert log == expected_order(REFIT)


def test_a_wake_without_colocation_leaves_the_optimizer(tmp_path):
    log: list[str] = []
    trainer = _trainer(tmp_path, RecordingPolicy(log), RecordingGeneration(log), lambda: log.append("refit"))
    trainer.colocated, trainer.stale = False, False  # v0.7.0 offloads only when colocated (2324)
    trainer.wake()
    assert log == ["generation.prepare_for_generation"]


@pytest.mark.nemo_rl
def test_wake_order_with_v070s_own_refit(tmp_path, monkeypatch):
    pytest.importorskip("nemo_rl")
    from nemo_rl.algorithms import grpo

    monkeypatch.setattr(grpo.ray, "get", lambda refs: refs)  # the stubs return results, not refs

    def refit(policy, generation, log):
        grpo.refit_policy_generation(policy, generation, True, _refit_buffer_size_gb=None)

    assert _step_validate_checkpoint_step(tmp_path, refit) == expected_order(V070_REFIT)

"""SFT on NeMo-RL (v0.7.0): our trajectories and chat format through ``nemo_rl.algorithms.sft``.

**The bridge.** NeMo-RL's SFT reads ``DatumSpec`` dicts whose ``message_log`` is a list of
messages, each with its ``token_ids`` (and, for a VLM, its images' processor outputs); it masks
the loss by role (``assistant`` messages train) and concatenates the messages. We produce those
messages from our own data path instead of NeMo-RL's dataset processors:

1. every `Sample` (``sft.jsonl``) is replayed through the agent loop exactly as the local SFT
   does (`local.sft.tokenize_samples`: the chat template renders the prompt and the tools run for
   real), so SFT and RL see one token layout — no re-rendering of history through a template;
2. the replayed trajectory is cut into runs of equal ``generated`` flags: the prompt becomes a
   ``user`` message, every generated run an ``assistant`` message (trained), every observation a
   ``tool`` message (not trained); concatenating them gives back the trajectory's tokens;
3. each message carries the images whose pad tokens it holds — ``pixel_values`` and
   ``image_grid_thw`` as ``PackedTensor(dim_to_pack=0)`` — and ``mm_token_type_ids`` (1 on image
   pads) on *every* message, because NeMo-RL concatenates a per-token key only across the messages
   that have it.

`run_sft` then calls NeMo-RL's ``sft.setup`` (the processor passed as its tokenizer argument, which
setup detects) and ``sft_train``; resume is NeMo-RL's (automatic from the newest checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from axpo_nemo.agent.trajectory import TrajectoryState

__all__ = ["SFTDataset", "message_log_from_state", "run_sft"]

logger = logging.getLogger(__name__)

#: Task name of our SFT datums (NeMo-RL groups by it; no environment is involved in SFT).
TASK_NAME = "axpo_sft"


def _runs(generated: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, generated)`` of equal flags."""
    runs, start = [], 0
    for i in range(1, len(generated) + 1):
        if i == len(generated) or generated[i] != generated[start]:
            runs.append((start, i, bool(generated[start])))
            start = i
    return runs


def message_log_from_state(
    state: TrajectoryState,
    *,
    decode: Callable[[list[int]], str] | None = None,
    pack: Callable[[torch.Tensor], Any] | None = None,
) -> list[dict[str, Any]]:
    """A replayed trajectory as a NeMo-RL message log (module docstring, step 2-3).

    Args:
        state: the trajectory (tokens, ``generated`` flags, image slots).
        decode: token ids → text for each message's ``content`` (default: empty text).
        pack: wraps a per-message image tensor (NeMo-RL: ``PackedTensor(t, dim_to_pack=0)``);
            default: the tensor itself.
    """
    pack = pack or (lambda t: t)
    types = state.mm_token_type_ids()
    messages = []
    for index, (start, end, generated) in enumerate(_runs(state.generated)):
        role = "assistant" if generated else ("user" if index == 0 else "tool")
        ids = state.token_ids[start:end]
        message: dict[str, Any] = {
            "role": role,
            "content": decode(ids) if decode is not None else "",
            "token_ids": torch.tensor(ids, dtype=torch.long),
            "mm_token_type_ids": types[start:end].clone(),
        }
        slots = sorted((s for s in state.images if start <= s.start < end), key=lambda s: s.start)
        for slot in slots:
            if slot.end > end:
                raise ValueError(
                    f"an image's tokens [{slot.start}, {slot.end}) cross a message boundary at {end}"
                )
        if slots:
            message["pixel_values"] = pack(torch.cat([s.image.pixel_values for s in slots]))
            message["image_grid_thw"] = pack(torch.stack([s.image.grid_thw.reshape(3) for s in slots]))
        messages.append(message)
    return messages


class SFTDataset(torch.utils.data.Dataset):
    """Replayed SFT examples as NeMo-RL ``DatumSpec`` dicts (``rl_collate_fn`` batches them).

    Args:
        states: replayed trajectories (`local.sft.tokenize_samples`' examples' ``state``).
        decode / pack: as in `message_log_from_state`.
    """

    def __init__(self, states: Sequence[TrajectoryState], decode=None, pack=None) -> None:
        self.states, self.decode, self.pack = list(states), decode, pack

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> dict[str, Any]:
        state = self.states[i]
        return {
            "message_log": message_log_from_state(state, decode=self.decode, pack=self.pack),
            "length": len(state.token_ids),
            "extra_env_info": None,
            "loss_multiplier": 1.0,
            "idx": i,
            "task_name": TASK_NAME,
        }


def run_sft(cfg, cfg_tree=None) -> int:
    """SFT of ``cfg`` on NeMo-RL: replay our samples, build the datums, ``sft.setup`` + ``sft_train``.

    Ray must already be initialised. Returns 0.
    """
    from axpo_nemo.agent.loop import AgentLoopConfig
    from axpo_nemo.agent.protocol import ChatProtocol
    from axpo_nemo.agent.sample import read_samples
    from axpo_nemo.agent.sft_examples import tokenize_samples
    from axpo_nemo.agent.tools.registry import build_tools
    from axpo_nemo.nemo import adapter
    from axpo_nemo.nemo.master_config import build_sft_master_config
    from axpo_nemo.run.run_folder import save_config

    sft = adapter.sft_module()
    out = Path(cfg.output_dir)
    if cfg_tree is not None:
        save_config(cfg_tree, out)
    data_dir = Path(cfg.data.dir) if cfg.data.dir else out / "data"
    master = build_sft_master_config(cfg)
    master["sft"].update(val_period=0, val_at_start=False, val_at_end=False)  # no validation dataset here
    processor = adapter.get_tokenizer(master["policy"]["tokenizer"], get_processor=True)
    protocol = ChatProtocol(processor)
    loop_cfg = AgentLoopConfig.from_rollout_config(
        cfg.rollout, tool_timeout_s=cfg.tools.timeout_s, seed=cfg.seed
    )
    samples = list(read_samples(data_dir / cfg.data.sft_file))
    with build_tools(cfg.tools) as tools:
        examples, skipped, _ = tokenize_samples(
            samples, data_dir, tools, protocol, loop_cfg, cfg.sft.max_tokens
        )
    if skipped:
        logger.warning("sft (nemo): skipped samples %s", dict(skipped))
    if not examples:
        raise ValueError(f"sft (nemo): no usable sample in {data_dir / cfg.data.sft_file}")
    packed = adapter.packed_tensor_cls()
    dataset = SFTDataset(
        [e.state for e in examples], decode=protocol.decode, pack=lambda t: packed(t, dim_to_pack=0)
    )
    master_config = sft.MasterConfig(**master)
    (policy, _cluster, train_loader, val_loader, loss_fn, nemo_logger, checkpointer, save_state,
     master_config) = sft.setup(master_config, processor, dataset, None)  # fmt: skip
    sft.sft_train(
        policy, train_loader, val_loader, processor.tokenizer, loss_fn, master_config, nemo_logger,
        checkpointer, save_state,
    )  # fmt: skip
    return 0

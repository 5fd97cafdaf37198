"""Shared by `bench_vs_trl` and its TRL driver: the workloads, the model and questions both trainers
start from, the hash reward, the pinned turns' scripted tails and the timing helpers."""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from axpo_nemo.agent.protocol import IM_END, format_assistant_turn
from axpo_nemo.agent.sample import Sample
from axpo_nemo.models import PolicyBundle, build_tiny_qwen3vl, resolve_device

WORKLOADS = ("single", "tools")
PHASES = ("step", "gen", "score", "update", "other", "decode")
TRL_VERSION = "1.16.0"
#: Control tokens a pinned turn never samples (TRL: ``suppress_tokens``; ours: replaced).
CONTROL_TOKENS = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
    "</think>",
)  # fmt: skip
ZOOM_BOX = [0, 0, 500, 500]
QUICK = {"b": 2, "n": 4, "think_tokens": 16, "micro_batch_size": 4, "steps": 5, "warmup": 1}
FULL = {"b": 4, "n": 8, "think_tokens": 64, "micro_batch_size": 8, "steps": 6, "warmup": 1}



# -- shared pieces ---------------------------------------------------------------------------------


def build_bundle(arch: str, device: str, dtype: torch.dtype, seed: int = 0) -> PolicyBundle:
    """The policy both frameworks start from: the tiny Qwen3-VL, or Qwen3-VL-2B's sizes (random)."""
    if arch == "2b":
        from device_check import build_qwen3vl_2b  # same folder: tools/

        return build_qwen3vl_2b(device, dtype, seed)
    bundle = build_tiny_qwen3vl(seed=seed, dtype=dtype)
    bundle.model.to(resolve_device(device))
    return bundle


def make_questions(count: int, seed: int = 0, size: int = 224) -> list[Sample]:
    """``count`` questions, each with its own random RGB image (kept in memory)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        out.append(
            Sample(
                id=f"q{i}",
                question=f"What is in the top-left corner of picture {i}? Answer with one word.",
                answer="1",
                images=[f"q{i}.png"],  # a name only: the image is in memory
                image_data=[image],
            )
        )
    return out


def token_reward(token_ids: Sequence[int]) -> float:
    """A reward in [0, 1) that depends only on the tokens (a hash): never constant within a group."""
    data = np.asarray(list(token_ids), dtype=np.int64).tobytes()
    return zlib.crc32(data) / 2**32


def control_ids(tokenizer) -> list[int]:
    """Ids of `CONTROL_TOKENS` that are single tokens of ``tokenizer``."""
    ids = []
    for text in CONTROL_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is not None and tokenizer.convert_ids_to_tokens(tid) == text:
            ids.append(int(tid))
    return ids


@dataclass
class Tails:
    """Scripted token tails appended after a pinned turn's sampled tokens.

    Attributes:
        call: the first turn's tool call, up to ``</tool_call>`` (``tools`` workload; else empty).
        answer: a later turn's answer, up to ``<|im_end|>`` (``tools`` workload; else empty).
        im_end: the id of ``<|im_end|>`` (TRL's turns end with it; ours leave it to the observation).
    """

    call: list[int]
    answer: list[int]
    im_end: int


def scripted_tails(tokenizer, workload: str) -> Tails:
    """The tails of `Tails` for a workload."""
    im_end = int(tokenizer.convert_tokens_to_ids(IM_END))
    if workload == "single":
        return Tails([], [], im_end)
    call = format_assistant_turn("", tool_calls=[("image_zoom_in", {"bbox_2d": ZOOM_BOX})])
    answer = format_assistant_turn("", answer="1") + IM_END
    encode = functools.partial(tokenizer, add_special_tokens=False)
    return Tails(encode(call)["input_ids"], encode(answer)["input_ids"], im_end)


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_calls(obj: Any, name: str, sink: dict[str, float], key: str) -> None:
    """Wrap ``obj.name`` (an instance attribute from then on) to add its wall time to ``sink[key]``."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sink[key] = sink.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, timed)
